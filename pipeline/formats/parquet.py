"""Parquet: the schema as it is, list columns and all; what DuckDB, pandas and Spark read best."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.formats.base import Format
from pipeline.storage import Store


class _Writer:
    def __init__(self, sink: IO[bytes], schema: pa.Schema):
        self._writer = pq.ParquetWriter(sink, schema)

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()


class ParquetFormat(Format):
    name = "parquet"

    def open(self, sink: IO[bytes], schema: pa.Schema) -> _Writer:
        return _Writer(sink, schema)

    def batches(self, store: Store, columns: list[str]) -> Iterator[pa.Table]:
        with store.open(self.table_name()) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=columns):
                yield pa.Table.from_batches([batch])
