"""End to end through the CLI: outputs, formats, refusals, exit codes, config precedence."""

from __future__ import annotations

import json
from importlib.metadata import version
import math
import re
import subprocess
import sys
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest
import simplejpeg
import typer.main

from pipeline.cli import app
from tests.conftest import FAST, REPO, read_output, run_subprocess, write_colour_images


def base_args(source, out, checkpoint, *extra):
    return ["run", source, "--out", out, "--model", "resnet18", "--weights", checkpoint,
            "--top-k", "3", "--workers", "1", "--batch-size", "5", "--shard-size", "7",
            "--quiet", *FAST, *extra]


@pytest.mark.parametrize("part", [None, (1, 2)])
def test_progress_in_a_log_is_a_plain_line_per_report(
        cli, tmp_path, colour_folder, colour_checkpoint, monkeypatch, part):
    """stderr not a terminal (cron, a scheduler): no redraws left in the log, lines instead.

    A slice of an array job counts its own share, and says which slice it is."""
    monkeypatch.setattr("pipeline.progress.LOG_PROGRESS_SECONDS", 0)  # a report every batch
    folder, truth = colour_folder
    args = [a for a in base_args(folder, tmp_path / "run", colour_checkpoint) if a != "--quiet"]
    total, which = len(truth), ""
    if part is not None:
        index, count = part
        args += ["--slice-index", str(index), "--num-slices", str(count)]
        total = sum(min(7, len(truth) - start) for start in range(7 * index, len(truth), 7 * count))
        which = f"slice {index} of {count}: "
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    counts = [int(n) for n in re.findall(rf"^label-images: {which}(\d+) of {total} images",
                                         result.output, re.MULTILINE)]
    assert len(set(counts)) > 2 and counts == sorted(counts) and counts[-1] == total


