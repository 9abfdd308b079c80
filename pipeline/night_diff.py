"""Tonight's listing against the nightly table's parts: what is new, changed, unchanged and
removed, tonight's images to label, and the rows of the parts that changed.

The listing streams once into one spool file per part (night_table.route: each key to the
part whose key range holds it); then each part's keys are compared with tonight's of its
range in memory, two parts at a time. Memory is two parts and a batch, whatever the size of
the table; what is read is tonight's listing and the keys of last night's parts, and what
is written later is only the parts whose keys changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import keys, night_table
from pipeline.errors import UsageError
from pipeline.night_table import (ColumnsDigest, Index, Writers, part_path, read_spool,
                                  read_whole_spool, remove_spool, route, split_lows)
from pipeline.sources import VERSION_COLUMNS
from pipeline.storage import Store

POSITION = "_label_images_position"  # an item's place in tonight's listing
TONIGHT = "_label_images_tonight"  # a row labelled tonight (a table format's upsert)
OLD_ROW = "_label_images_old_row"  # its key's row in last night's part (null: a new key)
SAME = "_label_images_same"  # the same image as last night's (path, size, version)
BATCH_ROWS = 65_536
COMPARE_THREADS = 2  # parts compared at once: each holds one part's keys in memory
_IDENTITY = ("path", *VERSION_COLUMNS)  # what makes an image the same as last night's


@dataclass
class Changes:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0

    def add(self, other: Changes) -> None:
        self.new += other.new
        self.changed += other.changed
        self.unchanged += other.unchanged
        self.removed += other.removed


@dataclass
class _Outcome:
    """What comparing one range found, for the night's totals and its images to label."""

    counts: Changes = field(default_factory=Changes)
    repeats: int = 0  # keys listed twice in the range (the night is refused)
    examples: list = field(default_factory=list)
    todo: pa.Table | None = None  # its new and changed images, in listing order


@dataclass
class Range:
    """One part of tonight's table: its low key, the part of last night's that held its
    keys (None: a first night), and whether it must be written tonight."""

    low: str
    old: int | None
    split: bool = False  # last night's part is cut in several tonight
    rows: int = 0
    spool: list[str] | None = None  # tonight's items of the range (with POSITION), in order
    joined: str | None = None  # the same rows with OLD_ROW and SAME
    labelled: int = 0  # of its rows, how many are labelled tonight
    touched: bool = False
    removed: list = field(default_factory=list)
    identity: str | None = None  # the digest of tonight's items of the range, as listed


