"""Tonight's listing against the last night's table, out of core: what is new, changed,
unchanged and removed, tonight's images to label, and the new table's rows in source order.

The listing streams to a local spool (with each item's position); DuckDB joins it with the
previous table within keys.MEMORY_LIMIT, spilling to local disk. Memory is a batch and that
limit, whatever the size of the table: a night over 10^8 rows with 0.1% changed costs the
changed images and streamed passes, never the table held.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import keys
from pipeline.errors import UsageError
from pipeline.sources import VERSION_COLUMNS
from pipeline.storage import Store

POSITION = "_label_images_position"  # an item's place in tonight's listing
TONIGHT = "_label_images_tonight"  # a row labelled tonight (a table format's upsert)
BATCH_ROWS = 65_536
_SAME = ("coalesce(l.path = p.path AND l.source_size = p.source_size "
         "AND l.source_version = p.source_version, false)")


@dataclass
class Changes:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0


class NightDiff:
    """Tonight's listing (spooled), the previous table (a local file), and one DuckDB join
    between them, kept on disk in listing order: for each item, last night's row of its key
    (if any) and whether it is the same image (path, size, version). Everything else (the
    counts, what to label, the new table) is a streamed pass over files in listing order."""

    def __init__(self, store: Store, listing: Iterable[pa.Table], previous: str | None,
                 what: str):
        self.folder = keys.spill_folder(store)
        self.con = None
        try:
            self.listing, self.items, self.digest = _spool(listing, self.folder)
            if not self.items:
                raise UsageError(f"no images in {what}")
            keys.refuse_duplicates(self.listing, self.folder, what)  # the spool holds them
            self.previous = local_file(store, previous, self.folder) if previous else None
            self.con = keys.connect(self.folder, keys.JOIN_MEMORY)
            self.joined = self._join()
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self) -> NightDiff:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.con is not None:
            self.con.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _join(self) -> str:
        """joined.parquet: POSITION, previous_row (null: a new key), same (an unchanged
        image), in listing order: the night's one join of tonight's keys with last night's."""
        path = os.path.join(self.folder, "joined.parquet")
        tonight = f"read_parquet('{_quoted(self.listing)}')"
        if self.previous is None:
            query = (f"SELECT {POSITION}, NULL::BIGINT AS previous_row, false AS same "
                     f"FROM {tonight}")
        else:
            # a table that records no versions (a plain run over a manifest): nothing in it
            # compares as the same image, so every image is labelled once and recorded
            recorded = pq.read_schema(self.previous).names
            versions = ", ".join(name if name in recorded else f"NULL::{kind} AS {name}"
                                 for name, kind in zip(VERSION_COLUMNS, ("BIGINT", "VARCHAR")))
            query = (f"SELECT l.{POSITION}, p.row AS previous_row, {_SAME} AS same FROM "
                     f"(SELECT key, path, source_size, source_version, {POSITION} FROM "
                     f"{tonight}) l LEFT JOIN (SELECT key, path, {versions}, "
                     f"file_row_number AS row FROM read_parquet('{_quoted(self.previous)}', "
                     "file_row_number = true)) p ON l.key = p.key")
        self.con.execute(f"COPY ({query} ORDER BY {POSITION}) TO '{_quoted(path)}' "
                         "(FORMAT parquet)")
        return path

    def _previous_rows(self) -> int:
        return pq.ParquetFile(self.previous).metadata.num_rows if self.previous else 0

    def changes(self) -> Changes:
        new, unchanged = self.con.execute(
            "SELECT count(*) FILTER (WHERE previous_row IS NULL), count(*) FILTER (WHERE same) "
            f"FROM read_parquet('{_quoted(self.joined)}')").fetchall()[0]
        # keys are unique on both sides: what last night had and tonight matched is the rest
        removed = self._previous_rows() - (self.items - new)
        return Changes(new=new, changed=self.items - new - unchanged, unchanged=unchanged,
                       removed=removed)

    def _in_order(self, columns: list[str] | None = None) -> Iterator[tuple[pa.Table, pa.Table]]:
        """(listing rows, their join rows), a batch at a time, in listing order."""
        listed = _Rebatch(pq.ParquetFile(self.listing).iter_batches(
            batch_size=BATCH_ROWS, columns=columns))
        for places in pq.ParquetFile(self.joined).iter_batches(batch_size=BATCH_ROWS):
            yield listed.take(places.num_rows), pa.Table.from_batches([places])

    def to_label(self) -> tuple[str, str]:
        """Tonight's new and changed images, in listing order, written to a local file
        (its path), and the digest that names tonight's increment."""
        path = os.path.join(self.folder, "to-label.parquet")
        digest, writer = ColumnsDigest(), None
        try:
            for items, places in self._in_order():
                todo = items.filter(pc.invert(places["same"]))
                writer = writer or pq.ParquetWriter(path, todo.schema)
                writer.write_table(todo)
                digest.update(todo)
        finally:
            if writer is not None:
                writer.close()
        return path, digest.hexdigest()[:16]

    def removed(self) -> pa.Array:
        """Keys of the previous table's images that are gone (as many as were removed):
        last night's rows no item of tonight's matched, marked in a byte a row (100 MB at
        10^8; DuckDB's anti-join took 22 s and 1 GB more here), then read in one pass."""
        if self.previous is None:
            return pa.array([], pa.string())
        matched = np.zeros(self._previous_rows(), dtype=bool)
        for batch in pq.ParquetFile(self.joined).iter_batches(columns=["previous_row"]):
            rows = batch.column(0).drop_null().to_numpy()
            matched[rows] = True
        gone, start = [], 0
        for batch in pq.ParquetFile(self.previous).iter_batches(columns=["key"]):
            keep = ~matched[start:start + batch.num_rows]
            if keep.any():
                gone.append(batch.column(0).filter(pa.array(keep)))
            start += batch.num_rows
        return (pa.concat_arrays(gone).cast(pa.string()) if gone
                else pa.array([], pa.string()))

    def rows(self, template: pa.Schema, labelled: str | None,
             item_columns: list[str]) -> Iterator[pa.Table]:
        """The new table in listing order, a batch at a time: keys, paths, kept columns and
        versions from tonight's listing; the labels from tonight's labelling where the image
        is new or changed, else from the previous table. `TONIGHT` marks the rows labelled
        tonight.

        No join: tonight's labels (`labelled`) are in the order of to_label's images, so the
        k-th image to label is their k-th row; last night's row of each unchanged image is
        in the join. Both are read by row number, in passes that are sequential when tonight
        lists in last night's order (a source listed as before, with images added and
        removed)."""
        self.relabelled = self.top1_changed = 0  # changed images, and those whose top-1 moved
        labels = [f.name for f in template if f.name not in item_columns]
        label_schema = pa.schema([template.field(name) for name in labels])
        tonight_labels = _Rows(labelled, labels) if labelled else None
        previous_labels = _Rows(self.previous, labels) if self.previous else None
        labelled_before = 0
        try:
            for items, places in self._in_order(item_columns):
                tonight = pc.invert(places["same"]).combine_chunks()
                mask = tonight.to_numpy(zero_copy_only=False)
                pieces, order = [], []
                at_tonight = np.flatnonzero(mask)
                if len(at_tonight):
                    numbers = labelled_before + np.arange(len(at_tonight))
                    pieces.append(tonight_labels.take(numbers).cast(label_schema))
                    order.append(at_tonight)
                    labelled_before += len(at_tonight)
                    self._count_top1_changes(places, at_tonight, pieces[-1],
                                             previous_labels)
                at_previous = np.flatnonzero(~mask)
                if len(at_previous):
                    numbers = places["previous_row"].take(pa.array(at_previous)).to_numpy(
                        zero_copy_only=False)
                    pieces.append(previous_labels.take(numbers).cast(label_schema))
                    order.append(at_previous)
                chosen = pa.concat_tables(pieces).take(np.argsort(np.concatenate(order)))
                table = items
                for name in labels:
                    table = table.append_column(template.field(name), chosen[name])
                yield table.append_column(TONIGHT, tonight)
        finally:
            for rows in (tonight_labels, previous_labels):
                if rows is not None:
                    rows.close()


    def _count_top1_changes(self, places: pa.Table, at_tonight: np.ndarray,
                            labelled: pa.Table, previous_labels) -> None:
        """Of tonight's labelled images that last night had (changed ones), how many got
        another top-1: their previous rows read by number, a few per night."""
        if previous_labels is None:
            return
        before = places["previous_row"].take(pa.array(at_tonight)).combine_chunks()
        had = pc.is_valid(before).to_numpy(zero_copy_only=False)
        if not had.any():
            return
        numbers = before.filter(pa.array(had)).to_numpy(zero_copy_only=False)
        old = previous_labels.take(numbers)["top1_label"]
        new = labelled["top1_label"].filter(pa.array(had))
        same = pc.fill_null(pc.equal(old, new), False)
        both_null = pc.and_(pc.is_null(old), pc.is_null(new))
        self.relabelled += int(had.sum())
        self.top1_changed += int(had.sum()) - int(pc.sum(pc.or_(same, both_null)).as_py() or 0)


