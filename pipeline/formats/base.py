"""The output format interface: how the final table is written and read back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Protocol

import pyarrow as pa



class TableWriter(Protocol):
    def write(self, table: pa.Table) -> None: ...
    def close(self) -> None: ...


class Format:
    name: str

    def open(self, sink: IO[bytes], schema: pa.Schema) -> TableWriter:
        """A writer of tables of `schema` (the Parquet layout) into sink, in this format."""
        raise NotImplementedError

    def statuses(self, source: IO[bytes]) -> Iterator[pa.Array]:
        """The `status` column of a finished table, a batch at a time."""
        raise NotImplementedError
