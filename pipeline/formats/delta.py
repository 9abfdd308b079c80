"""Delta Lake (delta-rs): a run is one table version; a night is one merge; s3 too."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from pipeline.errors import UsageError
from pipeline.formats.base import Commit
from pipeline.options import Option
from pipeline.formats.lakehouse import (COMMIT_KEY, OPERATION, TableFormat, as_ours, batches,
                                        check_schema, moved_on)
from pipeline.storage import Store

DEFAULT_TABLE = "labels.delta"  # in the run directory, unless --table says where
# Tables written before a run became one version: delta-rs set a property of ours only
# through ALTER, a commit of its own (no rows). Passed over when looking for our last commit.
_PROPERTIES = "SET TBLPROPERTIES"


def _deltalake():
    try:
        import deltalake
    except ImportError:
        raise UsageError("--format delta needs delta-rs: pip install 'label-images[delta]'") \
            from None
    return deltalake


def _open(where: str, version: int | None = None):
    deltalake = _deltalake()
    try:
        return deltalake.DeltaTable(where, version=version)
    except deltalake.exceptions.TableNotFoundError:
        return None
    except (OSError, deltalake.exceptions.DeltaError) as exc:
        raise UsageError(f"cannot open the Delta table at {where}: "
                         f"{str(exc).splitlines()[0]}") from None


class DeltaFormat(TableFormat):
    name = "delta"
    options = (Option("table", str, "--format delta: the table's path or URL (default: "
                                    f"OUT/{DEFAULT_TABLE})"),)

    def configured(self, options: dict) -> DeltaFormat:
        return DeltaFormat(table=options.get("table"))

    def table_name(self) -> str:
        return DEFAULT_TABLE

    def location(self, store: Store) -> str:
        return self.table or store.url(DEFAULT_TABLE)

    def check(self, store: Store) -> None:
        table = _open(self.location(store))
        if table is not None:
            check_schema(self.location(store), pa.schema(table.schema().to_arrow()))

    def load(self, where: str):
        return _open(where)

    def last_commit(self, table) -> tuple[str | None, int | None]:
        if table is None:
            return None, None
        for entry in table.history(8):  # newest first
            if entry.get("operation") != _PROPERTIES:
                return entry.get(COMMIT_KEY), entry.get("version")
        return None, table.version()

    def _commit(self, commit: Commit):
        # no retry on another writer's commit: what is written was decided on the version
        # read; the caller says so in one line, and a rerun starts from the new one
        return _deltalake().CommitProperties(
            custom_metadata={COMMIT_KEY: commit.id, **commit.properties}, max_commit_retries=0)

    def replace(self, where: str, table, schema: pa.Schema, tables, commit: Commit) -> int:
        deltalake = _deltalake()
        try:
            deltalake.write_deltalake(where if table is None else table,
                                      batches(schema, tables), mode="overwrite",
                                      schema_mode="overwrite",
                                      commit_properties=self._commit(commit))
        except deltalake.exceptions.CommitFailedError:
            raise moved_on(where) from None
        return _open(where).version()

    def apply(self, table, schema: pa.Schema, commit: Commit) -> int:
        deltalake = _deltalake()
        # the merge's source: tonight's rows to upsert, and a row per removed key to delete
        source = pa.schema([pa.field(f.name, f.type) for f in schema]
                           + [pa.field(OPERATION, pa.string())])
        pieces = [t.cast(schema).append_column(OPERATION, pa.array(["upsert"] * t.num_rows))
                  for t in commit.upserts]
        if commit.removed is not None and len(commit.removed):
            removed = commit.removed.cast(pa.string())
            pieces.append(pa.table({f.name: removed if f.name == "key" else
                                    pa.nulls(len(removed), f.type) for f in schema}).append_column(
                OPERATION, pa.array(["delete"] * len(removed))))
        if not pieces:
            return table.version()
        changes = pa.concat_tables([p.cast(source) for p in pieces])
        columns = {f.name: f"s.{f.name}" for f in schema}
        try:
            (table.merge(changes, predicate="t.key = s.key", source_alias="s", target_alias="t",
                         commit_properties=self._commit(commit))
             .when_matched_delete(predicate=f"s.{OPERATION} = 'delete'")
             .when_matched_update(updates=columns, predicate=f"s.{OPERATION} = 'upsert'")
             .when_not_matched_insert(updates=columns, predicate=f"s.{OPERATION} = 'upsert'")
             .execute())
        except deltalake.exceptions.CommitFailedError:
            raise moved_on(table.table_uri) from None
        return table.version()

    def batches(self, store: Store, columns: list[str]) -> Iterator[pa.Table]:
        dataset = _open(self.location(store)).to_pyarrow_dataset()
        for batch in dataset.to_batches(columns=columns):
            yield as_ours(pa.Table.from_batches([batch]))
