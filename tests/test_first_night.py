"""What bites a new user on the first night: a stale nightly job, the default top-k on a
small model, the summary's figures and words, the report naming the run, integer sizes."""

from __future__ import annotations

import json
import os
import re

import pytest
from PIL import Image

from pipeline.config import read_toml, resolve
from tests.conftest import FAST, REPO, colour_array, write_colour_images


def job(folder, out, checkpoint, *extra):
    return ("run", folder, "--out", out, "--model", "resnet18", "--weights", checkpoint,
            "--workers", "0", "--batch-size", "4", "-q", *FAST, *extra)


def test_the_nightly_config_is_incremental():
    values = read_toml(str(REPO / "configs" / "nightly.toml"))
    assert resolve(values, {}).incremental


def test_a_finished_run_rerun_over_a_changed_source_says_so_and_what_to_use(
        cli, tmp_path, colour_checkpoint):
    folder, out = tmp_path / "imgs", tmp_path / "run"
    write_colour_images(folder, 5)
    first = cli(*job(folder, out, colour_checkpoint, "--top-k", "2"))
    assert first.exit_code == 0, first.output
    same = cli(*job(folder, out, colour_checkpoint, "--top-k", "2"))
    assert "nothing to do" in same.output and "changed" not in same.output
    write_colour_images(folder / "more", 2, seed=7)  # 2 new images
    photos = sorted(folder.glob("*.png"))
    photos[0].unlink()  # 1 gone
    changed = photos[1]  # and 1 changed under its name (issue 44: it went uncounted)
    stat = changed.stat()
    Image.fromarray(colour_array("blue", 70, 50, seed=9)).save(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = cli(*job(folder, out, colour_checkpoint, "--top-k", "2"))
    assert again.exit_code == 0, again.output
    line, = [text for text in again.output.splitlines() if "nothing to do" in text]
    assert "has changed since this run was planned (2 new, 1 changed, 1 removed)" in line
    assert "rerun with --incremental to label only what is new or changed" in line
    # what it says to do works: the plain run's table is taken over, only 3 images labelled
    switched = cli(*job(folder, out, colour_checkpoint, "--top-k", "2", "--incremental"))
    assert switched.exit_code == 0, switched.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["changes"] == {"new": 2, "changed": 1, "unchanged": 3, "removed": 1}
    assert summary["labelled_now"] == 3
    import pandas as pd

    assert len(pd.read_parquet(out / "labels.parquet")) == 6


def test_the_default_top_k_fits_a_small_model_and_only_an_asked_one_is_refused(
        cli, tmp_path, colour_checkpoint):
    """The colour checkpoint has 4 classes: no --top-k gives 4 labels; --top-k 5 is refused."""
    folder, out = tmp_path / "imgs", tmp_path / "run"
    write_colour_images(folder, 3)
    done = cli(*job(folder, out, colour_checkpoint))
    assert done.exit_code == 0, done.output
    import pandas as pd

    table = pd.read_parquet(out / "labels.parquet")
    assert all(len(labels) == 4 for labels in table["labels"])
    assert json.loads((out / "run.json").read_text())["fingerprint"]["top_k"] == 4
    asked = cli(*job(folder, tmp_path / "other", colour_checkpoint, "--top-k", "5"))
    assert asked.exit_code == 2 and "--top-k 5 is more than the model's 4 classes" in \
        asked.output


@pytest.mark.parametrize("flag,value,message", [
    ("--model", "resnet5O", "unknown model"),
    ("--weights", "/no/such/weights.pth", "--weights file not found"),
    ("--device", "cuda:7", "--device cuda:7"),
])
def test_model_weights_and_device_are_checked_before_the_source_is_listed(
        cli, tmp_path, colour_checkpoint, monkeypatch, flag, value, message):
    """A listing of a large bucket takes minutes: a typo must not wait for it."""
    import pipeline.job

    listed = []
    monkeypatch.setattr(pipeline.job, "listing",
                        lambda *args, **kwargs: listed.append(args) or 1 / 0)
    write_colour_images(tmp_path / "imgs", 2)
    flags = {"--model": "resnet18", "--weights": str(colour_checkpoint), "--device": "cpu",
             flag: value}
    refused = cli("run", tmp_path / "imgs", "--out", tmp_path / "run", "-q",
                  *[part for pair in flags.items() for part in pair])
    assert refused.exit_code == 2 and message in refused.output, refused.output
    assert listed == []


def test_the_summary_says_the_whole_time_and_counts_in_words_and_the_report_names_the_run(
        cli, tmp_path, colour_checkpoint):
    folder, out = tmp_path / "imgs", tmp_path / "run"
    write_colour_images(folder, 3)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    done = cli(*job(folder, out, colour_checkpoint))
    assert done.exit_code == 0, done.output
    line = done.output.strip().splitlines()[-1]
    assert "3 ok, 1 error;" in line  # not "1 errors"
    loop, whole = (float(x) for x in re.search(r"labelled 4 in ([\d.]+) s at .* ([\d.]+) s in "
                                               r"all", line).groups())
    summary = json.loads((out / "summary.json").read_text())
    # the whole command (model loading, measuring, the merge) is more than the loop's part
    assert whole >= loop and summary["wall_seconds"] > summary["loop_seconds"]
    report = cli("report", out, "--html", tmp_path / "page.html")
    assert report.exit_code == 0, report.output
    started = json.loads((out / "run.json").read_text())["started_at"]
    for text in (report.output, (tmp_path / "page.html").read_text()):
        assert "4 images: 3 ok, 1 error" in text and "1 errors" not in text
        assert "resnet18" in text and str(colour_checkpoint) in text and started in text
        assert str(folder) in text


def test_the_readme_says_how_to_keep_width_and_height_integers_in_pandas(
        cli, tmp_path, colour_checkpoint):
    """pandas reads nullable int32 columns as float64; the README's way keeps them ints."""
    import pandas as pd

    readme = (REPO / "README.md").read_text()
    call, = re.findall(r'`(pd\.read_parquet\(path, dtype_backend="numpy_nullable"\))`', readme)
    folder, out = tmp_path / "imgs", tmp_path / "run"
    write_colour_images(folder, 2)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    assert cli(*job(folder, out, colour_checkpoint)).exit_code == 0
    assert pd.read_parquet(out / "labels.parquet")["width"].dtype == "float64"  # the bite
    table = eval(call, {"pd": pd, "path": out / "labels.parquet"})
    assert str(table["width"].dtype) == "Int32" and str(table["height"].dtype) == "Int32"
    assert table["width"].isna().sum() == 1 and table["width"].dropna().min() > 0


def test_the_summary_says_when_decoding_held_the_model_back():
    from pipeline.summary import RunSummary

    waited = RunSummary(output="o", items=10, ok=10, labelled_now=10, loop_seconds=2.0,
                        load_seconds=1.5, seconds=3.0)
    assert "decoding was the bottleneck (75% of the loop waiting for batches)" in waited.line()
    fed = RunSummary(output="o", items=10, ok=10, labelled_now=10, loop_seconds=2.0,
                     load_seconds=0.2, seconds=3.0)
    assert "bottleneck" not in fed.line()
