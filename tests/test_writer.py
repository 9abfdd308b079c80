"""Part files, atomic commit, the plan's shards and the streaming merge."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import formats, plan as planning
from pipeline import rundir
from pipeline.storage import Store, atomic_path, remove_temporaries
from pipeline.writer import ShardResult, merge_parts, output_schema, part_table, write_part

CATEGORIES = ["cat", "dog", "eel"]
ODD_KEYS = ["plain.jpg", "with space.jpg", "comma,name.jpg", 'quote"name.jpg',
            "new\nline.jpg", "n\u00e4me-\u65e5\u672c.jpg"]


def shard_rows(keys, extra=None):
    columns = {"key": keys, "path": [f"/data/{k}" for k in keys], **(extra or {})}
    return pa.table(columns)


def result_for(n, failed=()):
    result = ShardResult.empty(n, 2)
    for i in range(n):
        if i in failed:
            result.errors[i] = "not a readable image"
        else:
            result.ok[i] = True
            result.class_ids[i] = [i % 3, (i + 1) % 3]
            result.scores[i] = [0.7, 0.2]
            result.width[i], result.height[i] = 640, 480
    return result


def schema(extra=pa.schema([])):
    return output_schema(2, extra, {"label_images.model": "m", "label_images.weights": "w"})


def test_part_rows_carry_labels_or_an_error_never_both():
    table = part_table(shard_rows(["a", "b", "c"]), result_for(3, failed={1}), CATEGORIES,
                       schema()).to_pylist()
    assert table[0]["labels"] == ["cat", "dog"] and table[0]["class_ids"] == [0, 1]
    assert table[0]["top1_label"] == "cat" and table[0]["error"] is None
    assert table[1]["status"] == "error" and table[1]["error"] == "not a readable image"
    assert table[1]["labels"] is None and table[1]["top1_score"] is None
    assert table[1]["width"] is None
    assert table[2]["labels"] == ["eel", "cat"]


def test_atomic_path_leaves_nothing_visible_when_writing_fails(tmp_path):
    target = tmp_path / "parts" / "part-000000.parquet"
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert not target.exists()
    assert list((tmp_path / "parts").iterdir()) == []
    assert rundir.committed_shards(Store(str(tmp_path))) == set()


def refuse_fsync_on_directories(monkeypatch, code: int) -> None:
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_file_system_that_cannot_fsync_a_directory_still_commits(tmp_path, monkeypatch):
    refuse_fsync_on_directories(monkeypatch, errno.EINVAL)  # as CIFS did before Linux 4.17
    target = tmp_path / "part-000001.parquet"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"rows")
    assert target.read_bytes() == b"rows"


def test_an_io_error_syncing_the_directory_still_stops_the_commit(tmp_path, monkeypatch):
    refuse_fsync_on_directories(monkeypatch, errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_path(tmp_path / "part-000001.parquet") as tmp:
            tmp.write_bytes(b"rows")


def test_only_committed_parts_count_and_temporaries_are_cleaned(tmp_path):
    store = Store(str(tmp_path))
    write_part(store, rundir.part_name(3), part_table(
        shard_rows(["a"]), result_for(1), CATEGORIES, schema()))
    leftover = tmp_path / "parts" / ".part-000004.parquet.tmp-999-ab12"
    leftover.write_bytes(b"killed mid-write")
    assert rundir.committed_shards(store) == {3}
    remove_temporaries(tmp_path / "parts")
    assert not leftover.exists() and (tmp_path / rundir.part_name(3)).exists()


def test_plan_shards_are_row_groups_and_survive_reload(tmp_path):
    items = pa.table({"key": [f"k{i}" for i in range(25)], "path": [f"p{i}" for i in range(25)]})
    plan = planning.freeze(items, Store(str(tmp_path)), shard_size=10)
    assert plan.num_shards == 3 and plan.shard_bounds(2) == (20, 25)
    again = planning.load(Store(str(tmp_path)))
    assert again.shard_size == 10  # the frozen size wins over whatever is asked later
    assert again.read_shard(1, ["key"])["key"].to_pylist() == [f"k{i}" for i in range(10, 20)]


def test_a_plan_is_frozen_once_whoever_lists_later(tmp_path):
    """Two slices starting together: the second's listing (one more image) does not replace
    the plan the first is already labelling."""
    first = pa.table({"key": ["a", "b"], "path": ["a", "b"]})
    later = pa.table({"key": ["a", "b", "c"], "path": ["a", "b", "c"]})
    planning.freeze(first, Store(str(tmp_path)), shard_size=10)
    plan = planning.freeze(later, Store(str(tmp_path)), shard_size=10)
    assert plan.num_items == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan", "plan.json"]  # no temporary
    assert [p.name for p in (tmp_path / "plan").iterdir()] == [plan.folder.split("/")[1]]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_merge_streams_parts_in_order_and_odd_names_round_trip(tmp_path, fmt):
    extra = pa.schema([pa.field("caption", pa.string())])
    keys = [ODD_KEYS[:3], ODD_KEYS[3:]]
    parts = []
    store = Store(str(tmp_path))
    for shard, shard_keys in enumerate(keys):
        rows = shard_rows(shard_keys, {"caption": [f"c,{k}" for k in shard_keys]})
        write_part(store, rundir.part_name(shard),
                   part_table(rows, result_for(3, failed={2}), CATEGORIES, schema(extra)))
        parts.append(rundir.part_name(shard))
    out = tmp_path / f"labels.{fmt}"
    counts = merge_parts(store, parts, formats.get(fmt))
    assert (counts.rows, counts.ok, counts.errors) == (6, 4, 2)
    if fmt == "parquet":
        table = pd.read_parquet(out)
        assert pq.read_schema(out).metadata[b"label_images.model"] == b"m"
        assert table["labels"][0].tolist() == ["cat", "dog"]
    else:
        table = pd.read_csv(out, dtype=str, keep_default_na=False)
        assert table.columns.tolist()[8:] == ["label_1", "label_2", "score_1", "score_2",
                                              "class_id_1", "class_id_2", "caption"]
        assert table["label_1"].tolist()[:2] == ["cat", "dog"]
        assert table["label_1"][2] == ""  # an error row has no labels
    assert table["key"].tolist() == ODD_KEYS
    assert table["path"].tolist() == [f"/data/{k}" for k in ODD_KEYS]
    assert table["caption"].tolist() == [f"c,{k}" for k in ODD_KEYS]


def test_merge_output_has_large_row_groups(tmp_path, monkeypatch):
    from pipeline import writer
    monkeypatch.setattr(writer, "MERGE_ROW_GROUP", 4)
    parts = []
    store = Store(str(tmp_path))
    for shard in range(4):
        write_part(store, rundir.part_name(shard), part_table(
            shard_rows([f"{shard}-{i}" for i in range(2)]), result_for(2), CATEGORIES, schema()))
        parts.append(rundir.part_name(shard))
    merge_parts(store, parts, formats.get("parquet"))
    meta = pq.ParquetFile(tmp_path / "labels.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4]
    assert np.array_equal(pq.read_table(tmp_path / "labels.parquet")["key"].to_pylist(),
                          [f"{s}-{i}" for s in range(4) for i in range(2)])


def test_merge_refuses_a_part_with_the_wrong_row_count_before_committing(tmp_path):
    from pipeline.errors import RunError

    store = Store(str(tmp_path))
    write_part(store, rundir.part_name(0), part_table(
        shard_rows(["a", "b"]), result_for(2), CATEGORIES, schema()))
    with pytest.raises(RunError, match="has 2 rows for a shard of 3"):
        merge_parts(store, [rundir.part_name(0)], formats.get("parquet"),
                    expected_rows=[3])
    assert not (tmp_path / "labels.parquet").exists()


def test_a_full_disk_while_merging_is_not_blamed_on_a_part(tmp_path, monkeypatch):
    """Writing the table fails: the error is the disk's, and no good part is called damaged."""
    import errno
    import os

    from pipeline import writer
    monkeypatch.setattr(writer, "MERGE_ROW_GROUP", 1)  # write while the part is being read
    store = Store(str(tmp_path))
    write_part(store, rundir.part_name(0), part_table(
        shard_rows(["a", "b"]), result_for(2), CATEGORIES, schema()))

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        merge_parts(store, [rundir.part_name(0)], formats.get("parquet"))
    assert not (tmp_path / "labels.parquet").exists()
    assert (tmp_path / rundir.part_name(0)).exists()


