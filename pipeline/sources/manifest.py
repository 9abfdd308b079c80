"""A manifest of image paths: CSV/TSV (text), Parquet and JSON lines (typed), or one path a line."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.sources.base import Source
from pipeline.storage import is_remote, local_path, open_input

MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".txt")
# Column names taken as the path column when --path-column is not given, in no order:
# more than one of them present is ambiguous and refused.
PATH_COLUMN_NAMES = frozenset(
    {"path", "filepath", "file_path", "filename", "file_name", "file", "image", "image_path",
     "img", "img_path", "url", "uri", "location"}
)


class ManifestSource(Source):
    """One row an image: the path column (detected or named), an id column as the key."""

    @classmethod
    def claims(cls, location: str, is_dir: bool) -> bool:
        return not is_dir and os.path.splitext(location)[1].lower() in MANIFEST_SUFFIXES

    def list_items(self) -> pa.Table:
        return _items_from_manifest(self.spec)


def read_manifest(path: str) -> pa.Table:
    """Read a manifest file as it is; CSV/TSV/TXT columns stay text, so ids like 007 survive."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise UsageError(
            f"{path} is neither a folder nor a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    try:
        with open_input(path) as fh:
            if suffix in (".csv", ".tsv"):
                frame = pd.read_csv(
                    fh, sep="\t" if suffix == ".tsv" else ",", dtype=str,
                    keep_default_na=False, encoding="utf-8-sig",
                )
                return pa.Table.from_pandas(frame, preserve_index=False)
            if suffix == ".txt":
                text = fh.read().decode("utf-8-sig")
                lines = [line.rstrip("\r") for line in text.split("\n")]
                return pa.table({"path": pa.array([ln for ln in lines if ln.strip()], pa.string())})
            if suffix == ".jsonl":
                return pajson.read_json(fh)
            # Spark writes timestamps as INT96, which pyarrow reads in ns by default: dates
            # after 2262 (9999-12-31 is a common "open" end) wrap around silently.
            return pq.read_table(fh, coerce_int96_timestamp_unit="us")
    except UnicodeDecodeError as exc:
        raise UsageError(f"manifest {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except pd.errors.EmptyDataError:
        raise UsageError(f"manifest {path} is empty") from None
    except (pd.errors.ParserError, pa.ArrowInvalid) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot read manifest {path}: {first_line}") from None


def _items_from_manifest(spec) -> pa.Table:
    manifest_path = spec.location
    table = read_manifest(manifest_path)
    if table.num_rows == 0:
        raise UsageError(f"manifest {manifest_path} is empty")
    columns = table.column_names
    path_column = spec.path_column or _detect_path_column(columns, manifest_path)
    for option, name in (("--path-column", path_column), ("--id-column", spec.id_column)):
        if name is not None and name not in columns:
            raise UsageError(f"{option} {name!r} is not a column of {manifest_path} "
                             f"(columns: {', '.join(columns)})")
    unknown = [c for c in spec.keep_columns if c not in columns]
    if unknown:
        raise UsageError(f"--keep-columns names {', '.join(unknown)}, not in {manifest_path} "
                         f"(columns: {', '.join(columns)})")

    listed = _as_text(table[path_column], path_column, manifest_path)
    empty = pc.equal(pc.utf8_trim_whitespace(listed), "")
    if pc.any(empty).as_py():
        rows = [i + 2 for i, e in enumerate(empty.to_pylist()) if e][:5]
        raise UsageError(f"{manifest_path}: empty path in column {path_column!r} "
                         f"(line(s) {', '.join(map(str, rows))})")
    keys = listed if spec.id_column is None else _as_text(
        table[spec.id_column], spec.id_column, manifest_path)
    base = spec.root if spec.root is not None else _parent(manifest_path)
    paths = [_resolve(p, base) for p in listed.to_pylist()]
    result = pa.table({"key": keys, "path": pa.array(paths, pa.string())})
    for name in spec.keep_columns:
        result = result.append_column(name, _in_microseconds(table[name]))
    return result


def _in_microseconds(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Nanosecond timestamps as microseconds when no value has a finer part.

    Spark cannot read the Parquet TIMESTAMP(NANOS) that a kept ns column would become in
    the output (Illegal Parquet type); a column with sub-microsecond values stays as it is.
    """
    if not (pa.types.is_timestamp(column.type) and column.type.unit == "ns"):
        return column
    try:
        return column.cast(pa.timestamp("us", column.type.tz))  # safe: refuses to truncate
    except pa.ArrowInvalid:
        return column


def _detect_path_column(columns: list[str], manifest_path: Path) -> str:
    if len(columns) == 1:
        return columns[0]
    found = [c for c in columns if c.lower() in PATH_COLUMN_NAMES]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(f"cannot tell which column of {manifest_path} holds the image paths "
                         f"(columns: {', '.join(columns)}); pass --path-column")
    raise UsageError(f"{manifest_path} has several columns that could hold the paths "
                     f"({', '.join(found)}); pass --path-column")


def _as_text(column: pa.ChunkedArray, name: str, manifest_path: Path) -> pa.ChunkedArray:
    if column.null_count:
        rows = [i + 1 for i, v in enumerate(column.is_null().to_pylist()) if v][:5]
        raise UsageError(f"{manifest_path}: column {name!r} is empty in row(s) "
                         f"{', '.join(map(str, rows))}")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise UsageError(f"column {name!r} of {manifest_path} has type {column.type}, "
                         f"which cannot serve as a path or key") from None


def _parent(location: str) -> str:
    return location.rsplit("/", 1)[0] if is_remote(location) else os.path.dirname(
        os.path.abspath(local_path(location)))


def _resolve(listed: str, base: str) -> str:
    """A relative path resolves against base; absolute paths and URLs stay as they are."""
    if "://" in listed or listed.startswith("file:") or os.path.isabs(listed):
        return listed
    if is_remote(base):
        return f"{base.rstrip('/')}/{listed}"
    return os.path.join(base, listed)
