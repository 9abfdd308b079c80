"""The output format interface: what a format carries, how its table is written, committed
and read back."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import IO, Protocol

import pyarrow as pa

from pipeline.storage import Store


class TableWriter(Protocol):
    def write(self, table: pa.Table) -> None: ...
    def close(self) -> None: ...


class Format:
    name: str
    list_columns: bool = True  # labels/scores/class_ids as lists; else flat label_1..K
    embeddings: bool = True  # can carry the fixed-size `embedding` column

    def table_name(self) -> str:
        """The final table's name in the run directory."""
        return f"labels.{self.name}"

    def open(self, sink: IO[bytes], schema: pa.Schema) -> TableWriter:
        """A writer of tables of `schema` (the Parquet layout) into sink, in this format."""
        raise NotImplementedError

    def assemble(self, store: Store, schema: pa.Schema, tables: Iterable[pa.Table]) -> None:
        """The final table from `tables`, in one commit: nothing is seen until all is there.

        A file format writes one file to a temporary name and renames it into place; a table
        format (a new table version) overrides this with its own commit.
        """
        with store.writing(self.table_name()) as target:
            sink = self.open(target, schema)
            try:
                for table in tables:
                    sink.write(table)
            finally:
                sink.close()

    def exists(self, store: Store) -> bool:
        """Whether the final table has been committed."""
        return store.exists(self.table_name())

    def read(self, store: Store, columns: list[str]) -> pa.Table:
        """`columns` of the committed table, with the Parquet layout's types."""
        raise NotImplementedError

    def statuses(self, store: Store) -> Iterator[pa.Array]:
        """The `status` column of the committed table, a batch at a time."""
        raise NotImplementedError