class NightDiff:
    """Tonight's listing spooled by part, and each part compared with last night's."""

    def __init__(self, store: Store, listing: Iterable[pa.Table], previous: Index | None,
                 what: str, table: str = "labels.parquet", kept: Iterable[str] = ()):
        self.store, self.table, self.previous = store, table, previous
        self.kept = list(kept)
        self.folder = keys.spill_folder(store)
        try:
            self.ranges, self.items, self.digest = self._spool(listing)
            if not self.items:
                raise UsageError(f"no images in {what}")
            self._compare(what)
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self) -> NightDiff:
        return self

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- the listing, by part

    def _spool(self, listing: Iterable[pa.Table]) -> tuple[list[Range], int, str]:
        lows = self.previous.lows if self.previous else [""]
        writers, count = Writers(self.folder, "tonight", self.kept), 0
        try:
            for table in listing:
                if not table.num_rows:
                    continue
                table = table.append_column(POSITION, pa.array(
                    np.arange(count, count + table.num_rows, dtype=np.int64)))
                writers.write(table, route(table["key"], lows))
                count += table.num_rows
        finally:
            writers.close()
        ranges, digest = [], hashlib.sha256()
        for i, low in enumerate(lows):
            old = i if self.previous else None
            rows = writers.rows.get(i, 0)
            spool = writers.paths(i) if rows else None
            identity = writers.digests[i].hexdigest() if rows else None
            # the night's digest: each part's items as listed (one pass hashes both)
            digest.update(f"{low}\0{rows}\0{identity}\0".encode())
            ranges.extend(self._cut(Range(low, old, rows=rows, spool=spool,
                                          identity=identity)))
        return ranges, count, digest.hexdigest()

    def _cut(self, whole: Range) -> list[Range]:
        """A range with more of tonight's items than two parts' worth, cut into parts (a
        first night, a night that added millions in one place): its bounds from a sample
        of its keys, its spool split by them in one more pass."""
        if whole.rows <= 2 * night_table.PART_ROWS:
            return [whole]
        cuts = split_lows((t["key"].combine_chunks() for t in read_spool(
            whole.spool, ["key"])), whole.low)
        if not cuts:
            return [whole]
        lows = [whole.low, *cuts]
        writers = Writers(self.folder, os.path.basename(whole.spool[0])[:-len(".arrow")])
        try:
            for table in read_spool(whole.spool):
                writers.write(table, route(table["key"], lows))
        finally:
            writers.close()
        remove_spool(whole.spool)
        return [Range(low, whole.old, split=whole.old is not None, rows=writers.rows.get(k, 0),
                      spool=writers.paths(k) if writers.rows.get(k) else None)
                for k, low in enumerate(lows)]

    # -- each part against last night's

    def _compare(self, what: str) -> None:
        self.counts = Changes()
        repeated: list[tuple[str, list[int]]] = []
        repeats = 0
        to_label, label_digest = None, ColumnsDigest()
        self._to_label = os.path.join(self.folder, "to-label.parquet")
        try:
            for outcome in self._compared():
                repeats += outcome.repeats
                repeated.extend(outcome.examples)
                self.counts.add(outcome.counts)
                if outcome.todo is not None:  # in the ranges' order, whatever the threads'
                    to_label = to_label or pq.ParquetWriter(self._to_label,
                                                            outcome.todo.schema)
                    to_label.write_table(outcome.todo.cast(to_label.schema))
                    label_digest.update(outcome.todo)
        finally:
            if to_label is not None:
                to_label.close()
        if repeats:
            repeated.sort(key=lambda entry: entry[1][0])
            named = ", ".join(f"{key!r} (items {' and '.join(map(str, rows))})"
                              for key, rows in repeated[:5])
            raise UsageError(f"{repeats} key(s) appear more than once in {what} (e.g. "
                             f"{named}); fix the manifest or pass --allow-duplicates")
        self._label_digest = label_digest.hexdigest()[:16] if to_label is not None else None

    def _groups(self) -> Iterator[list[int]]:
        """The ranges to compare, by the part of last night's their keys were in (read once
        for them all); a range listed exactly as last night's part is counted, not read."""
        group: list[int] = []
        for number, rng in enumerate(self.ranges):
            if (rng.old is not None and not rng.split and rng.identity is not None
                    and rng.identity == self.previous.parts[rng.old].identity):
                self.counts.unchanged += rng.rows
                continue
            if group and (rng.old is None or self.ranges[group[-1]].old != rng.old):
                yield group
                group = []
            group.append(number)
        if group:
            yield group

    def _compared(self) -> Iterator[_Outcome]:
        """Each compared range's outcome, in order; COMPARE_THREADS groups compared at once
        (Arrow lets go of the GIL: two cores, twice the parts in memory)."""
        with ThreadPoolExecutor(COMPARE_THREADS, "compare") as pool:
            pending: deque[Future] = deque()
            for group in self._groups():
                pending.append(pool.submit(self._compare_group, group))
                if len(pending) >= COMPARE_THREADS:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()

    def _compare_group(self, numbers: list[int]) -> list[_Outcome]:
        first = self.ranges[numbers[0]]
        _, old_keys, sub = self._old_part(first.old) if first.old is not None else (
            None, None, None)
        outcomes = []
        for place, number in enumerate(numbers):  # a cut part's ranges: its rows in each
            old = old_keys if sub is None else old_keys.filter(pa.array(sub == place))
            outcomes.append(self._compare_range(number, old))
        return outcomes

    def _compare_range(self, number: int, old: pa.Table | None) -> _Outcome:
        """One range of tonight's against its keys' rows of last night's part (`old`):
        its counts, duplicate keys, images to label; its removed keys, joined spool and
        whether it is written are set on the range."""
        rng, outcome = self.ranges[number], _Outcome()
        tonight = (read_whole_spool(rng.spool) if rng.spool
                   else pa.table({"key": pa.array([], pa.string())}))
        outcome.repeats, outcome.examples = _repeated(tonight)
        if outcome.repeats:
            return outcome
        counts = outcome.counts
        rng.touched = rng.old is None or rng.split
        if not tonight.num_rows:
            rng.touched = True  # the whole range is gone
            if old is not None:
                rng.removed.append(old["key"])
                counts.removed += old.num_rows
            return outcome
        joined, same, local = self._join(tonight, old)
        rng.joined = os.path.join(self.folder, f"joined-{number:06d}.arrow")
        with night_table.spool_writer(rng.joined, joined.schema) as writer:
            writer.write_table(joined, max_chunksize=BATCH_ROWS)
        new = int(pc.sum(pc.is_null(joined[OLD_ROW])).as_py() or 0)
        unchanged = int(same.sum())
        rng.labelled = tonight.num_rows - unchanged
        counts.new, counts.unchanged, counts.changed = new, unchanged, rng.labelled - new
        if old is not None:  # last night's keys no item of tonight's matched
            gone = np.ones(old.num_rows, dtype=bool)
            gone[local.drop_null().to_numpy(zero_copy_only=False)] = False
            if gone.any():
                rng.removed.append(old["key"].filter(pa.array(gone)))
                counts.removed += int(gone.sum())
        rng.touched = (rng.touched or rng.labelled > 0 or bool(rng.removed)
                       or self._kept_differ(joined, old, same, local))
        if rng.labelled:
            outcome.todo = tonight.filter(pa.array(~same))
        return outcome

    def _old_part(self, index: int) -> tuple[int, pa.Table, np.ndarray | None]:
        """Last night's part `index`: the columns that say which image each key was (and
        the kept columns), and, when tonight cuts it, which of tonight's ranges each row
        falls in."""
        part = self.previous.parts[index]
        with self.store.open(part_path(self.table, part)) as fh:
            source = pq.ParquetFile(fh)
            names = source.schema_arrow.names
            wanted = [n for n in ("key", *_IDENTITY, *self.kept) if n in names]
            old = source.read(columns=wanted)
        for name, kind in zip(VERSION_COLUMNS, (pa.int64(), pa.string())):
            if name not in old.column_names:  # a table of a source that lists no versions
                old = old.append_column(name, pa.nulls(old.num_rows, kind))
        old = old.append_column(OLD_ROW, pa.array(np.arange(old.num_rows, dtype=np.int64)))
        cut = [rng.low for rng in self.ranges if rng.old == index]
        return index, old, (route(old["key"], cut) if len(cut) > 1 else None)

    def _join(self, tonight: pa.Table, old: pa.Table | None
              ) -> tuple[pa.Table, np.ndarray, pa.Array]:
        """Tonight's rows of a range, in listing order, with their key's row in last
        night's part and whether it is the same image; and where each key stands in `old`
        (null: a new key). `old` may be the rows of a part that tonight cuts: its
        OLD_ROW is the row in the part's file, not in `old`."""
        items = tonight.drop_columns([POSITION]) if POSITION in tonight.column_names else tonight
        if old is None or not old.num_rows:
            local = pa.nulls(tonight.num_rows, pa.int32())
        else:
            local = _positions(tonight["key"], old["key"].combine_chunks())
        same = np.zeros(tonight.num_rows, dtype=bool)
        had = pc.is_valid(local).to_numpy(zero_copy_only=False)
        rows = pa.nulls(tonight.num_rows, pa.int64())
        if had.any():
            rows = old[OLD_ROW].take(local).combine_chunks()
            at = local.filter(pa.array(had))
            before = old.take(at)
            now = tonight.filter(pa.array(had))
            equal = np.ones(len(at), dtype=bool)
            for name in _IDENTITY:
                if name not in now.column_names:
                    equal[:] = False
                    break
                equal &= _equal(now[name], before[name])
            same[had] = equal
        joined = items.append_column(POSITION, tonight[POSITION]) \
            if POSITION in tonight.column_names else items
        joined = joined.append_column(OLD_ROW, rows).append_column(SAME, pa.array(same))
        return joined, same, local

    def _kept_differ(self, joined: pa.Table, old: pa.Table | None, same: np.ndarray,
                     local: pa.Array) -> bool:
        """Whether an unchanged image's kept columns (a manifest's own columns, taken from
        tonight's listing) differ from what its part holds: the part is rewritten."""
        if old is None or not self.kept or not same.any():
            return False
        mask = pa.array(same)
        before, now = old.take(local.filter(mask)), joined.filter(mask)
        return any(name in before.column_names and not _equal(now[name], before[name]).all()
                   for name in self.kept)

    # -- what the night asks of it

    def changes(self) -> Changes:
        return self.counts

    def to_label(self) -> tuple[str, str]:
        """Tonight's new and changed images, by part then in listing order, in a local file
        (its path), and the digest that names tonight's increment."""
        return self._to_label, self._label_digest

    def removed(self) -> pa.Array:
        """Keys of last night's images that are gone."""
        gone = [keys.cast(pa.string()) for rng in self.ranges for keys in rng.removed]
        return (pa.concat_arrays([g.combine_chunks() if isinstance(g, pa.ChunkedArray) else g
                                  for g in gone]) if gone else pa.array([], pa.string()))

