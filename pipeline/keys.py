"""Checks over every key of a listing, out of core: keys spooled to local disk, then DuckDB
groups or joins them within a memory limit, spilling the rest to that disk."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.rundir import SPILL_PREFIX
from pipeline.storage import Store

# DuckDB's share of memory for a check; past it, it spills to the spool's folder. Duplicates
# among 10^8 keys took 13 s within it here, against 23 s and 1 GB as strings. Joining two
# listings of 10^8 (a night, a staleness check) needs more to spill at all: JOIN_MEMORY.
# LABEL_IMAGES_KEYS_MEMORY sets it (a small machine; the memory test holds DuckDB to little so
# that what planning itself holds shows).
MEMORY_LIMIT = os.environ.get("LABEL_IMAGES_KEYS_MEMORY", "256MB")
JOIN_MEMORY = "1GB"
_KEY = pa.schema([pa.field("key", pa.string())])
# The grouping hash (DuckDB's 64-bit hash). Distinct keys that share it are told apart by
# comparing the strings; the tests narrow it to a few values so that they do.
KEY_HASH = "hash(key)"


def spill_folder(store: Store | None = None) -> str:
    """A folder of our own on local disk: in the run directory when it is local (its disk
    has room for the run), else the system's temporary folder."""
    parent = None if store is None or store.remote else store.root
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=parent)


def connect(folder: str, memory: str = MEMORY_LIMIT):
    """DuckDB held to `memory`, spilling into `folder`."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{memory}'")
    con.execute("SET temp_directory = ?", [os.path.join(folder, "duckdb")])
    con.execute("SET preserve_insertion_order = false")  # lets large groupings spill
    return con


class KeySpool:
    """Keys as they are listed, written to a local Parquet file in the order they come."""

    def __init__(self, store: Store | None = None):
        self.folder = spill_folder(store)
        self.path = os.path.join(self.folder, "keys.parquet")
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self.path, _KEY)

    def add(self, keys: pa.ChunkedArray | pa.Array) -> None:
        self._writer.write_table(pa.table([keys.cast(pa.string())], schema=_KEY))

    def finish(self) -> str:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.path

    def refuse_duplicates(self, what: str, noun: str = "key") -> None:
        refuse_duplicates(self.finish(), self.folder, what, noun)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self.folder, ignore_errors=True)


def refuse_duplicates(path: str, folder: str, what: str, noun: str = "key") -> None:
    """A key listed twice in the Parquet file at `path` is refused, naming how many and the
    first few, with the positions (1-based, in listing order) where each stands.

    Keys are grouped by their 64-bit hash first (8 bytes a key, not the key: 100 M keys in
    13 s within 256 MB here); only keys whose hash repeats are compared as strings."""
    con = connect(folder)
    try:
        suspects = (f"SELECT h FROM (SELECT {KEY_HASH} AS h FROM read_parquet($path)) "
                    "GROUP BY h HAVING count(*) > 1")
        if not con.execute(f"SELECT count(*) FROM ({suspects})",
                           {"path": path}).fetchall()[0][0]:
            return
        repeated = (f"FROM read_parquet($path, file_row_number = true) WHERE {KEY_HASH} IN "
                    f"({suspects}) GROUP BY key HAVING count(*) > 1")
        count = con.execute(f"SELECT count(*) FROM (SELECT key {repeated})",
                            {"path": path}).fetchall()[0][0]
        examples = con.execute(
            f"SELECT key, list(file_row_number + 1 ORDER BY file_row_number)[1:3] {repeated} "
            "ORDER BY min(file_row_number) LIMIT 5", {"path": path}).fetchall()
    finally:
        con.close()
    if not count:  # two keys of one hash, each listed once
        return
    named = ", ".join(f"{key!r} (items {' and '.join(map(str, rows))})"
                      for key, rows in examples)
    raise UsageError(f"{count} {noun}(s) appear more than once in {what} (e.g. {named}); "
                     "fix the manifest or pass --allow-duplicates")


def changes(planned: Iterable[pa.Table], listed: Iterable[pa.Table],
            store: Store | None = None) -> tuple[int, int, int]:
    """How many keys the listing has that the plan lacks (new), both have with different
    stamps (changed), and the plan has that the listing lacks (removed): both streamed to
    disk, joined by DuckDB. A table's columns besides `key` are its stamp (path, size,
    version); a key whose stamp is unknown on either side is not counted as changed."""
    plan_keys, listed_keys = _StampSpool(store), _StampSpool(store)
    try:
        for table in planned:
            plan_keys.add(table)
        for table in listed:
            listed_keys.add(table)
        con = connect(listed_keys.folder, JOIN_MEMORY)
        try:
            count = ("SELECT count(*) FROM read_parquet(?) a ANTI JOIN read_parquet(?) b "
                     "USING (key)")
            ours, theirs = listed_keys.finish(), plan_keys.finish()
            new = con.execute(count, [ours, theirs]).fetchall()[0][0]
            removed = con.execute(count, [theirs, ours]).fetchall()[0][0]
            changed = con.execute("SELECT count(*) FROM read_parquet(?) a JOIN read_parquet(?) "
                                  "b USING (key) WHERE a.stamp <> b.stamp",
                                  [ours, theirs]).fetchall()[0][0]
        finally:
            con.close()
    finally:
        plan_keys.close()
        listed_keys.close()
    return new, changed, removed


class _StampSpool(KeySpool):
    """Keys with a stamp of the rest of their row's columns (null when there are none)."""

    _SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("stamp", pa.string())])

    def __init__(self, store: Store | None = None):
        self.folder = spill_folder(store)
        self.path = os.path.join(self.folder, "keys.parquet")
        self._writer = pq.ParquetWriter(self.path, self._SCHEMA)

    def add(self, table: pa.Table) -> None:
        rest = [table[name].cast(pa.string()) for name in table.column_names if name != "key"]
        stamp = (pc.binary_join_element_wise(*rest, "\x1f") if rest
                 else pa.nulls(table.num_rows, pa.string()))
        self._writer.write_table(pa.table([table["key"].cast(pa.string()), stamp],
                                          schema=self._SCHEMA))
