"""Tonight's listing against the last table, out of core: the counts, what to label, the
removed keys and the new table's rows, whatever the batches the listing comes in."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import night_diff
from pipeline.errors import UsageError
from pipeline.night_diff import TONIGHT, NightDiff, items_to_label
from pipeline.storage import Store


def listed(keys, version="v"):
    return pa.table({"key": keys, "path": [f"/p/{k}" for k in keys],
                     "source_size": pa.array([1] * len(keys), pa.int64()),
                     "source_version": [version(k) if callable(version) else version
                                        for k in keys]})


def labels(keys, label):
    return listed(keys).append_column("status", pa.array(["ok"] * len(keys))).append_column(
        "top1_label", pa.array([f"{label}-{k}" for k in keys]))


def in_batches(table, size):
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


@pytest.fixture
def night(tmp_path, monkeypatch):
    """Last night: old0..old9. Tonight: old3 and old6 gone, old5 changed, new0..new2 added,
    in an order of its own, listed 3 items at a time."""
    monkeypatch.setattr(night_diff, "BATCH_ROWS", 3)
    pq.write_table(labels([f"old{i}" for i in range(10)], "before"), tmp_path / "prev.parquet",
                   row_group_size=4)
    order = ["new2", "old7", "old0", "old5", "new0", "old9", "old4", "old1", "new1", "old2",
             "old8"]
    tonight = listed(order, lambda k: "v2" if k == "old5" else "v")
    return tmp_path, order, tonight


def test_the_counts_what_to_label_and_what_is_gone(night):
    tmp_path, order, tonight = night
    store = Store(str(tmp_path))
    with NightDiff(store, iter(in_batches(tonight, 3)), "prev.parquet", "photos/") as diff:
        assert diff.items == 11
        assert diff.changes() == night_diff.Changes(new=3, changed=1, unchanged=7, removed=2)
        path, digest = diff.to_label()
        todo = pa.concat_tables(items_to_label(path))
        assert todo["key"].to_pylist() == ["new2", "old5", "new0", "new1"]  # listing order
        assert todo["source_version"].to_pylist() == ["v", "v2", "v", "v"]
        assert sorted(diff.removed().to_pylist()) == ["old3", "old6"]
        spill = diff.folder
    assert not os.path.exists(spill)  # the spool and DuckDB's spill are gone after
    # the same listing in other batches names the same night and the same increment
    with NightDiff(store, iter(in_batches(tonight, 5)), "prev.parquet", "photos/") as again:
        assert again.digest == diff.digest and again.to_label()[1] == digest


def test_the_new_table_in_listing_order_with_tonights_labels_and_last_nights(night):
    tmp_path, order, tonight = night
    store = Store(str(tmp_path))
    todo_keys = ["new2", "old5", "new0", "new1"]
    pq.write_table(labels(todo_keys, "tonight"), tmp_path / "new.parquet", row_group_size=2)
    template = pq.read_schema(tmp_path / "new.parquet")
    with NightDiff(store, iter(in_batches(tonight, 4)), "prev.parquet", "photos/") as diff:
        batches = list(diff.rows(template, str(tmp_path / "new.parquet"),
                                 ["key", "path", "source_size", "source_version"]))
    assert max(b.num_rows for b in batches) <= 3  # streamed, a batch at a time
    rows = pa.concat_tables(batches)
    assert rows["key"].to_pylist() == order
    assert rows["top1_label"].to_pylist() == [
        f"{'tonight' if k in todo_keys else 'before'}-{k}" for k in order]
    assert rows["source_version"].to_pylist() == tonight["source_version"].to_pylist()
    assert rows[TONIGHT].to_pylist() == [k in todo_keys for k in order]


def test_a_first_night_labels_everything_and_a_key_twice_is_refused(tmp_path):
    store = Store(str(tmp_path))
    with NightDiff(store, iter([listed(["a", "b"])]), None, "photos/") as diff:
        assert diff.changes() == night_diff.Changes(new=2)
        assert pa.concat_tables(items_to_label(diff.to_label()[0]))["key"].to_pylist() == [
            "a", "b"]
    with pytest.raises(UsageError, match=r"1 key\(s\) appear more than once in photos/ "
                                         r"\(e\.g\. 'a' \(items 1 and 3\)\)"):
        NightDiff(store, iter([listed(["a", "b"]), listed(["a"])]), None, "photos/")
    with pytest.raises(UsageError, match="no images in photos/"):
        NightDiff(store, iter([]), None, "photos/")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".spill-")] == []