class _Rows:
    """Rows of a Parquet file fetched by number, a row group at a time (one kept)."""

    def __init__(self, path: str, columns: list[str]):
        self._file = pq.ParquetFile(path)
        self._columns = columns
        meta = self._file.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self._cached: tuple[int, pa.Table] | None = None

    def _group(self, group: int) -> pa.Table:
        if self._cached is None or self._cached[0] != group:
            self._cached = (group, self._file.read_row_group(group, columns=self._columns))
        return self._cached[1]

    def take(self, numbers: np.ndarray) -> pa.Table:
        """The rows numbered `numbers`, in that order."""
        groups = np.searchsorted(self._starts, numbers, side="right") - 1
        order = np.argsort(groups, kind="stable")
        numbers, groups = numbers[order], groups[order]
        pieces = [self._group(g).take(numbers[groups == g] - self._starts[g])
                  for g in np.unique(groups)]
        return pa.concat_tables(pieces).take(np.argsort(order, kind="stable"))

    def close(self) -> None:
        self._file.close()


class _Rebatch:
    """Rows of a stream of batches, taken so many at a time."""

    def __init__(self, batches):
        self._batches = iter(batches)
        self._pending = pa.table({})

    def take(self, count: int) -> pa.Table:
        pieces, rows = [], 0
        while rows < count:
            if not self._pending.num_rows:
                self._pending = pa.Table.from_batches([next(self._batches)])
            piece = self._pending.slice(0, count - rows)
            self._pending = self._pending.slice(piece.num_rows)
            pieces.append(piece)
            rows += piece.num_rows
        return pa.concat_tables(pieces)


