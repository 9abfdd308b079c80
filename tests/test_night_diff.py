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

from pipeline import night_diff, night_rows, night_table
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


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ordered", [True, False])
def test_each_key_is_found_where_it_stands_in_last_nights_part(seed, ordered):
    """Against a dict: a part's keys in order (a listing in key order) are searched, in
    any other order hashed; tonight's keys in any order, absent, before the first and after
    the last, prefixes of a key, non-ASCII, empty, repeated, in several chunks."""
    rng = random.Random(seed)
    alphabet = ["a", "b", "ab", "\u00e9", "\u65e5", "z"]
    words = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
                    for _ in range(300)})
    held = sorted(rng.sample(words, len(words) // 2))
    if not ordered:
        rng.shuffle(held)
    needles = [*words, *rng.sample(held, 20), "zzzzz", held[0] + "a"]
    rng.shuffle(needles)
    where = {key: row for row, key in enumerate(held)}
    found = night_diff._positions(pa.chunked_array([needles[:100], needles[100:]]),
                                  pa.array(held))
    assert night_diff._ascending(pa.array(held)) == ordered
    assert found.type == pa.int32()
    assert found.to_pylist() == [where.get(needle) for needle in needles]


def rows_table(n):
    return pa.table({"key": [f"k{i:04d}" for i in range(n)],
                     "labels": [[f"l{i}", "x"] for i in range(n)]})


@pytest.mark.parametrize("numbers", ["all", "a few gone", "many gone", "shuffled", "one"])
def test_last_nights_rows_come_by_number_as_pyarrow_takes_them(tmp_path, numbers):
    """Runs of consecutive rows (last night's, between tonight's changes) are sliced from
    the row groups, across their edges; past MAX_RUNS runs, or out of order, rows are
    gathered by number: either way the rows pyarrow's own take gives."""
    table = rows_table(1000)
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=64)
    draw = np.random.default_rng(7)
    wanted = {"all": np.arange(1000),
              "a few gone": np.delete(np.arange(1000), draw.choice(1000, 9, replace=False)),
              "many gone": np.delete(np.arange(1000), draw.choice(1000, 400, replace=False)),
              "shuffled": draw.permutation(1000),
              "one": np.array([517])}[numbers]
    rows = night_rows._Rows(str(tmp_path / "part.parquet"), ["key", "labels"])
    try:
        taken = rows.take(wanted)
    finally:
        rows.close()
    assert taken.equals(table.take(pa.array(wanted)))


@pytest.mark.parametrize("switches", [0, 1, 30, 600])
def test_tonights_and_last_nights_rows_interleave_in_listing_order(switches):
    """Where the mask says tonight's, the next of tonight's rows, else the next of last
    night's: as slices when they switch seldom, gathered past MAX_RUNS switches."""
    draw = np.random.default_rng(switches)
    mask = np.zeros(2000, bool)
    for edge in np.sort(draw.choice(np.arange(1, 2000), switches, replace=False)):
        mask[edge:] = ~mask[edge:]
    first, second = rows_table(int(mask.sum())), rows_table(int((~mask).sum()))
    second = second.set_column(0, "key", pa.array([f"old{i}" for i in range(len(second))]))
    made = night_rows._interleave(mask, first, second)
    expected, taken = [], [iter(first["key"].to_pylist()), iter(second["key"].to_pylist())]
    for tonight in mask:
        expected.append(next(taken[0] if tonight else taken[1]))
    assert made["key"].to_pylist() == expected
    assert made["labels"].num_chunks == (1 if switches >= night_rows.MAX_RUNS
                                         else switches + 1)


def test_a_part_whose_write_fails_is_raised_and_never_appears(tmp_path, monkeypatch):
    """Batches are encoded on another thread: a full disk there is raised by the writer
    (at the next batch or at close), and the staged part is not left behind."""
    from benchmarks.night import items, labelled
    written = []

    def full_disk(self, table, *args, **kwargs):
        written.append(table.num_rows)
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        return original(self, table, *args, **kwargs)

    original = pq.ParquetWriter.write_table
    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    writer = night_table.PartWriter(Store(str(tmp_path)), "staged/part-000000.parquet",
                                    labelled(items(np.arange(1))).schema)
    with pytest.raises(OSError, match="No space left"):
        for start in range(0, 300, 100):
            writer.write(labelled(items(np.arange(start, start + 100))))
        writer.close("part-000000.parquet", "", "tonight")
    writer.abort()
    assert written == [100, 100]  # the third batch waited for the second, and stopped
    assert not [name for _, _, names in os.walk(tmp_path) for name in names]


def test_a_spool_that_cannot_be_written_stops_the_night_and_leaves_nothing(tmp_path,
                                                                         monkeypatch):
    """The listing is spooled on another thread: its error reaches the night."""
    spool_writer = night_table.spool_writer

    def full_disk(path, schema):
        if "-000001-" in os.path.basename(path):
            raise OSError(28, "No space left on device")
        return spool_writer(path, schema)

    monkeypatch.setattr(night_table, "spool_writer", full_disk)
    index = parts_table(tmp_path, [("", ["a", "b"]), ("c", ["c", "d"])])
    with pytest.raises(OSError, match="No space left"):
        NightDiff(Store(str(tmp_path)), iter(in_batches(listed(["a", "b", "c", "d", "e"]), 2)),
                  index, "photos/")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".spill-")] == []