@pytest.mark.parametrize("damaged", [0, 1], ids=["first-part", "later-part"])
def test_a_damaged_part_is_named_wherever_it_is(tmp_path, damaged):
    from pipeline.errors import RunError

    store = Store(str(tmp_path))
    parts = [rundir.part_name(shard) for shard in range(2)]
    for shard, name in enumerate(parts):
        write_part(store, name, part_table(shard_rows([f"{shard}a", f"{shard}b"]),
                                           result_for(2), CATEGORIES, schema()))
    (tmp_path / parts[damaged]).write_bytes(b"PAR1 garbage")
    with pytest.raises(RunError, match=f"{parts[damaged]} cannot be read"):
        merge_parts(store, parts, formats.get("parquet"))
    assert not (tmp_path / "labels.parquet").exists()


def test_labels_are_written_with_dictionaries_and_keys_without(tmp_path):
    """Our Parquet options name the columns as Parquet does (a list's values are
    `labels.list.element`): were the names wrong, pyarrow would quietly write every column
    plain. Keys and scores, nearly all distinct, get no dictionary; what readers skip row
    groups by (scalar columns) keeps its statistics. The rows read back as written."""
    keys = [f"img{i:03d}.jpg" for i in range(300)]
    extra = pa.schema([pa.field("camera", pa.string())])
    table = part_table(shard_rows(keys, {"camera": [f"cam{i % 2}" for i in range(300)]}),
                       result_for(300, failed={7}), CATEGORIES, schema(extra))
    store = Store(str(tmp_path))
    write_part(store, "part.parquet", table)
    meta = pq.ParquetFile(tmp_path / "part.parquet").metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    dictionary = {path for path, column in columns.items()
                  if "RLE_DICTIONARY" in column.encodings}
    assert dictionary == {"status", "error", "width", "height", "top1_label",
                          "labels.list.element", "class_ids.list.element", "camera"}
    assert {path for path, column in columns.items() if column.is_stats_set} == {
        "key", "path", "status", "error", "width", "height", "top1_label", "top1_score",
        "camera"}
    assert pq.read_table(tmp_path / "part.parquet").equals(table)
