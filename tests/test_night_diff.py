"""Tonight's listing against the nightly table's parts: the counts, what to label, the
removed keys and the rows of the parts that changed, whatever the batches the listing
comes in."""

from __future__ import annotations

import bisect
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import night_diff, night_table
from pipeline.errors import UsageError
from pipeline.night_diff import TONIGHT, NightDiff, items_to_label
from pipeline.night_rows import PartRows
from pipeline.night_table import Index, Part
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


def parts_table(folder, parts):
    """A nightly table of parts (low, keys) in folder/labels.parquet, and its index."""
    index = Index([])
    for low, keys in parts:
        name = index.new_name()
        os.makedirs(folder / "labels.parquet", exist_ok=True)
        pq.write_table(labels(keys, "before"), folder / "labels.parquet" / name,
                       row_group_size=2)
        index.parts.append(Part(name, low, len(keys)))
    return index


@pytest.fixture
def night(tmp_path, monkeypatch):
    """Last night: old0..old9 in three parts (from "", "old5", "old8"). Tonight: old3 and
    old6 gone, old5 changed, new0..new2 added (all in the first part's range), in an order
    of its own, listed 3 items at a time. The third part has no change."""
    monkeypatch.setattr(night_diff, "BATCH_ROWS", 3)
    index = parts_table(tmp_path, [("", [f"old{i}" for i in range(5)]),
                                   ("old5", ["old5", "old6", "old7"]), ("old8", ["old8", "old9"])])
    order = ["new2", "old7", "old0", "old5", "new0", "old9", "old4", "old1", "new1", "old2",
             "old8"]
    tonight = listed(order, lambda k: "v2" if k == "old5" else "v")
    return tmp_path, order, tonight, index


@pytest.mark.parametrize("max_open", [64, 1])
def test_the_counts_what_to_label_and_what_is_gone(night, monkeypatch, max_open):
    """With one spool open at a time, a listing out of key order writes each part's rows
    in several segments: the same counts, order and digests."""
    monkeypatch.setattr(night_table.Writers, "MAX_OPEN", max_open)
    tmp_path, order, tonight, index = night
    store = Store(str(tmp_path))
    with NightDiff(store, iter(in_batches(tonight, 3)), index, "photos/") as diff:
        assert diff.items == 11
        assert any(len(rng.spool) > 1 for rng in diff.ranges) == (max_open == 1)
        assert diff.changes() == night_diff.Changes(new=3, changed=1, unchanged=7, removed=2)
        assert [rng.touched for rng in diff.ranges] == [True, True, False]
        path, digest = diff.to_label()
        todo = pa.concat_tables(items_to_label(path))
        # by part, then in listing order
        assert todo["key"].to_pylist() == ["new2", "new0", "new1", "old5"]
        assert todo["source_version"].to_pylist() == ["v", "v", "v", "v2"]
        assert sorted(diff.removed().to_pylist()) == ["old3", "old6"]
        spill = diff.folder
    assert not os.path.exists(spill)  # the spool and DuckDB's spill are gone after
    # the same listing in other batches names the same night and the same increment
    with NightDiff(store, iter(in_batches(tonight, 5)), index, "photos/") as again:
        assert again.digest == diff.digest and again.to_label()[1] == digest


def test_the_parts_that_changed_in_listing_order_with_tonights_labels_and_last_nights(night):
    tmp_path, order, tonight, index = night
    store = Store(str(tmp_path))
    todo_keys = ["new2", "new0", "new1", "old5"]  # to_label's order
    pq.write_table(labels(todo_keys, "tonight"), tmp_path / "new.parquet", row_group_size=2)
    template = pq.read_schema(tmp_path / "new.parquet")
    with NightDiff(store, iter(in_batches(tonight, 4)), index, "photos/") as diff:
        part_rows = PartRows(diff, template, str(tmp_path / "new.parquet"),
                             ["key", "path", "source_size", "source_version"])
        batches = list(part_rows)
    assert max(b.num_rows for _, b in batches) <= 3  # streamed, a batch at a time
    assert sorted({number for number, _ in batches}) == [0, 1]  # the third part is not read
    for number, keys in ((0, ["new2", "old0", "new0", "old4", "old1", "new1", "old2"]),
                         (1, ["old7", "old5"])):
        rows = pa.concat_tables([b for n, b in batches if n == number])
        assert rows["key"].to_pylist() == keys  # tonight's listing order within the part
        assert rows["top1_label"].to_pylist() == [
            f"{'tonight' if k in todo_keys else 'before'}-{k}" for k in keys]
        assert rows[TONIGHT].to_pylist() == [k in todo_keys for k in keys]
    assert part_rows.relabelled == 1 and part_rows.top1_changed == 1  # old5: before -> tonight


def test_a_range_too_large_for_a_part_is_cut_by_its_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(night_table, "PART_ROWS", 10)
    keys = [f"k{i:04d}" for i in range(95)]
    random.Random(3).shuffle(keys)
    with NightDiff(Store(str(tmp_path)), iter(in_batches(listed(keys), 7)), None,
                   "photos/") as diff:
        lows = [rng.low for rng in diff.ranges]
        assert lows[0] == "" and lows == sorted(lows) and len(lows) >= 8
        for rng, high in zip(diff.ranges, [*lows[1:], None]):
            held = night_table.read_whole_spool(rng.spool)["key"].to_pylist()
            assert all(rng.low <= k and (high is None or k < high) for k in held)
            assert len(held) <= 20 and len(held) == rng.rows
        assert sum(rng.rows for rng in diff.ranges) == 95


@pytest.mark.parametrize("seed", range(5))
def test_route_places_every_key_as_bisect_does(seed):
    """Against Python's own ordering of str: keys equal to a bound, prefixes of it,
    non-ASCII, empty, in batches of any size."""
    rng = random.Random(seed)
    alphabet = ["a", "b", "z", "/", "_", "\u00e9", "\u4e2d", "0"]
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
             for _ in range(400)]
    lows = ["", *sorted(set(rng.sample(words, 12)) - {""})]
    keys = [*words, *lows, *(low + "a" for low in lows), *(low[:-1] for low in lows if low)]
    expected = [bisect.bisect_right(lows, k) - 1 for k in keys]
    assert night_table.route(pa.array(keys), lows).tolist() == expected


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


def test_the_cuts_come_from_a_bounded_sample_and_make_even_parts(monkeypatch):
    """100,000 keys out of order, a sample held to 20,000 keys (its step doubles three
    times as the keys come): 100 parts of about 1,000 keys each."""
    monkeypatch.setattr(night_table, "PART_ROWS", 1_000)
    monkeypatch.setattr(night_table, "SAMPLE_KEYS", 20_000)
    keys = [f"photos/{i:07d}.jpg" for i in range(100_000)]
    random.Random(5).shuffle(keys)
    batches = [pa.array(keys[i:i + 777]) for i in range(0, len(keys), 777)]
    lows = ["", *night_table.split_lows(iter(batches), "")]
    assert len(lows) == 100 and lows == sorted(set(lows))
    sizes = np.bincount(night_table.route(pa.array(keys), lows))
    assert sizes.sum() == 100_000 and 600 <= sizes.min() and sizes.max() <= 1_500
