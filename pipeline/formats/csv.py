"""CSV: top-k lists flattened into label_1..K, score_1..K, class_id_1..K; quoted as RFC 4180."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.formats.base import Format
from pipeline.storage import Store

_FLAT = {"labels": "label", "scores": "score", "class_ids": "class_id"}


def csv_schema(schema: pa.Schema) -> pa.Schema:
    """The flat CSV layout: label_1..K, score_1..K, class_id_1..K instead of lists."""
    top_k = int(schema.metadata[b"label_images.top_k"])
    fields = []
    for f in schema:
        if f.name in _FLAT:
            fields += [pa.field(f"{_FLAT[f.name]}_{i}", f.type.value_type)
                       for i in range(1, top_k + 1)]
        else:
            fields.append(f)
    return pa.schema(fields)


class _Writer:
    def __init__(self, sink: IO[bytes], schema: pa.Schema):
        self._top_k = int(schema.metadata[b"label_images.top_k"])
        self._flat = csv_schema(schema)
        self._writer = pacsv.CSVWriter(sink, self._flat)

    def write(self, table: pa.Table) -> None:
        for batch in table.to_batches():
            columns = []
            for f in batch.schema:
                column = batch.column(f.name)
                if f.name in _FLAT:
                    columns += [pc.list_element(column, i) for i in range(self._top_k)]
                else:
                    columns.append(column)
            self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self._flat))

    def close(self) -> None:
        self._writer.close()


def _gathered(table: pa.Table, names: list[str]) -> pa.Array:
    """label_1..K (or score_, class_id_) as one list per row, best first; an error row's
    (all empty) a null list, as the Parquet layout has it."""
    columns = [table[name].combine_chunks() for name in names]
    rows, width = table.num_rows, len(columns)
    # row r's k-th value is the k-th column's r-th: column-major values read row by row
    order = (np.arange(width)[None, :] * rows + np.arange(rows)[:, None]).ravel()
    values = pa.concat_arrays(columns).take(pa.array(order))
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values, mask=pc.is_null(columns[0]))


class CsvFormat(Format):
    name = "csv"
    list_columns = False
    embeddings = False  # a vector per row is not a CSV cell anyone can read back

    def open(self, sink: IO[bytes], schema: pa.Schema) -> _Writer:
        return _Writer(sink, schema)

    def batches(self, store: Store, columns: list[str]) -> Iterator[pa.Table]:
        """`columns` with the Parquet layout's types; the top-k lists (labels, scores,
        class_ids) gathered again from their flat columns."""
        with store.open(self.table_name()) as fh:
            header = pacsv.open_csv(fh).schema.names
        flat = {name: [c for c in header if c.rsplit("_", 1)[0] == _FLAT[name]
                       and c.rsplit("_", 1)[1].isdigit()] for name in columns if name in _FLAT}
        read = [c for c in columns if c not in _FLAT] + [c for cs in flat.values() for c in cs]
        # The types the Parquet layout has, where CSV's inference could guess otherwise
        # (a key of digits is not a number, a score is float32).
        types = {"key": pa.string(), "path": pa.string(), "status": pa.string(),
                 "error": pa.string(), "top1_label": pa.string(), "top1_score": pa.float32(),
                 "width": pa.int32(), "height": pa.int32(), "source_size": pa.int64(),
                 "source_version": pa.string()}
        for name, names in flat.items():
            kind = {"labels": pa.string(), "scores": pa.float32(), "class_ids": pa.int32()}[name]
            types.update((c, kind) for c in names)
        with store.open(self.table_name()) as fh:
            # written unquoted, an empty cell is a null (quoted, an empty string)
            reader = pacsv.open_csv(fh, convert_options=pacsv.ConvertOptions(
                include_columns=read, strings_can_be_null=True,
                column_types={name: types[name] for name in read if name in types}))
            for batch in reader:
                table = pa.Table.from_batches([batch])
                yield pa.table({name: _gathered(table, flat[name]) if name in flat
                                else table[name] for name in columns})
