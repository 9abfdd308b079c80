"""The output format interface: what a format carries, how its table is written, committed
and read back."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Protocol

import pyarrow as pa

from pipeline.storage import Store


class TableWriter(Protocol):
    def write(self, table: pa.Table) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Commit:
    """What one assembly commits: a table format records `id` and `properties` with its
    commit, and finds them again on a rerun (exactly once); a file format ignores them.

    An incremental night also says what changed since the night `base` committed: the rows
    labelled tonight (`upserts`) and the keys of removed images (`removed`). A table whose
    last commit is `base` takes those; any other is replaced whole.
    """

    id: str
    properties: dict[str, str] = field(default_factory=dict)
    base: str | None = None
    upserts: list[pa.Table] = field(default_factory=list)
    removed: pa.Array | None = None


class Format:
    name: str
    list_columns: bool = True  # labels/scores/class_ids as lists; else flat label_1..K
    embeddings: bool = True  # can carry the fixed-size `embedding` column

    options: tuple = ()  # options.Option: what this format declares (--option NAME=VALUE)

    def configured(self, options: dict) -> Format:
        """This format for one run, told the options it declares (a table format: where
        its table lives); a file format is always in the run directory."""
        return self

    def check(self, store: Store) -> None:
        """Before anything is labelled: what the table needs is there (a catalog that answers,
        a table of our schema if one exists); else a one-line UsageError."""

    def table_name(self) -> str:
        """The final table's name in the run directory."""
        return f"labels.{self.name}"

    def location(self, store: Store) -> str:
        """Where readers find the table (for the summary)."""
        return store.url(self.table_name())

    def run_files(self) -> list[str]:
        """What of this format's lives in the run directory and goes with --overwrite."""
        return [self.table_name()]

    def holds(self, store: Store, commit_id: str) -> bool:
        """Whether the committed table is the one `commit_id` made (an incremental night's
        check that nothing is left to do); a file is replaced only whole, so any will do."""
        return self.exists(store)

    def open(self, sink: IO[bytes], schema: pa.Schema) -> TableWriter:
        """A writer of tables of `schema` (the Parquet layout) into sink, in this format."""
        raise NotImplementedError

    def assemble(self, store: Store, schema: pa.Schema, tables: Iterable[pa.Table],
                 commit: Commit | None = None) -> None:
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
        """`columns` of the committed table, with the Parquet layout's types (a small
        table's way; a format that can stream overrides `batches`)."""
        raise NotImplementedError

    def batches(self, store: Store, columns: list[str] | None) -> Iterator[pa.Table]:
        """`columns` (None: all) of the committed table a batch at a time: what reads a
        table of any size (the report, the counts) without holding it."""
        yield from (pa.Table.from_batches([b]) for b in self.read(store, columns).to_batches())

    def statuses(self, store: Store) -> Iterator[pa.Array]:
        """The `status` column of the committed table, a batch at a time."""
        for table in self.batches(store, ["status"]):
            yield table["status"].combine_chunks()