def test_the_progress_counts_error_rows_as_they_are_written(
        cli, tmp_path, colour_checkpoint, monkeypatch):
    """A night going wrong shows on its bar (in a log, its lines), not only at the end."""
    monkeypatch.setattr("pipeline.progress.LOG_PROGRESS_SECONDS", 0)
    folder = tmp_path / "images"
    folder.mkdir()
    truth = write_colour_images(folder, 24)
    broken = sorted(truth)[3::4]
    for key in broken:
        (folder / key).write_bytes(b"not an image")
    args = [a for a in base_args(folder, tmp_path / "run", colour_checkpoint) if a != "--quiet"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    said = [(int(n), int(e or 0)) for n, e in re.findall(
        r"^label-images: (\d+) of \d+ images \(\d+%\), [^,]+(?:, (\d+) errors?)?, ",
        result.output, re.MULTILINE)]
    assert said[-1] == (len(truth), len(broken)), result.output
    assert [e for _, e in said] == sorted(e for _, e in said) and len({e for _, e in said}) > 2


def test_labels_every_image_once_in_source_order_and_correctly(
        cli, tmp_path, colour_folder, colour_checkpoint):
    folder, truth = colour_folder
    result = cli(*base_args(folder, tmp_path / "run", colour_checkpoint))
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert table["key"].tolist() == sorted(truth)
    assert (table["status"] == "ok").all()
    assert table["top1_label"].tolist() == [truth[k] for k in table["key"]]
    first = table.iloc[0]
    assert list(first["labels"])[0] == first["top1_label"]
    assert first["scores"][0] == pytest.approx(first["top1_score"])
    assert all(a >= b for a, b in zip(first["scores"], first["scores"][1:]))
    assert math.isclose(sum(first["scores"]), 1.0, abs_tol=0.2)  # top 3 of 4 classes
    # parts are merged away; the run directory describes itself
    run_dir = tmp_path / "run"
    assert not (run_dir / "parts").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["items"] == len(truth) and summary["ok"] == len(truth)
    assert {"load_seconds", "compute_seconds", "write_seconds"} <= set(summary)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["fingerprint"]["model"] == "resnet18"
    assert run["config"]["top_k"] == 3
    assert run["versions"]["simplejpeg"] == simplejpeg.__version__  # the decoders are recorded
    assert set(run["versions"]) >= {"torch", "torchvision", "pillow", "pi-heif"}
    assert run["backend"] == {"library": "torchvision", "version": version("torchvision")}
    meta = pq.read_schema(run_dir / "labels.parquet").metadata
    assert meta[b"label_images.model"] == b"resnet18"
    assert meta[b"label_images.weights"].startswith(b"sha256:")


def test_csv_output_has_flat_top_k_columns_matching_parquet(
        cli, tmp_path, colour_folder, colour_checkpoint):
    folder, _ = colour_folder
    assert cli(*base_args(folder, tmp_path / "p", colour_checkpoint)).exit_code == 0
    assert cli(*base_args(folder, tmp_path / "c", colour_checkpoint,
                          "--format", "csv")).exit_code == 0
    parquet = read_output(tmp_path / "p" / "labels.parquet")
    csv = read_output(tmp_path / "c" / "labels.csv")
    assert list(csv.columns[:8]) == ["key", "path", "status", "error", "width", "height",
                                     "top1_label", "top1_score"]
    assert [c for c in csv.columns if c.startswith(("label_", "score_", "class_id_"))] == [
        "label_1", "label_2", "label_3", "score_1", "score_2", "score_3",
        "class_id_1", "class_id_2", "class_id_3"]
    assert csv["key"].tolist() == parquet["key"].tolist()
    assert csv["label_2"].tolist() == [labels[1] for labels in parquet["labels"]]
    assert csv["score_1"].to_numpy() == pytest.approx(parquet["top1_score"].to_numpy(), abs=1e-6)


def test_unreadable_files_become_error_rows_without_stopping_the_run(
        cli, tmp_path, colour_checkpoint):
    folder = tmp_path / "imgs"
    truth = write_colour_images(folder, 6)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "noise.png").write_bytes(b"this is not an image")
    good = (folder / "img_0000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    result = cli(*base_args(folder, tmp_path / "run", colour_checkpoint))
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet").set_index("key")
    assert len(table) == 9
    bad = table.loc[["empty.jpg", "noise.png", "truncated.jpg"]]
    assert (bad["status"] == "error").all()
    assert bad["error"].str.len().gt(0).all()
    assert bad["top1_label"].isna().all() and bad["width"].isna().all()
    ok = table.loc[list(truth)]
    assert (ok["status"] == "ok").all() and ok["error"].isna().all()
    assert ok["top1_label"].tolist() == list(truth.values())  # no neighbour's label leaked


def test_manifest_keep_and_id_columns_pass_through(cli, tmp_path, colour_checkpoint):
    folder = tmp_path / "images"
    truth = write_colour_images(folder, 5)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({
        "id": [f"00{i}" for i in range(5)],
        "filename": [f"images/{name}" for name in truth],
        "caption": [f"a, \"quoted\" caption {i}" for i in range(5)],
    }).to_csv(manifest, index=False)
    result = cli(*base_args(manifest, tmp_path / "run", colour_checkpoint,
                            "--id-column", "id", "--keep-columns", "caption"))
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert table["key"].tolist() == ["000", "001", "002", "003", "004"]  # ids stay text
    assert table["caption"].tolist() == [f"a, \"quoted\" caption {i}" for i in range(5)]
    assert table["path"].tolist() == [str(tmp_path / "images" / n) for n in truth]
    assert list(table.columns)[-1] == "caption"


def test_a_different_job_in_the_same_directory_is_refused(
        cli, tmp_path, colour_folder, colour_checkpoint):
    folder, _ = colour_folder
    out = tmp_path / "run"
    assert cli(*base_args(folder, out, colour_checkpoint)).exit_code == 0
    before = (out / "labels.parquet").read_bytes()
    result = cli(*base_args(folder, out, colour_checkpoint, "--top-k", "2"))
    assert result.exit_code == 2
    assert "top_k (3 -> 2)" in result.output and "--overwrite" in result.output
    assert (out / "labels.parquet").read_bytes() == before
    result = cli(*base_args(folder, out, colour_checkpoint, "--top-k", "2", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert len(read_output(out / "labels.parquet")["labels"][0]) == 2


def test_a_rerun_labels_the_frozen_plan_and_overwrite_lists_the_source_again(
        cli, tmp_path, colour_checkpoint):
    """The plan is frozen by the first run: images added since wait for the next run."""
    folder = tmp_path / "imgs"
    write_colour_images(folder, 4)
    out = tmp_path / "run"
    assert cli(*base_args(folder, out, colour_checkpoint)).exit_code == 0
    write_colour_images(folder / "more", 1)
    again = cli(*base_args(folder, out, colour_checkpoint))
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert len(read_output(out / "labels.parquet")) == 4
    fresh = cli(*base_args(folder, out, colour_checkpoint, "--overwrite"))
    assert fresh.exit_code == 0, fresh.output
    assert len(read_output(out / "labels.parquet")) == 5


_AS_A_USER = """
import sys
from pipeline.cli import main
try:
    main()
finally:
    print("torch imported" if "torch" in sys.modules else "no torch", flush=True)
"""


def test_a_finished_run_is_answered_without_loading_torch(tmp_path, colour_checkpoint):
    """`nothing to do` (and what changed in the source since) from the run directory alone:
    it took the model's load and the machine's measuring before (17.8 s in issue 44)."""
    folder, out = tmp_path / "imgs", tmp_path / "run"
    write_colour_images(folder, 4)
    args = [str(a) for a in base_args(folder, out, colour_checkpoint)]
    assert run_subprocess(*args).returncode == 0
    write_colour_images(folder / "more", 1)
    again = subprocess.run([sys.executable, "-c", _AS_A_USER, *args], cwd=REPO,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "no torch"
    assert again.stderr.strip().startswith(f"nothing to do: {out / 'labels.parquet'} is "
                                           "complete (4 rows); but ")
    assert "(1 new, 0 changed, 0 removed)" in again.stderr


@pytest.mark.parametrize("columns, extra, said", [
    ("file,caption", ["--path-column", "path"], "--path-column 'path' is not a column of"),
    ("a,b", [], "cannot tell which column of"),
    ("path,caption", ["--id-column", "id"], "--id-column 'id' is not a column of")])
def test_a_manifests_columns_are_refused_without_loading_torch(tmp_path, columns, extra,
                                                                said):
    """A manifest's missing column took the model's load first (11-15 s in issue 44)."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"{columns}\nx.jpg,y\n")
    done = subprocess.run([sys.executable, "-c", _AS_A_USER, "run", str(manifest), "--out",
                           str(tmp_path / "run"), *extra], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip() == "no torch"
    assert done.stderr.strip().startswith(f"label-images: error: {said}")
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_what_the_quick_answer_is_unsure_of_goes_the_whole_way(tmp_path, colour_checkpoint):
    """Other weights at the same path, another option, a labels file: not answered from
    the record (the whole way then refuses or finishes as before)."""
    import torch
    import torchvision

    from pipeline.config import resolve
    from pipeline.finished import answer

    folder, out = tmp_path / "imgs", tmp_path / "run"
    write_colour_images(folder, 4)
    weights = tmp_path / "w.pt"
    weights.write_bytes(colour_checkpoint.read_bytes())
    args = [str(a) for a in base_args(folder, out, weights)]
    assert run_subprocess(*args).returncode == 0

    def asked(**changed):
        flags = {"source": str(folder), "out": str(out), "model": "resnet18",
                 "weights": str(weights), "top_k": 3, "resize": 72, "crop": 64, **changed}
        return answer(resolve({}, flags))

    assert asked() is not None and asked().already_complete
    assert asked(top_k=2) is None and asked(embeddings=True) is None
    assert asked(format="csv") is None  # a conversion: the whole way does it
    assert asked(overwrite=True) is None
    torch.manual_seed(1)  # the same path, other weights
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), weights)
    assert asked() is None
    refused = run_subprocess(*args)
    assert refused.returncode == 2 and "different" in refused.stderr


def test_rerun_of_a_finished_run_does_nothing_and_can_convert_format(
        cli, tmp_path, colour_folder, colour_checkpoint):
    folder, truth = colour_folder
    out = tmp_path / "run"
    assert cli(*base_args(folder, out, colour_checkpoint)).exit_code == 0
    again = cli(*base_args(folder, out, colour_checkpoint))
    assert again.exit_code == 0 and "nothing to do" in again.output
    converted = cli(*base_args(folder, out, colour_checkpoint, "--format", "csv"))
    assert converted.exit_code == 0
    assert read_output(out / "labels.csv")["key"].tolist() == sorted(truth)


def test_config_file_sets_options_and_flags_override_it(
        cli, tmp_path, colour_folder, colour_checkpoint):
    folder, _ = colour_folder
    config = tmp_path / "job.toml"
    config.write_text(
        f'source = "{folder}"\nout = "{tmp_path / "run"}"\nmodel = "resnet18"\n'
        f'weights = "{colour_checkpoint}"\ntop-k = 2\nformat = "csv"\nworkers = 0\n'
        f'resize = 72\ncrop = 64\nquiet = true\n')
    result = cli("run", "--config", config, "--top-k", "3")
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.csv")
    assert "label_3" in table.columns and "label_4" not in table.columns  # flag won
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["workers"] == 0 and run["config"]["format"] == "csv"  # file kept


@pytest.mark.parametrize("toml, message", [
    ("topk = 3\n", "unknown key 'topk'"),
    ("top_k = 'three'\n", "--top-k must be a whole number"),
    ("format = 'xlsx'\n", "--format must be one of parquet, csv"),
])
def test_bad_config_file_is_one_line_and_exit_2(cli, tmp_path, colour_folder, toml, message):
    folder, _ = colour_folder
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    result = cli("run", folder, "--config", config)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_missing_source_is_said_before_torch_is_imported(tmp_path):
    """Seven seconds of imports before "source not found" is a person's first minute."""
    probe = ("import sys\nfrom pipeline import cli\nsys.argv = ['label-images', 'run', "
             f"{str(tmp_path / 'nowhere')!r}]\ntry:\n    cli.main()\nexcept SystemExit as e:\n"
             "    print(e.code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=REPO)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert "source not found" in done.stderr


def test_exit_codes_and_one_line_errors_from_the_real_command(tmp_path, colour_checkpoint):
    missing = run_subprocess("run", tmp_path / "nowhere")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"label-images: error: source not found: {tmp_path / 'nowhere'}"]
    bad_flag = run_subprocess("run", tmp_path, "--top-k", "many")
    assert bad_flag.returncode == 2 and len(bad_flag.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad_flag.stderr
    folder = tmp_path / "imgs"
    write_colour_images(folder, 2)
    (tmp_path / "run").write_text("a file where the run directory should be")
    blocked = run_subprocess(*base_args(folder, tmp_path / "run", colour_checkpoint))
    assert blocked.returncode == 2  # bad input, as the README's table says, said at once
    assert blocked.stderr.strip() == (f"label-images: error: --out {tmp_path / 'run'} is a "
                                      "file: the output is a directory (the run directory, "
                                      "with the table in it); name another")
    assert (tmp_path / "run").read_text() == "a file where the run directory should be"


def test_a_second_run_on_the_same_directory_is_refused_while_the_first_holds_it(
        tmp_path, colour_checkpoint):
    from pipeline.rundir import RunDirectory

    folder = tmp_path / "imgs"
    write_colour_images(folder, 2)
    with RunDirectory(tmp_path / "run"):  # this test process plays the first run
        second = run_subprocess(*base_args(folder, tmp_path / "run", colour_checkpoint))
    assert second.returncode == 1
    assert "another label-images run" in second.stderr and "is using" in second.stderr
    third = run_subprocess(*base_args(folder, tmp_path / "run", colour_checkpoint))
    assert third.returncode == 0, third.stderr


def _commands(group, names=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a sub-app, such as `weights`
            yield from _commands(command, (*names, name))
        else:
            yield (*names, name), command


def test_every_option_help_is_shown_whole(cli):
    """Typer's Rich help reads square brackets as markup and drops what is inside them."""
    for names, command in _commands(typer.main.get_command(app)):
        result = cli(*names, "--help")
        assert result.exit_code == 0, result.output
        shown = " ".join(result.output.replace("│", " ").split())
        for param in command.params:
            written = " ".join((getattr(param, "help", None) or "").split())
            assert written in shown, (names, param.name)


def test_help_is_one_style_flags_take_no_value_and_h_and_version_work(cli):
    """Every command's help: -h as --help, defaults said one way ("(default: ...)", never
    Typer's "[default: ...]" beside ours), no value type shown for a flag, SOURCE and OUT as
    the placeholders; --version says the version."""
    from pipeline import __version__

    for names, command in _commands(typer.main.get_command(app)):
        long, short = cli(*names, "--help"), cli(*names, "-h")
        assert short.exit_code == 0 and short.output == long.output, names
        assert "[default:" not in long.output, names
        assert "<bool>" not in long.output, names
    assert "[SOURCE]" in cli("run", "-h").output and "{SOURCE}" in cli("bench", "-h").output
    assert "{OUT}" in cli("report", "-h").output
    model_help = " ".join(cli("run", "-h").output.replace("│", " ").split())
    assert "timm:NAME" in model_help and "torchvision classification model name" not in \
        model_help
    assert "torchvision's weights" not in cli("weights", "-h").output
    version = cli("--version")
    assert version.exit_code == 0 and version.output.strip() == f"label-images {__version__}"



def test_a_listing_that_takes_long_is_said_as_it_goes_and_a_quick_one_is_not(
        cli, tmp_path, colour_checkpoint, monkeypatch):
    """Planning lists the whole source before the first image: seconds at 10^7, minutes on
    a bucket, and it used to be silent. Past SAY_AFTER_SECONDS it is said, then its time."""
    import pipeline.job
    from pipeline import progress

    folder = tmp_path / "imgs"
    write_colour_images(folder, 3)
    args = [a for a in base_args(folder, tmp_path / "quick", colour_checkpoint) if a != "--quiet"]
    quick = cli(*args)
    assert quick.exit_code == 0 and "into the run's plan" not in quick.output
    real_listing = pipeline.job.listing

    def slow(*a, **k):
        time.sleep(1.5)  # a bucket's first page
        yield from real_listing(*a, **k)

    monkeypatch.setattr(pipeline.job, "listing", slow)
    monkeypatch.setattr(progress, "SAY_AFTER_SECONDS", 0.1)
    args = [a for a in base_args(folder, tmp_path / "slow", colour_checkpoint) if a != "--quiet"]
    slow_run = cli(*args)
    assert slow_run.exit_code == 0, slow_run.output
    said = [line for line in slow_run.output.splitlines() if "into the run's plan" in line]
    assert said[0] == f"label-images: listing {folder} into the run's plan ..."
    assert re.fullmatch(r"label-images: listing .* into the run's plan: done in (\d+\.\d) s",
                        said[1]) and float(said[1].split()[-2]) >= 1.5
    quiet = cli(*base_args(folder, tmp_path / "quiet", colour_checkpoint))
    assert quiet.exit_code == 0 and "into the run's plan" not in quiet.output


def test_dash_o_is_the_run_directory_as_it_always_was():
    """`--option` once took `-o` as well, and being declared later it won: `run SOURCE -o
    DIR` then failed as an option without NAME=VALUE. -o is --out's alone."""
    import typer.main

    from pipeline.cli import app

    command = typer.main.get_command(app).commands["run"]
    context = command.make_context("run", ["photos", "-o", "outputs/x"],
                                   resilient_parsing=True)
    assert context.params["out"] == "outputs/x" and not context.params["option"]
