"""What Delta and Iceberg tables share: one table commit per run or night, found again on a
rerun, and a table of another schema refused before anything is labelled."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import RunError, UsageError
from pipeline.formats.base import Commit, Format
from pipeline.storage import Store

# In the run directory: which commit of the table this run made (the run's "finished").
MARKER = "table.json"
COMMIT_KEY = "label_images.commit"  # the commit's property that names what it holds
# The delete-or-upsert flag of an incremental night's merge source (not a column of ours).
OPERATION = "_label_images_op"


def _normal(kind: pa.DataType) -> pa.DataType:
    """A type as we write it: a table format reads strings back as large or view strings,
    and keeps no fixed-size lists."""
    if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return pa.string()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return pa.list_(_normal(kind.value_type))
    return kind


def table_schema(schema: pa.Schema) -> pa.Schema:
    """Our Parquet schema as a table format holds it: no fixed-size list, no file metadata."""
    return pa.schema([pa.field(f.name, _normal(f.type), f.nullable) for f in schema])


def as_ours(table: pa.Table) -> pa.Table:
    """A table read back, with the Parquet output's types (embeddings stay variable lists)."""
    return table.cast(pa.schema([pa.field(f.name, _normal(f.type), f.nullable)
                                 for f in table.schema]))


def check_schema(where: str, found: pa.Schema) -> None:
    """A table that is not ours (a column of ours missing or of another type) is refused."""
    from pipeline.writer import output_schema  # the columns every run of ours writes

    ours = output_schema(1, pa.schema([]), {})
    have = {f.name: _normal(f.type) for f in found}
    wrong = [f"{f.name} ({have[f.name]}, not {_normal(f.type)})" if f.name in have
             else f"{f.name} (missing)" for f in ours if have.get(f.name) != _normal(f.type)]
    if wrong:
        raise UsageError(f"{where} is not a label-images table: {', '.join(wrong[:4])}; give "
                         "another --table, or remove that one")


def batches(schema: pa.Schema, tables: Iterable[pa.Table]) -> pa.RecordBatchReader:
    """The tables as one stream of `schema` (written without holding the whole table)."""
    def stream() -> Iterator[pa.RecordBatch]:
        for table in tables:
            yield from table.cast(schema).to_batches()
    return pa.RecordBatchReader.from_batches(schema, stream())


def upserted_keys(commit: Commit) -> pa.Array:
    keys = [t["key"].combine_chunks() for t in commit.upserts]
    return pa.concat_arrays(keys) if keys else pa.array([], pa.string())


def moved_on(where: str) -> RunError:
    return RunError(f"{where} moved on while this run committed to it (another writer): run "
                    "the same command again to commit on top of what is there now")


class TableFormat(Format):
    """A table in a lakehouse format: its commit is the run's last step."""

    def __init__(self, table: str | None = None, catalog: str | None = None):
        self.table, self.catalog = table, catalog

    def run_files(self) -> list[str]:
        # --overwrite forgets the run, not the table: its history is the table's own
        return [MARKER]

    def exists(self, store: Store) -> bool:
        marker = self._marker(store)  # this format's table, where this run puts it
        return (marker.get("format"), marker.get("table")) == (self.name, self.location(store))

    def holds(self, store: Store, commit_id: str) -> bool:
        return self.exists(store) and self._marker(store).get("commit") == commit_id

    def _marker(self, store: Store) -> dict:
        if not store.exists(MARKER):
            return {}
        with store.open(MARKER) as fh:
            return json.load(fh)

    def assemble(self, store: Store, schema: pa.Schema, tables: Iterable[pa.Table],
                 commit: Commit | None = None) -> None:
        if commit is None:
            raise RunError(f"--format {self.name} commits through the run (no commit given)")
        schema, where = table_schema(schema), self.location(store)
        # the table as read now: the commit is made against this version, so that another
        # writer's commit in between fails it instead of being merged over or doubled
        table = self.load(where)
        last, version = self.last_commit(table)
        if last != commit.id:  # else: committed by this very run before it was killed
            if commit.base is not None and last == commit.base:
                version = self.apply(table, schema, commit)
            else:
                version = self.replace(where, table, schema, tables, commit)
        self.set_properties(where, commit.properties)
        record = {"format": self.name, "table": self.location(store), "commit": commit.id,
                  "version": version}
        with store.writing(MARKER) as sink:
            sink.write(json.dumps(record, indent=2).encode())

    # what each table format does in its own library
    def load(self, where: str):
        """The table at `where` as it is now, or None if there is none yet."""
        raise NotImplementedError

    def last_commit(self, table) -> tuple[str | None, int | None]:
        """The id the last commit of rows recorded (None if there is no table, or another
        writer's commit came last) and the table's version or snapshot id after it."""
        raise NotImplementedError

    def replace(self, where: str, table, schema: pa.Schema, tables: Iterable[pa.Table],
                commit: Commit) -> int:
        """The whole table replaced by `tables` in one commit; returns the new version."""
        raise NotImplementedError

    def apply(self, table, schema: pa.Schema, commit: Commit) -> int:
        """A night's changes (rows of removed and relabelled images out, tonight's in), one
        commit; returns the new version."""
        raise NotImplementedError

    def set_properties(self, where: str, properties: dict[str, str]) -> None:
        """The run's model and weights on the table's own properties, where the format
        keeps them without a commit of their own (Iceberg); else they are the commit's."""


def removed_or_relabelled(commit: Commit) -> pa.Array:
    """Keys whose rows a night takes out of the table."""
    removed = commit.removed if commit.removed is not None else pa.array([], pa.string())
    return pc.unique(pa.concat_arrays([removed.cast(pa.string()), upserted_keys(commit)]))