def _spool(listing: Iterable[pa.Table], folder: str) -> tuple[str, int, str]:
    """Tonight's listing to a local Parquet file with each item's position; how many items,
    and a digest of their keys, paths and versions (what names tonight's table)."""
    path = os.path.join(folder, "tonight.parquet")
    writer, count, digest = None, 0, ColumnsDigest()
    try:
        for table in listing:
            if not table.num_rows:
                continue
            table = table.append_column(POSITION, pa.array(range(count, count + table.num_rows),
                                                           pa.int64()))
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table.cast(writer.schema))
            digest.update(table)
            count += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return path, count, digest.hexdigest()


class ColumnsDigest:
    """A hash of the keys, paths and versions in order, whatever the batches they come in:
    each column's value lengths and bytes are hashed apart, from Arrow's buffers."""

    NAMES = ("key", "path", VERSION_COLUMNS[1])

    def __init__(self):
        self._parts = {name: (hashlib.sha256(), hashlib.sha256()) for name in self.NAMES}

    def update(self, table: pa.Table) -> None:
        for name, (lengths, data) in self._parts.items():
            column = table[name].cast(pa.string()).fill_null("").combine_chunks()
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


def local_file(store: Store, name: str, folder: str) -> str:
    """A file of the run directory as a local file for DuckDB: itself, or a copy of a
    remote one in `folder`."""
    if not store.remote:
        return os.path.join(store.root, name)
    local = os.path.join(folder, name.replace("/", "_"))
    with store.open(name) as source, open(local, "wb") as target:
        shutil.copyfileobj(source, target, 16 << 20)
    return local


def _read(path: str) -> Iterator[pa.Table]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
        yield pa.Table.from_batches([batch]).drop_columns([POSITION])


def items_to_label(path: str) -> Iterator[pa.Table]:
    """The spooled images to label, a batch at a time, without their positions."""
    return _read(path)


def _quoted(path: str) -> str:
    return path.replace("'", "''")


def _name(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'
