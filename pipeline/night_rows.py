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
        pieces, order = [], []
        at_tonight = np.flatnonzero(mask)
        if len(at_tonight):
            pieces.append(tonight_labels.take(len(at_tonight)).cast(label_schema))
            order.append(at_tonight)
            self._count_top1_changes(places, at_tonight, pieces[-1], old)
        at_previous = np.flatnonzero(~mask)
        if len(at_previous):
            numbers = places[OLD_ROW].take(pa.array(at_previous)).to_numpy(
                zero_copy_only=False)
            pieces.append(old.take(numbers).cast(label_schema))
            order.append(at_previous)
        chosen = pa.concat_tables(pieces).take(np.argsort(np.concatenate(order)))
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
        """The rows numbered `numbers`, in that order."""
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
