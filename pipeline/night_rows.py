"""Tonight's rows of the parts a night rewrites, a batch at a time in listing order: keys,
paths, kept columns and versions from tonight's listing; labels from tonight's labelling
where an image is new or changed, else from last night's part, read by row number."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import night_table
from pipeline.night_diff import OLD_ROW, POSITION, SAME, TONIGHT, NightDiff
from pipeline.night_table import part_path, read_spool

# Past this many runs in a batch, rows are gathered by number (one copy) rather than as
# slices (a chunk each, which the Parquet writer and hashing then pay for per chunk).
MAX_RUNS = 256


class PartRows:
    """(range number, a batch) for each range tonight writes. `labelled`: tonight's labels,
    in the order of the diff's images to label (a local Parquet file), if any. Counts, as
    it goes, the changed images (`relabelled`) and those whose top-1 moved."""

    def __init__(self, diff: NightDiff, template: pa.Schema, labelled: str | None,
                 item_columns: list[str]):
        self.diff, self.template, self.labelled = diff, template, labelled
        self.item_columns = item_columns
        self.relabelled = self.top1_changed = 0

    def __iter__(self) -> Iterator[tuple[int, pa.Table]]:
        """The rows of each range to write tonight (number, a batch), in listing order:
        keys, paths, kept columns and versions from tonight's listing; the labels from
        tonight's labelling where the image is new or changed, else from last night's part
        (by row number: sequential when tonight lists as last night did). `TONIGHT` marks
        the rows labelled tonight. Tonight's labels are in the order of to_label's images,
        so each range takes the next of them."""
        template, diff = self.template, self.diff
        labels = [f.name for f in template if f.name not in self.item_columns]
        label_schema = pa.schema([template.field(name) for name in labels])
        tonight_labels = (_Rebatch(night_table.batches(self.labelled, labels))
                          if self.labelled else None)
        previous_labels = None
        try:
            for number, rng in enumerate(diff.ranges):
                if not rng.touched or not rng.rows:
                    continue
                if rng.old is not None and (previous_labels is None
                                            or previous_labels[0] != rng.old):
                    if previous_labels is not None:
                        previous_labels[1].close()
                    part = diff.previous.parts[rng.old]
                    previous_labels = (rng.old, _Rows(diff.store.open(
                        part_path(diff.table, part)), labels))
                old = previous_labels[1] if rng.old is not None else None
                for batch in read_spool(rng.joined):
                    yield number, self._batch(batch, labels, label_schema, tonight_labels,
                                              old, template)
        finally:
            if previous_labels is not None:
                previous_labels[1].close()

    def _batch(self, places: pa.Table, labels, label_schema, tonight_labels, old,
               template) -> pa.Table:
        mask = pc.invert(places[SAME]).combine_chunks().to_numpy(zero_copy_only=False)
        labelled = previous = label_schema.empty_table()
        at_tonight = np.flatnonzero(mask)
        if len(at_tonight):
            labelled = tonight_labels.take(len(at_tonight)).cast(label_schema)
            self._count_top1_changes(places, at_tonight, labelled, old)
        at_previous = np.flatnonzero(~mask)
        if len(at_previous):
            numbers = places[OLD_ROW].take(pa.array(at_previous)).to_numpy(
                zero_copy_only=False)
            previous = old.take(numbers).cast(label_schema)
        chosen = _interleave(mask, labelled, previous)
        table = places.drop_columns([c for c in (POSITION, OLD_ROW, SAME)
                                     if c in places.column_names])
        for name in labels:
            table = table.append_column(template.field(name), chosen[name])
        return table.append_column(TONIGHT, pa.array(mask))

    def _count_top1_changes(self, places: pa.Table, at_tonight: np.ndarray,
                            labelled: pa.Table, old) -> None:
        """Of tonight's labelled images that last night had (changed ones), how many got
        another top-1: their previous rows read by number, a few per night."""
        if old is None:
            return
        before = places[OLD_ROW].take(pa.array(at_tonight)).combine_chunks()
        had = pc.is_valid(before).to_numpy(zero_copy_only=False)
        if not had.any():
            return
        numbers = before.filter(pa.array(had)).to_numpy(zero_copy_only=False)
        previous = old.take(numbers)["top1_label"]
        new = labelled["top1_label"].filter(pa.array(had))
        same = pc.fill_null(pc.equal(previous, new), False)
        both_null = pc.and_(pc.is_null(previous), pc.is_null(new))
        self.relabelled += int(had.sum())
        self.top1_changed += int(had.sum()) - int(pc.sum(pc.or_(same, both_null)).as_py() or 0)


def _interleave(mask: np.ndarray, first: pa.Table, second: pa.Table) -> pa.Table:
    """Rows in order: where `mask`, the next of `first`, else the next of `second`; as
    slices of the two when they alternate seldom (a few changes among last night's rows)."""
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    if len(edges) >= MAX_RUNS:
        order = np.concatenate([np.flatnonzero(mask), np.flatnonzero(~mask)])
        return pa.concat_tables([first, second]).take(np.argsort(order))
    pieces, taken = [], [0, 0]
    for start, stop in zip([0, *edges], [*edges, len(mask)]):
        which = 0 if mask[start] else 1
        pieces.append((first, second)[which].slice(taken[which], stop - start))
        taken[which] += stop - start
    return pa.concat_tables(pieces)


class _Rows:
    """Rows of a Parquet file fetched by number, a row group at a time (one kept)."""

    def __init__(self, source, columns: list[str]):
        self._handle = source
        self._file = pq.ParquetFile(source)
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
        """The rows numbered `numbers`, in that order: runs of consecutive numbers (last
        night's rows, between tonight's few changes) as slices, not copied row by row."""
        breaks = np.flatnonzero(np.diff(numbers) != 1) + 1
        if len(breaks) < MAX_RUNS:
            pieces = []
            for run in np.split(numbers, breaks):
                start, stop = int(run[0]), int(run[-1]) + 1
                while start < stop:
                    group = int(np.searchsorted(self._starts, start, side="right")) - 1
                    end = min(stop, int(self._starts[group + 1]))
                    pieces.append(self._group(group).slice(start - self._starts[group],
                                                           end - start))
                    start = end
            return pa.concat_tables(pieces)
        groups = np.searchsorted(self._starts, numbers, side="right") - 1
        order = np.argsort(groups, kind="stable")
        numbers, groups = numbers[order], groups[order]
        pieces = [self._group(g).take(numbers[groups == g] - self._starts[g])
                  for g in np.unique(groups)]
        return pa.concat_tables(pieces).take(np.argsort(order, kind="stable"))

    def close(self) -> None:
        self._file.close()
        if hasattr(self._handle, "close"):
            self._handle.close()


class _Rebatch:
    """Rows of a stream of tables, taken so many at a time."""

    def __init__(self, tables):
        self._tables = iter(tables)
        self._pending = pa.table({})

    def take(self, count: int) -> pa.Table:
        pieces, rows = [], 0
        while rows < count:
            if not self._pending.num_rows:
                self._pending = next(self._tables)
            piece = self._pending.slice(0, count - rows)
            self._pending = self._pending.slice(piece.num_rows)
            pieces.append(piece)
            rows += piece.num_rows
        return pa.concat_tables(pieces)