def _positions(needles: pa.ChunkedArray, keys: pa.Array) -> pa.Array:
    """Where each needle stands in `keys` (int32, null: not there). Keys in order (a part
    of a listing in key order) are searched in order, a third of the time of hashing
    them; any others are hashed once and probed (no sort, no reorder)."""
    if not _ascending(keys):
        local = pc.index_in(needles, value_set=keys)
        return local.combine_chunks() if isinstance(local, pa.ChunkedArray) else local
    at = pc.search_sorted(keys, needles).to_numpy(zero_copy_only=False)
    at = np.minimum(at, len(keys) - 1).astype(np.int32)
    found = pc.equal(needles, keys.take(pa.array(at)))
    if isinstance(found, pa.ChunkedArray):
        found = found.combine_chunks()
    return pa.array(at, pa.int32(), mask=~found.to_numpy(zero_copy_only=False))


def _ascending(keys: pa.Array) -> bool:
    """Each key after the one before (so none twice)."""
    return len(keys) < 2 or bool(pc.all(pc.less(keys.slice(0, len(keys) - 1),
                                                keys.slice(1))).as_py())


def _equal(a, b) -> np.ndarray:
    """Element-wise equality where two nulls are equal too."""
    equal = pc.fill_null(pc.equal(a, b.cast(a.type) if a.type != b.type else b), False)
    both = pc.and_(pc.is_null(a), pc.is_null(b))
    return pc.or_(equal, both).to_numpy(zero_copy_only=False).astype(bool)


