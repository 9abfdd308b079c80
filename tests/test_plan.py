"""The plan: streamed in as it is listed (memory a shard and a batch), files of bounded size,
keys checked out of core, nothing half-written left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import keys, plan as planning
from pipeline.errors import UsageError
from pipeline.storage import Store
from tests.conftest import FAST, REPO, read_output, write_colour_images


def batch(start: int, stop: int) -> pa.Table:
    names = [f"photos/IMG_{i:08d}.jpg" for i in range(start, stop)]
    return pa.table({"key": names, "path": [f"/data/{n}" for n in names]})


def test_the_listing_is_written_as_it_comes_never_held(tmp_path, monkeypatch):
    """Files of shards are committed while the listing is still going: what the writer holds
    is never more than a shard and the batch at hand."""
    monkeypatch.setattr(planning, "SHARDS_PER_FILE", 2)
    store = Store(str(tmp_path))
    writer = planning.PlanWriter(store, shard_size=10)
    for n in range(12):  # 12 batches of 7 items: 84 items, 9 shards, 5 files
        writer.write(batch(7 * n, 7 * n + 7))
        assert writer._pending_rows < 10  # full shards went out at once
        files = list((tmp_path / writer.folder).glob("items-*.parquet"))
        assert len(files) >= (7 * (n + 1) // 10 - 1) // 2  # every full file is on disk
    plan = writer.commit()
    assert (plan.num_items, plan.num_shards) == (84, 9)
    files = sorted((tmp_path / plan.folder).glob("items-*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [2, 2, 2, 2, 1]
    assert plan.read_shard(8, ["key"])["key"].to_pylist() == batch(80, 84)["key"].to_pylist()
    assert pa.concat_tables(plan.batches()).equals(
        pa.concat_tables([batch(0, 84)]).replace_schema_metadata(
            plan.read_shard(0).schema.metadata))
    record = json.loads((tmp_path / "plan.json").read_text())
    assert record == {"items": 84, "shard_size": 10, "folder": plan.folder, "files": 5}


def test_a_key_repeated_across_batches_is_refused_with_where_it_stands(tmp_path):
    listing = [batch(0, 5), pa.table({"key": ["photos/IMG_00000003.jpg", "new.jpg"],
                                      "path": ["/x", "/y"]})]
    with pytest.raises(UsageError) as refused:
        planning.freeze(iter(listing), Store(str(tmp_path)), 4, what="m.csv", noun="path")
    assert str(refused.value) == (
        "1 path(s) appear more than once in m.csv (e.g. 'photos/IMG_00000003.jpg' (items 4 "
        "and 6)); fix the manifest or pass --allow-duplicates")
    assert os.listdir(tmp_path / "plan") == [] and not (tmp_path / "plan.json").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".spill-")] == []
    allowed = planning.freeze(iter(listing), Store(str(tmp_path)), 4, allow_duplicates=True)
    assert allowed.num_items == 7


def test_distinct_keys_that_share_a_hash_pass_and_only_equal_keys_are_refused(
        tmp_path, monkeypatch):
    """Keys are grouped by a 64-bit hash first; with the hash narrowed to four values every
    key shares it with others, and only keys equal as strings are refused."""
    monkeypatch.setattr(keys, "KEY_HASH", "hash(key) % 4")
    distinct = [batch(0, 40)]
    assert planning.freeze(iter(distinct), Store(str(tmp_path / "a")), 8).num_items == 40
    repeated = [batch(0, 40), pa.table({"key": ["photos/IMG_00000007.jpg"], "path": ["/x"]})]
    with pytest.raises(UsageError) as refused:
        planning.freeze(iter(repeated), Store(str(tmp_path / "b")), 8, what="m.csv")
    assert str(refused.value).startswith(
        "1 key(s) appear more than once in m.csv (e.g. 'photos/IMG_00000007.jpg' (items 8 "
        "and 41))")


def test_an_empty_listing_and_a_failing_one_leave_nothing(tmp_path):
    with pytest.raises(UsageError, match="no images in the folder"):
        planning.freeze(iter([]), Store(str(tmp_path)), 4, what="the folder")

    def failing():
        yield batch(0, 9)
        raise UsageError("m.csv: empty path in column 'path' (line(s) 11)")

    with pytest.raises(UsageError, match="empty path"):
        planning.freeze(failing(), Store(str(tmp_path)), 4)
    assert not (tmp_path / "plan.json").exists() and os.listdir(tmp_path / "plan") == []


def test_a_plan_of_an_earlier_version_is_still_read(tmp_path):
    table = batch(0, 25).replace_schema_metadata({"label_images.shard_size": "10"})
    pq.write_table(table, tmp_path / "plan.parquet", row_group_size=10)
    plan = planning.load(Store(str(tmp_path)))
    assert (plan.num_items, plan.shard_size, plan.folder) == (25, 10, None)
    assert plan.read_shard(2, ["key"])["key"].to_pylist() == batch(20, 25)["key"].to_pylist()


def test_changes_since_the_plan_are_counted_out_of_core(tmp_path):
    planned = [batch(0, 50), batch(50, 100)]
    listed = [batch(10, 60), batch(60, 130)]  # 10 gone, 30 new
    moved = listed[0].set_column(1, "path", pc.binary_join_element_wise(
        listed[0]["path"], pa.array(["/moved"] * 3 + [""] * 47), ""))  # 3 at another path
    assert keys.changes(iter(planned), iter([moved, listed[1]]),
                        Store(str(tmp_path))) == (30, 3, 10)
    # with sizes and versions: a version that differs is a changed image; one unknown on
    # either side (null) is not counted
    versioned = [t.append_column("source_version", pa.array(
        [None if i % 10 == 0 else str(i % 7 == 0) for i in range(t.num_rows)], pa.string()))
        for t in planned]
    relisted = [t.append_column("source_version", pa.array(["False"] * t.num_rows))
                for t in planned]
    expected = sum(1 for i in range(50) if i % 10 and i % 7 == 0) * 2
    assert keys.changes(iter(versioned), iter(relisted), Store(str(tmp_path))) == (
        0, expected, 0)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".spill-")] == []


_KILLED_WHILE_PLANNING = """
import os, signal, sys
from pipeline import cli, plan
write = plan.PlanWriter._write_shard
seen = []
def dying(self, shard):
    seen.append(1)
    if len(seen) == 3:  # two shards out, the listing still going
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, shard)
plan.SHARDS_PER_FILE = 1
plan.PlanWriter._write_shard = dying
sys.argv = ["label-images", *sys.argv[1:]]
cli.main()
"""


def test_a_kill_while_planning_leaves_no_half_plan_and_the_rerun_plans_again(
        tmp_path, colour_checkpoint):
    folder, out = tmp_path / "imgs", tmp_path / "run"
    write_colour_images(folder, 10)
    args = ["run", str(folder), "--out", str(out), "--model", "resnet18", "--weights",
            str(colour_checkpoint), "--top-k", "2", "--shard-size", "2", "--batch-size", "2",
            "--workers", "0", "--runtime", "torch", "-q", *FAST]
    killed = subprocess.run([sys.executable, "-c", _KILLED_WHILE_PLANNING, *args], cwd=REPO,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "plan.json").exists()
    assert len(list((out / "plan").glob("*/items-*.parquet"))) == 1  # committed, not a plan
    again = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    table = read_output(out / "labels.parquet")
    assert sorted(table["key"]) == sorted(p.name for p in folder.iterdir())
    assert (table["status"] == "ok").all()
    assert len(os.listdir(out / "plan")) == 1  # the killed listing's files are gone
