"""Apache Iceberg (pyiceberg): a table in a catalog (SQLite in the run directory by default,
a REST catalog in production); a run or a night is one catalog commit."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from pipeline.errors import UsageError
from pipeline.formats.base import Commit
from pipeline.options import Option
from pipeline.formats.lakehouse import (COMMIT_KEY, TableFormat, as_ours, batches,
                                        check_schema, moved_on, removed_or_relabelled)
from pipeline.storage import Store

DEFAULT_TABLE = "label_images.labels"  # NAMESPACE.NAME
CATALOG_FILE = "catalog.db"  # the default catalog, SQLite in the run directory
WAREHOUSE = "warehouse"  # the default catalog's data and metadata files, beside it


def _pyiceberg():
    try:
        import pyiceberg.catalog
    except ImportError:
        raise UsageError("--format iceberg needs pyiceberg: pip install "
                         "'label-images[iceberg]'") from None
    return pyiceberg


def _catalog(uri: str, warehouse: str | None):
    """The catalog at `uri`: a SQL database (sqlite:///PATH, postgresql://...) or a REST
    catalog (http(s)://...); one line if it does not answer."""
    pyiceberg = _pyiceberg()
    from pyiceberg.catalog import load_catalog

    kind = "rest" if uri.startswith(("http://", "https://")) else "sql"
    properties = {"type": kind, "uri": uri}
    if kind == "sql":
        if uri.startswith("sqlite:///"):
            folder = Path(uri.removeprefix("sqlite:///")).parent
            if not folder.is_dir():
                raise UsageError(f"--catalog {uri}: no folder {folder} for the SQLite file")
            warehouse = warehouse or (folder / WAREHOUSE).resolve().as_uri()
        properties["warehouse"] = warehouse
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:  # the same object store the rest of the run uses
        properties["s3.endpoint"] = endpoint
    try:
        return load_catalog("label_images", **properties)
    except pyiceberg.exceptions.NoSuchPropertyException as exc:
        raise UsageError(f"--catalog {uri}: {exc}") from None
    except Exception as exc:  # a REST catalog's connection error, a database's: one line
        raise UsageError(f"the Iceberg catalog at {uri} cannot be reached: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None


class IcebergFormat(TableFormat):
    name = "iceberg"
    options = (Option("table", str, "--format iceberg: the table as NAMESPACE.NAME (default: "
                                    f"{DEFAULT_TABLE})"),
               Option("catalog", str, "--format iceberg: the catalog, sqlite:///PATH or a "
                                      "REST catalog's http(s) URL (default: SQLite in OUT)"))

    def configured(self, options: dict) -> IcebergFormat:
        table = options.get("table") or DEFAULT_TABLE
        if table.count(".") < 1 or "/" in table:
            raise UsageError(f"--table {table}: an Iceberg table is NAMESPACE.NAME")
        return IcebergFormat(table=table, catalog=options.get("catalog"))

    def table_name(self) -> str:
        return CATALOG_FILE

    def _uri(self, store: Store) -> str:
        if self.catalog:
            return self.catalog
        if store.remote:
            raise UsageError("--format iceberg into an object-store --out needs --catalog "
                             "(a REST catalog, or sqlite:///PATH on this machine)")
        return f"sqlite:///{os.path.abspath(store.url(CATALOG_FILE))}"

    def location(self, store: Store) -> str:
        return f"{self._uri(store)}#{self.table}"

    def _open(self, where: str, create: pa.Schema | None = None):
        uri, _, name = where.rpartition("#")
        catalog = _catalog(uri, None)
        from pyiceberg.exceptions import NoSuchTableError

        try:
            return catalog.load_table(name)
        except NoSuchTableError:
            if create is None:
                return None
        except Exception as exc:
            raise UsageError(f"the Iceberg catalog at {uri} cannot be read: "
                             f"{str(exc).splitlines()[0]}") from None
        catalog.create_namespace_if_not_exists(name.rpartition(".")[0])
        return catalog.create_table(name, schema=create)

    def check(self, store: Store) -> None:
        where = self.location(store)
        if not self.catalog and not store.exists(CATALOG_FILE):
            return  # the run directory's own catalog, made at the commit
        table = self._open(where)
        if table is not None:
            check_schema(where, table.schema().as_arrow())

    def load(self, where: str):
        return self._open(where)

    def last_commit(self, table) -> tuple[str | None, int | None]:
        snapshot = table.current_snapshot() if table is not None else None
        if snapshot is None:
            return None, None
        return snapshot.summary.get(COMMIT_KEY), snapshot.snapshot_id

    def _commit(self, table, change) -> int:
        # the transaction asserts the snapshot the table was read at: another writer's
        # commit in between fails it (no retry: what is written was decided on that one)
        from pyiceberg.exceptions import CommitFailedException

        try:
            with warnings.catch_warnings():
                # pyiceberg warns when a delete matches no rows: a night with nothing removed
                warnings.simplefilter("ignore", UserWarning)
                with table.transaction() as tx:
                    change(tx)
        except CommitFailedException:
            raise moved_on(".".join(table.name())) from None
        return table.refresh().current_snapshot().snapshot_id

    def replace(self, where: str, table, schema: pa.Schema, tables, commit: Commit) -> int:
        table = table if table is not None else self._open(where, create=schema)
        properties = {COMMIT_KEY: commit.id, **commit.properties}

        def change(tx):
            with tx.update_schema() as update:  # a new kept column or embeddings: added
                update.union_by_name(schema)
            tx.overwrite(batches(schema, tables), snapshot_properties=properties)
            tx.set_properties(commit.properties)
        return self._commit(table, change)

    def apply(self, table, schema: pa.Schema, commit: Commit) -> int:
        from pyiceberg.expressions import In

        properties = {COMMIT_KEY: commit.id, **commit.properties}
        gone = removed_or_relabelled(commit).to_pylist()
        if not gone and not commit.upserts:
            return table.current_snapshot().snapshot_id

        def change(tx):
            if gone:
                tx.delete(In("key", gone), snapshot_properties=properties)
            if commit.upserts:
                tx.append(pa.concat_tables([t.cast(schema) for t in commit.upserts]),
                          snapshot_properties=properties)
            tx.set_properties(commit.properties)
        return self._commit(table, change)

    def set_properties(self, where: str, properties: dict[str, str]) -> None:
        table = self._open(where)
        if any(table.properties.get(k) != v for k, v in properties.items()):
            with table.transaction() as tx:
                tx.set_properties(properties)

    def batches(self, store: Store, columns: list[str]) -> Iterator[pa.Table]:
        table = self._open(self.location(store))
        if table is None:
            raise UsageError(f"no Iceberg table {self.location(store)}: was it dropped?")
        fields = tuple(columns) if columns is not None else ("*",)  # None: every column
        for batch in table.scan(selected_fields=fields).to_arrow_batch_reader():
            yield as_ours(pa.Table.from_batches([batch]))