def _repeated(tonight: pa.Table) -> tuple[int, list[tuple[str, list[int]]]]:
    """Keys listed more than once in a range (how many, and up to five with the 1-based
    positions where they stand)."""
    if not tonight.num_rows or POSITION not in tonight.column_names:
        return 0, []
    keys = tonight["key"].combine_chunks()
    if _ascending(keys):
        return 0, []  # listed in key order, each key after the last: none twice, no hashing
    counts = pc.value_counts(keys)
    twice = counts.filter(pc.greater(counts.field("counts"), 1))
    if not len(twice):
        return 0, []
    examples = []
    for key in twice.field("values")[:5].to_pylist():
        where = pc.equal(keys, key)
        positions = tonight[POSITION].filter(where).to_numpy()
        examples.append((key, sorted(int(p) + 1 for p in positions)[:3]))
    return len(twice), examples

def local_file(store: Store, name: str, folder: str) -> str:
    """A file of the run directory as a local file: itself, or a copy of a remote one in
    `folder`."""
    if not store.remote:
        return os.path.join(store.root, name)
    local = os.path.join(folder, name.replace("/", "_"))
    with store.open(name) as source, open(local, "wb") as target:
        shutil.copyfileobj(source, target, 16 << 20)
    return local


def items_to_label(path: str) -> Iterator[pa.Table]:
    """The spooled images to label, a batch at a time, without their positions."""
    for table in night_table.batches(path, batch_rows=BATCH_ROWS):
        yield table.drop_columns([POSITION])
