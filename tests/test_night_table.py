"""A nightly table of many parts: a night rewrites only the parts its changes fall in,
readers open the folder as one table, and a night killed before or during its commit
leaves a table each key is in once, and a rerun that ends exactly as a run from scratch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import night_diff, night_table

from tests.conftest import REPO, colour_array, read_output, write_colour_images
from tests.test_incremental import assert_equals_scratch, job, night

PART_ROWS = 3  # parts of 3 to 6 images: 12 images make four


def parts(out):
    """Each part file's name -> (inode, mtime, sha256): what a rewrite changes."""
    folder = out / "labels.parquet"
    return {name: (os.stat(folder / name).st_ino, os.stat(folder / name).st_mtime_ns,
                   hashlib.sha256((folder / name).read_bytes()).hexdigest())
            for name in sorted(os.listdir(folder))}


def where(out, key):
    """The part file that holds key."""
    for name in sorted(os.listdir(out / "labels.parquet")):
        if key in pq.read_table(out / "labels.parquet" / name, columns=["key"])["key"].to_pylist():
            return name
    raise AssertionError(key)


def touch_up(folder, name, colour="blue"):
    """The image `name` rewritten (another colour, a later mtime): a changed image."""
    stat = os.stat(folder / name)
    Image.fromarray(colour_array(colour, 80, 60, seed=7)).save(folder / name)
    os.utime(folder / name, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(night_table, "PART_ROWS", PART_ROWS)
    monkeypatch.setenv("LABEL_IMAGES_PART_ROWS", str(PART_ROWS))  # for subprocesses


def test_a_night_rewrites_only_the_parts_its_changes_fall_in(cli, tmp_path, colour_checkpoint,
                                                             small_parts, monkeypatch):
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    truth = write_colour_images(folder, 12, seed=41)
    summary, _ = night(cli, folder, out, colour_checkpoint)
    before = parts(out)
    assert len(before) == 4 and summary["table_parts"]["written"] == 4
    index = json.loads((out / "parts.json").read_text())
    assert [p["rows"] for p in index["entries"]] == [3, 3, 3, 3]

    # tonight: one image changed in the second part, two new ones after every key
    changed = sorted(truth)[4]
    touch_up(folder, changed)
    write_colour_images(folder / "z-new", 2, seed=42)
    read = []
    real_old_part = night_diff.NightDiff._old_part

    def reading(diff, index):
        read.append(index)
        return real_old_part(diff, index)

    monkeypatch.setattr(night_diff.NightDiff, "_old_part", reading)
    summary, _ = night(cli, folder, out, colour_checkpoint)
    # the parts listed as last night were not even read: their digests matched
    assert read == [1, 3]
    assert summary["changes"] == {"new": 2, "changed": 1, "unchanged": 11, "removed": 0}
    after = parts(out)
    rewritten = {name for name in after if after[name] != before.get(name)}
    assert rewritten == {where(out, changed), where(out, "z-new/img_0000.jpg")}
    assert rewritten == {"part-000001.parquet", "part-000003.parquet"}
    assert summary["table_parts"] == {"total": 4, "written": 2, "rows_written": 8}
    assert_equals_scratch(cli, tmp_path, folder, out, colour_checkpoint, "2")

    # a removal empties nothing else: the first part only
    os.unlink(folder / sorted(truth)[0])
    unchanged = parts(out)
    summary, _ = night(cli, folder, out, colour_checkpoint)
    assert summary["changes"]["removed"] == 1 and summary["table_parts"]["written"] == 1
    assert {n for n, v in parts(out).items() if v != unchanged[n]} == {"part-000000.parquet"}
    assert_equals_scratch(cli, tmp_path, folder, out, colour_checkpoint, "3")


def test_readers_open_the_folder_as_one_table(cli, tmp_path, colour_checkpoint, small_parts):
    polars = pytest.importorskip("polars")
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    write_colour_images(folder, 10, seed=41)
    night(cli, folder, out, colour_checkpoint)
    table = out / "labels.parquet"
    index = json.loads((out / "parts.json").read_text())
    assert sorted(os.listdir(table)) == sorted(p["name"] for p in index["entries"])
    assert len(index["entries"]) == 4  # 10 images in parts of 3
    keys = sorted(os.listdir(folder))
    assert sorted(pd.read_parquet(table)["key"]) == keys
    assert sorted(k for (k,) in duckdb.sql(
        f"SELECT key FROM read_parquet('{table}')").fetchall()) == keys
    assert sorted(polars.read_parquet(f"{table}/*.parquet")["key"].to_list()) == keys
    assert sorted(pq.read_table(table)["key"].to_pylist()) == keys
    # the README's own lines, as written (Spark's: test_readers)
    duck, pandas_, polars_ = readme_readers()[:3]
    names = {"duckdb": duckdb, "pd": pd, "pl": polars}
    assert eval(duck.replace("runs/photos", str(out)), names).fetchall() == [(10,)]
    assert sorted(eval(pandas_.replace("runs/photos", str(out)), names)["key"]) == keys
    assert sorted(eval(polars_.replace("runs/photos", str(out)), names)["key"]) == keys
    report = cli("report", str(out))
    assert report.exit_code == 0 and "10 images" in report.output, report.output


def readme_readers() -> list[str]:
    """The Nightly job section's lines that open a nightly table: DuckDB, pandas, Polars,
    Spark."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Nightly job"):readme.index("## Report")]
    block = section[section.index("```python"):]
    block = block[len("```python"):block.index("```", 3)]
    lines = [line.split("  #")[0].strip() for line in block.strip().splitlines()]
    assert len(lines) == 4, lines
    return lines


def killed_night(folder, out, checkpoint, point, count):
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "killpoints.py"), point,
                             str(count), *job(folder, out, checkpoint, "--incremental")],
                            cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]


def test_a_night_killed_before_its_commit_leaves_last_nights_table(
        cli, tmp_path, colour_checkpoint, small_parts):
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    truth = write_colour_images(folder, 12, seed=41)
    night(cli, folder, out, colour_checkpoint)
    before = parts(out)
    touch_up(folder, sorted(truth)[1])
    touch_up(folder, sorted(truth)[10], "green")
    killed_night(folder, out, colour_checkpoint, "night-staged", 2)  # both parts staged
    assert parts(out) == before  # last night's table, every byte
    assert (out / ".night").exists() and not (out / "parts-commit.json").exists()
    summary, _ = night(cli, folder, out, colour_checkpoint)
    assert summary["changes"]["changed"] == 2 and not (out / ".night").exists()
    assert_equals_scratch(cli, tmp_path, folder, out, colour_checkpoint, "after")


def test_a_night_killed_mid_commit_is_finished_by_the_next(cli, tmp_path, colour_checkpoint,
                                                           small_parts):
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    truth = write_colour_images(folder, 12, seed=41)
    night(cli, folder, out, colour_checkpoint)
    touch_up(folder, sorted(truth)[1])
    touch_up(folder, sorted(truth)[10], "green")
    killed_night(folder, out, colour_checkpoint, "night-moved", 1)  # one of two parts moved
    assert (out / "parts-commit.json").exists()
    mid = read_output(out / "labels.parquet")  # a reader now: each key once, one part new
    assert sorted(mid["key"]) == sorted(truth)
    assert (mid["top1_label"] == "blue").sum() + (mid["top1_label"] == "green").sum() >= 1
    result = cli(*job(folder, out, colour_checkpoint, "--incremental"))
    assert result.exit_code == 0 and "nothing to do" in result.output, result.output
    assert not (out / "parts-commit.json").exists()
    assert_equals_scratch(cli, tmp_path, folder, out, colour_checkpoint, "after")


def test_a_part_grown_past_twice_its_size_is_cut_and_its_images_keep_their_labels(
        cli, tmp_path, colour_checkpoint, small_parts):
    """Tonight brings five more images into the second part's key range (3 + 5 > 6): the
    range is cut in three by its keys, its unchanged images keep last night's rows, its
    changed one is labelled again, and the table equals a run from scratch."""
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    truth = write_colour_images(folder, 12, seed=41)
    night(cli, folder, out, colour_checkpoint)
    second = json.loads((out / "parts.json").read_text())["entries"][1]
    assert second["low"] == sorted(truth)[3]
    for i, colour in enumerate(["red", "green", "blue", "grey", "red"]):
        Image.fromarray(colour_array(colour, 70, 50, seed=90 + i)).save(
            folder / f"{sorted(truth)[4]}-{i}.png")
    touch_up(folder, sorted(truth)[5], "green")
    summary, _ = night(cli, folder, out, colour_checkpoint)
    assert summary["changes"] == {"new": 5, "changed": 1, "unchanged": 11, "removed": 0}
    assert summary["table_parts"]["total"] == 6 and summary["labelled_now"] == 6
    # the new parts' names come after the others (names are never reused): compared by key
    scratch = tmp_path / "scratch"
    assert cli(*job(folder, scratch, colour_checkpoint)).exit_code == 0
    table, reference = (read_output(path / "labels.parquet").sort_values("key")
                        .reset_index(drop=True) for path in (out, scratch))
    for column in ("key", "path", "status", "top1_label", "source_version"):
        assert table[column].tolist() == reference[column].tolist(), column
    assert table["top1_score"].to_numpy() == pytest.approx(reference["top1_score"].to_numpy(),
                                                           abs=1e-6)


def test_a_plain_run_over_a_nightly_table_is_refused(cli, tmp_path, colour_checkpoint):
    """Without --incremental, a plan of tonight's listing beside last night's table said
    'nothing to do: ... is complete (6 rows)' over a table of 4."""
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    write_colour_images(folder, 4, seed=41)
    night(cli, folder, out, colour_checkpoint)
    write_colour_images(folder / "z", 2, seed=42)
    plain = cli(*job(folder, out, colour_checkpoint))
    assert plain.exit_code == 2 and "holds a nightly table" in plain.output, plain.output
    assert "--incremental" in plain.output and "--overwrite" in plain.output
    assert len(read_output(out / "labels.parquet")) == 4  # untouched
    summary, _ = night(cli, folder, out, colour_checkpoint)
    assert summary["changes"]["new"] == 2
