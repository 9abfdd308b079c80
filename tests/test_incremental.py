"""Incremental nightly runs: each night's table equals a from-scratch run on the same folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from pipeline import labeller

from tests.conftest import REPO, colour_array, read_output, write_colour_images


def job(folder, out, checkpoint, *extra):
    # one runtime for every night and scratch run: `auto` may choose another one from run to
    # run (by a measurement), and runtimes agree within their tolerance (test_fidelity), not
    # to the 1e-6 that the comparison with a scratch run asks of the same computation
    return ["run", str(folder), "--out", str(out), "--model", "resnet18", "--weights",
            str(checkpoint), "--top-k", "2", "--shard-size", "4", "--batch-size", "4",
            "--workers", "0", "--resize", "72", "--crop", "64", "--runtime", "torch", "--quiet",
            *extra]


def night(cli, folder, out, checkpoint, *extra):
    result = cli(*job(folder, out, checkpoint, "--incremental", *extra))
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text()), result.output


def assert_equals_scratch(cli, tmp_path, folder, out, checkpoint, name):
    scratch = tmp_path / f"scratch-{name}"
    assert cli(*job(folder, scratch, checkpoint)).exit_code == 0
    table, reference = read_output(out / "labels.parquet"), read_output(
        scratch / "labels.parquet")
    for column in ("key", "path", "status", "error", "top1_label"):
        assert table[column].tolist() == reference[column].tolist(), column
    assert table["top1_score"].to_numpy() == __import__("pytest").approx(
        reference["top1_score"].to_numpy(), abs=1e-6, nan_ok=True)  # error rows: NaN
    assert not (out / "increments").exists()


def test_three_nights_add_modify_delete(cli, tmp_path, colour_checkpoint):
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    truth = write_colour_images(folder, 10, seed=41)
    summary, _ = night(cli, folder, out, colour_checkpoint)
    assert summary["changes"] == {"new": 10, "changed": 0, "unchanged": 0, "removed": 0}
    assert_equals_scratch(cli, tmp_path, folder, out, colour_checkpoint, "1")

    # night 2: three new images, one modified (now blue), one deleted
    write_colour_images(folder / "new", 3, seed=42)
    modified = sorted(truth)[2]
    stat = os.stat(folder / modified)
    Image.fromarray(colour_array("blue", 80, 60, seed=7)).save(folder / modified)
    os.utime(folder / modified, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    os.unlink(folder / sorted(truth)[5])
    summary, _ = night(cli, folder, out, colour_checkpoint)
    assert summary["changes"] == {"new": 3, "changed": 1, "unchanged": 8, "removed": 1}
    assert summary["labelled_now"] == 4  # only what is new or changed was computed
    table = read_output(out / "labels.parquet").set_index("key")
    assert table.loc[modified, "top1_label"] == "blue"
    assert_equals_scratch(cli, tmp_path, folder, out, colour_checkpoint, "2")

    # night 3: nothing changed
    summary_before = (out / "summary.json").read_text()
    result = cli(*job(folder, out, colour_checkpoint, "--incremental"))
    assert result.exit_code == 0 and "nothing to do" in result.output
    assert "0 new, 0 changed, 12 unchanged, 0 removed" in result.output
    assert (out / "summary.json").read_text() == summary_before
    assert_equals_scratch(cli, tmp_path, folder, out, colour_checkpoint, "3")


def test_a_model_change_is_refused_for_an_incremental_table(cli, tmp_path, colour_checkpoint):
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    write_colour_images(folder, 3)
    night(cli, folder, out, colour_checkpoint)
    refused = cli(*job(folder, out, colour_checkpoint, "--incremental", "--top-k", "3"))
    assert refused.exit_code == 2
    assert "never mixes two models" in refused.output and "--overwrite" in refused.output


def test_killed_mid_night_then_resumed(cli, tmp_path, colour_checkpoint):
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    write_colour_images(folder, 6, seed=43)
    night(cli, folder, out, colour_checkpoint)
    write_colour_images(folder / "tonight", 24, seed=44)
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "killpoints.py"),
                             "part-mid-write", "3",
                             *job(folder, out, colour_checkpoint, "--incremental")],
                            cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(read_output(out / "labels.parquet")) == 6  # last night's table is untouched
    summary, _ = night(cli, folder, out, colour_checkpoint)
    assert summary["changes"]["new"] == 24
    assert summary["labelled_now"] < 24  # the committed shards of the killed night were kept
    assert_equals_scratch(cli, tmp_path, folder, out, colour_checkpoint, "resumed")


def test_a_name_that_is_not_utf8_is_seen_unchanged_the_next_night(cli, tmp_path,
                                                                    colour_checkpoint):
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    write_colour_images(folder, 2, seed=43)
    latin1 = folder / os.fsdecode(b"caf\xe9.jpg")
    Image.fromarray(colour_array("red", 70, 50, seed=3)).save(latin1)
    night(cli, folder, out, colour_checkpoint)
    row = read_output(out / "labels.parquet").set_index("key").loc["caf\\xe9.jpg"]
    assert row["top1_label"] == "red" and row["source_size"] == latin1.stat().st_size
    _, output = night(cli, folder, out, colour_checkpoint)
    assert "nothing to do: 0 new, 0 changed, 3 unchanged, 0 removed" in output


@pytest.mark.parametrize("fmt", ["parquet", "csv", "delta"])
def test_a_plain_runs_table_becomes_nightly_without_labelling_it_again(
        cli, tmp_path, colour_checkpoint, monkeypatch, fmt):
    """Issue 44: a plain run, then --incremental, relabelled everything (or refused). Every
    run over a folder records each image's size and version, so the first night labels only
    what is new or changed, whatever the format, and equals a run from scratch."""
    folder, out = tmp_path / "photos", tmp_path / "run"
    truth = write_colour_images(folder, 8, seed=43)
    done = cli(*job(folder, out, colour_checkpoint, "--format", fmt))
    assert done.exit_code == 0, done.output
    write_colour_images(folder / "new", 2, seed=44)
    modified = sorted(truth)[1]
    stat = os.stat(folder / modified)
    Image.fromarray(colour_array("blue", 80, 60, seed=8)).save(folder / modified)
    os.utime(folder / modified, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    os.unlink(folder / sorted(truth)[4])
    labelled = []
    real_label = labeller.label

    def counting(run_dir, job_, plan, *args, **kwargs):
        labelled.append(plan.num_items)
        return real_label(run_dir, job_, plan, *args, **kwargs)

    monkeypatch.setattr(labeller, "label", counting)
    summary, _ = night(cli, folder, out, colour_checkpoint, "--format", fmt)
    assert summary["changes"] == {"new": 2, "changed": 1, "unchanged": 6, "removed": 1}
    assert labelled == [3] and summary["labelled_now"] == 3
    scratch = tmp_path / "scratch"
    assert cli(*job(folder, scratch, colour_checkpoint, "--format", fmt)).exit_code == 0
    name = {"parquet": "labels.parquet", "csv": "labels.csv", "delta": "labels.delta"}[fmt]
    table, reference = (_read(fmt, where / name) for where in (out, scratch))
    assert table["key"].tolist() == reference["key"].tolist()
    assert table["top1_label"].tolist() == reference["top1_label"].tolist()
    assert table.set_index("key").loc[modified, "top1_label"] == "blue"
    assert table["top1_score"].to_numpy() == pytest.approx(reference["top1_score"].to_numpy(),
                                                           abs=1e-6)


def _read(fmt: str, path):
    if fmt == "delta":
        import deltalake

        return deltalake.DeltaTable(str(path)).to_pandas().sort_values("key", ignore_index=True)
    return read_output(path)


def test_a_plain_manifest_run_is_taken_over_by_labelling_it_once(cli, tmp_path,
                                                                 colour_checkpoint):
    """A manifest lists no versions: a plain run over it records none, so the first night
    says it labels every image once, and the nights after label only what changed."""
    folder, out = tmp_path / "photos", tmp_path / "run"
    truth = write_colour_images(folder, 5, seed=45)
    manifest = tmp_path / "photos.csv"
    manifest.write_text("path\n" + "".join(f"{folder / key}\n" for key in sorted(truth)))
    assert cli(*job(manifest, out, colour_checkpoint)).exit_code == 0
    summary, said = night(cli, manifest, out, colour_checkpoint)
    assert "records no image versions" in said
    assert summary["labelled_now"] == 5 and summary["changes"]["unchanged"] == 0
    assert cli(*job(manifest, tmp_path / "scratch", colour_checkpoint)).exit_code == 0
    assert_equals_scratch(cli, tmp_path, manifest, out, colour_checkpoint, "m")
    again = cli(*job(manifest, out, colour_checkpoint, "--incremental"))
    assert again.exit_code == 0 and "0 new, 0 changed, 5 unchanged, 0 removed" in again.output
