"""The nightly table: a folder of Parquet parts, each holding the keys of one key range, and
the index naming them; a night rewrites only the parts whose keys changed, in one commit.

A part holds the keys from its `low` up to the next part's; its rows are in the order the
source listed them. Readers open the folder as one table (DuckDB, Polars with a glob,
pandas, Spark). A night stages the parts it rewrote in the run directory, writes its intent
(parts-commit.json: the moves, the parts dropped, the new index), then moves each staged part
over the old one (one atomic rename a part: a reader sees each key once, from last night's
part or tonight's) and writes the index. A kill before the intent leaves last night's table
as it was; a kill after it is rolled forward by the next invocation, before anything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import drift
from pipeline.formats.parquet import parquet_options
from pipeline.rundir import (STAGING_DIR, TABLE_COMMIT, TABLE_INDEX, read_json, within,
                             write_json)
from pipeline.sources import VERSION_COLUMNS
from pipeline.storage import Store

# A part's rows: a night reads and writes whole parts, so this is both its memory and its
# write when one image in the range changes. A part past twice this is split.
PART_ROWS = int(os.environ.get("LABEL_IMAGES_PART_ROWS", 1_000_000))
SAMPLE_KEYS = 1 << 20  # keys sampled (at most twice this) to place a cut's bounds: 50 MB


@dataclass
class Part:
    name: str  # the file in the table's folder
    low: str  # the least key it may hold ("" for the first part)
    rows: int = 0
    ok: int = 0
    stats: dict = field(default_factory=dict)  # drift.LabelStats of its ok rows
    night: str | None = None  # the night that wrote it
    # a digest of its keys, paths, versions and kept columns in its rows' order: a night
    # that lists the range the same way leaves the part unread
    identity: str | None = None


@dataclass
class Index:
    parts: list[Part]
    night: str | None = None  # the night whose commit this is (None: taken over, relabelled)
    next_part: int = 0  # part names are never reused: a reader never sees a name change rows

    @property
    def lows(self) -> list[str]:
        return [part.low for part in self.parts]

    @property
    def rows(self) -> int:
        return sum(part.rows for part in self.parts)

    def stats(self) -> drift.LabelStats:
        total = drift.LabelStats()
        for part in self.parts:
            if part.stats:
                kept = drift.LabelStats.from_dict(part.stats)
                total.counts.update(kept.counts)
                total.histogram += kept.histogram
        return total

    def new_name(self) -> str:
        self.next_part += 1
        return f"part-{self.next_part - 1:06d}.parquet"

    def to_dict(self) -> dict:
        return {"night": self.night, "next_part": self.next_part,
                "entries": [asdict(part) for part in self.parts]}

    @classmethod
    def from_dict(cls, data: dict) -> Index:
        return cls([Part(**part) for part in data["entries"]], data.get("night"),
                   data.get("next_part", 0))


def load(store: Store) -> Index | None:
    """The table's index, after finishing a commit a kill interrupted; None: no nightly
    table (a first night, or a plain run's table to take over)."""
    finish_commit(store)
    data = read_json(store, TABLE_INDEX)
    return Index.from_dict(data) if data else None


def part_path(table: str, part: Part | str) -> str:
    return within(table, part if isinstance(part, str) else part.name)


def route(keys: pa.Array | pa.ChunkedArray, lows: list[str]) -> np.ndarray:
    """Which part each key falls in: the number of lows after the first at or below it.

    One stable sort of the lows with the keys (a batch's, in C++), no per-key Python: a
    low that equals a key sorts before it, so the key goes to that low's part."""
    if len(lows) == 1:
        return np.zeros(len(keys), np.int64)
    bounds = pa.array(lows[1:], pa.string())
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    order = pc.sort_indices(pa.concat_arrays([bounds, keys.cast(pa.string())])).to_numpy()
    is_bound = order < len(bounds)
    crossed = np.cumsum(is_bound)
    parts = np.empty(len(keys), np.int64)
    parts[order[~is_bound] - len(bounds)] = crossed[~is_bound]
    return parts


def split_lows(keys: Iterable[pa.Array], low: str) -> list[str]:
    """Lows that cut a range of keys (streamed) into parts of about PART_ROWS, from a
    sample of evenly spaced keys: every `step`-th, the step doubled (and every other key
    of the sample dropped) whenever the sample passes SAMPLE_KEYS, so it stays bounded
    whatever the number of keys."""
    step, seen, sample, held = 1, 0, [], 0
    for batch in keys:
        taken = batch.slice((-seen) % step)
        taken = taken.take(pa.array(np.arange(0, len(taken), step))) if step > 1 else taken
        sample.append(taken.cast(pa.string()))
        held += len(taken)
        seen += len(batch)
        if held > SAMPLE_KEYS:  # keys at positions 0, step, 2 step...: keep 0, 2 step...
            whole = pa.concat_arrays(sample)
            sample = [whole.take(pa.array(np.arange(0, len(whole), 2)))]
            held, step = len(sample[0]), step * 2
    pieces = max(1, math.ceil(seen / PART_ROWS))
    if pieces == 1 or not held:
        return []
    taken = pa.concat_arrays(sample)
    ordered = pc.array_sort_indices(taken).to_numpy()
    cuts = [taken[int(ordered[(len(ordered) * i) // pieces])].as_py() for i in range(1, pieces)]
    return sorted({cut for cut in cuts if cut > low})


class ColumnsDigest:
    """A hash of the keys, paths and versions in order, whatever the batches they come in:
    each column's value lengths and bytes are hashed apart, from Arrow's buffers."""

    NAMES = ("key", "path", VERSION_COLUMNS[1])

    def __init__(self, extra: Iterable[str] = ()):
        self._parts = {name: (hashlib.sha256(), hashlib.sha256())
                       for name in (*self.NAMES, *extra)}

    def update(self, table: pa.Table) -> None:
        for name, (lengths, data) in self._parts.items():
            if name not in table.column_names:
                continue
            column = table[name]
            if column.type != pa.string():
                try:
                    column = column.cast(pa.string())
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    # a kept column of lists, say: its batches' bytes (a listing cut in
                    # other batches then reads as changed, and its parts are compared)
                    data.update(pa.table({name: column}).to_batches()[0].serialize()
                                if len(column) else b"")
                    continue
            column = column.fill_null("").combine_chunks()
            offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[
                column.offset:column.offset + len(column) + 1]
            lengths.update(np.diff(offsets).astype(np.int64).tobytes())
            if len(column) and offsets[-1] > offsets[0]:
                data.update(memoryview(column.buffers()[2])[offsets[0]:offsets[-1]])

    def hexdigest(self) -> str:
        whole = hashlib.sha256()
        for lengths, data in self._parts.values():
            whole.update(lengths.digest() + data.digest())
        return whole.hexdigest()


# Spools are Arrow IPC (written and read back once a night, no Parquet encoding) with zstd:
# a listing of 10^6 synthetic keys takes 10 MB instead of 83 MB, for 15 ms more a million.
SPOOL = pa.ipc.IpcWriteOptions(compression="zstd")


def spool_writer(path: str, schema: pa.Schema) -> pa.ipc.RecordBatchFileWriter:
    return pa.ipc.new_file(path, schema, options=SPOOL)


class Writers:
    """Local spools by part, with each part's ColumnsDigest if asked. At most MAX_OPEN are
    open at once (a listing in key order fills one part after another; 10^9 images make
    a thousand parts, past a process's open files): a part whose rows come again after
    its spool was closed gets another segment.

    A batch is compressed, written and hashed on another thread while the caller lists
    and routes the next (at most two batches held); `rows` and `digests` are whole after
    close()."""

    MAX_OPEN = 64

    def __init__(self, folder: str, prefix: str, digest: Iterable[str] | None = None):
        self.folder, self.prefix, self._digest = folder, prefix, digest
        self._open: OrderedDict[int, pa.ipc.RecordBatchFileWriter] = OrderedDict()
        self._schemas: dict[int, pa.Schema] = {}
        self._segments: dict[int, list[str]] = {}
        self.rows: dict[int, int] = {}
        self.digests: dict[int, ColumnsDigest] = {}
        self._spooler = ThreadPoolExecutor(1, "spool-writer")
        self._spooling: Future | None = None

    def paths(self, part: int) -> list[str]:
        """The part's spool, in the order its rows came."""
        return self._segments.get(part, [])

    def write(self, table: pa.Table, parts: np.ndarray) -> None:
        if not table.num_rows:
            return
        self._spooled()
        self._spooling = self._spooler.submit(self._write_routed, table, parts)

    def _spooled(self) -> None:
        """Waits for the batch being spooled; raises what its write raised."""
        if self._spooling is not None:
            spooling, self._spooling = self._spooling, None
            spooling.result()

    def _write_routed(self, table: pa.Table, parts: np.ndarray) -> None:
        if (parts == parts[0]).all():  # a listing in key order: a batch is one part's
            self._write(int(parts[0]), table)
            return
        order = np.argsort(parts, kind="stable")
        ordered, table = parts[order], table.take(pa.array(order))
        starts = np.flatnonzero(np.diff(ordered, prepend=-1))
        for start, stop in zip(starts, [*starts[1:], len(ordered)]):
            self._write(int(ordered[start]), table.slice(start, stop - start))

    def _write(self, part: int, table: pa.Table) -> None:
        writer = self._open.get(part)
        if writer is None:
            if len(self._open) >= self.MAX_OPEN:
                self._open.popitem(last=False)[1].close()  # the part least lately written
            segments = self._segments.setdefault(part, [])
            path = os.path.join(self.folder,
                                f"{self.prefix}-{part:06d}-{len(segments):04d}.arrow")
            segments.append(path)
            schema = self._schemas.setdefault(part, table.schema)
            writer = self._open[part] = spool_writer(path, schema)
            if self._digest is not None and part not in self.digests:
                self.digests[part] = ColumnsDigest(self._digest)
        else:
            self._open.move_to_end(part)
        table = table.cast(self._schemas[part])
        writer.write_table(table)
        if self._digest is not None:
            self.digests[part].update(table)
        self.rows[part] = self.rows.get(part, 0) + table.num_rows

    def close(self) -> None:
        try:
            self._spooled()
        finally:
            self._spooler.shutdown()
            for writer in self._open.values():
                writer.close()
            self._open.clear()


def read_spool(paths: str | list[str], columns: list[str] | None = None
               ) -> Iterator[pa.Table]:
    """A spool's tables (of one file, or of a part's segments) as they were written."""
    for path in [paths] if isinstance(paths, str) else paths:
        with pa.memory_map(path) as source:
            reader = pa.ipc.open_file(source)
            for number in range(reader.num_record_batches):
                table = pa.Table.from_batches([reader.get_batch(number)])
                yield table.select(columns) if columns else table


def read_whole_spool(paths: str | list[str]) -> pa.Table:
    return pa.concat_tables(read_spool(paths))


def remove_spool(paths: str | list[str]) -> None:
    for path in [paths] if isinstance(paths, str) else paths:
        os.unlink(path)


def batches(path: str, columns: list[str] | None = None,
            batch_rows: int = 65_536) -> Iterator[pa.Table]:
    source = pq.ParquetFile(path)
    try:
        for batch in source.iter_batches(batch_size=batch_rows, columns=columns):
            yield pa.Table.from_batches([batch])
    finally:
        source.close()


def commit(store: Store, table: str, night: str, staged: dict[str, str], dropped: list[str],
           index: Index) -> None:
    """Tonight's parts into the table: staged (a name in the run directory for each part
    name) moved over the parts they replace, `dropped` parts removed, the index written.
    The intent is written first, so a kill at any point is finished by the next load."""
    write_json(store, TABLE_COMMIT, {
        "night": night, "table": table, "moves": sorted(staged.items()), "dropped": dropped,
        "index": index.to_dict()})
    finish_commit(store)


def finish_commit(store: Store) -> bool:
    """A commit's intent, carried out (again: each step can be repeated); whether there
    was one."""
    intent = read_json(store, TABLE_COMMIT)
    if intent is None:
        return False
    table = intent["table"]
    if store.exists(table) and not store.is_folder(table):
        store.remove(table)  # a plain run's one-file table, taken over as parts
    for name, staged in intent["moves"]:
        if store.exists(staged):
            store.move(staged, part_path(table, name))
    for name in intent["dropped"]:
        store.remove(part_path(table, name))
    write_json(store, TABLE_INDEX, intent["index"])
    store.remove(TABLE_COMMIT)
    store.remove(STAGING_DIR)  # one night stages at a time (the run directory is locked)
    return True


def staged_name(night: str, part: str) -> str:
    return within(within(STAGING_DIR, night), part)


class PartWriter:
    """One part staged in the run directory, counted as it is written: its rows, ok rows
    and label statistics (what the index keeps, so no night reads them again).

    A batch is encoded on another thread while the caller makes the next (Parquet's
    encoder lets go of the GIL): at most two batches are held."""

    def __init__(self, store: Store, name: str, schema: pa.Schema, kept: Iterable[str] = ()):
        self._stack = contextlib.ExitStack()
        self._identity = ColumnsDigest(kept)
        sink = self._stack.enter_context(store.writing(name))
        self._writer = self._stack.enter_context(pq.ParquetWriter(sink, schema,
                                                                  **parquet_options(schema)))
        # entered last, so left first: the last batch is written before the file closes
        self._encoder = self._stack.enter_context(ThreadPoolExecutor(1, "part-writer"))
        self._encoding: Future | None = None
        self.schema, self.rows, self.ok, self.stats = schema, 0, 0, drift.LabelStats()

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self._written()
        self._encoding = self._encoder.submit(self._writer.write_table, table)
        self._identity.update(table)
        self.rows += table.num_rows
        self.ok += int(pc.sum(pc.equal(table["status"], "ok")).as_py() or 0)
        self.stats.add(table)

    def _written(self) -> None:
        """Waits for the batch being encoded; raises what its write raised."""
        if self._encoding is not None:
            encoding, self._encoding = self._encoding, None
            encoding.result()

    def close(self, name: str, low: str, night: str | None) -> Part:
        try:
            self._written()
        except BaseException as error:
            self._stack.__exit__(type(error), error, error.__traceback__)
            raise
        self._stack.close()
        return Part(name, low, self.rows, self.ok, self.stats.to_dict(), night,
                    self._identity.hexdigest())

    def abort(self) -> None:
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def take_over(store: Store, table: str, read: Callable[[list[str] | None], Iterable[pa.Table]],
              schema: pa.Schema, folder: str, kept: Iterable[str] = ()) -> Index | None:
    """A table that is not yet in parts (a plain run's, or a night's of an earlier version)
    cut into parts in key ranges and committed as the nightly table: one pass over its keys
    for the bounds (`read(columns)` streams the table), one routing its rows into a spool
    per part, then each part written from its spool."""
    lows = ["", *split_lows((piece["key"].combine_chunks() for piece in read(["key"])), "")]
    by_part = Writers(folder, "taken")
    try:
        for piece in read(None):
            by_part.write(piece.select(schema.names).cast(schema),
                          route(piece["key"], lows))
    finally:
        by_part.close()
    if not by_part.rows:
        return None
    index, staged = Index([]), {}
    for number, low in enumerate(lows):
        if not by_part.rows.get(number):
            continue
        name = index.new_name()
        staged[name] = staged_name(TAKEOVER, name)
        part = PartWriter(store, staged[name], schema, kept)
        for piece in read_spool(by_part.paths(number)):
            part.write(piece)
        index.parts.append(part.close(name, low, None))
        remove_spool(by_part.paths(number))
    index.parts[0].low = ""
    commit(store, table, TAKEOVER, staged, [], index)
    return index


TAKEOVER = "takeover"  # the staging name of a table taken over (not a night's)
