"""A manifest of image paths: CSV/TSV (text), Parquet and JSON lines (typed), or one path a
line; read a block at a time, so that a manifest of 10^8 rows costs a block of memory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.errors import UsageError, notice
from pipeline.sources.base import Source
from pipeline.storage import is_remote, local_path, open_input

MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".txt")
# Column names taken as the path column when --path-column is not given, in no order:
# more than one of them present is ambiguous and refused.
PATH_COLUMN_NAMES = frozenset(
    {"path", "filepath", "file_path", "filename", "file_name", "file", "image", "image_path",
     "img", "img_path", "url", "uri", "location"}
)
# Columns that look like ids: not taken as the key by themselves (the key must not change
# when a column is added to a manifest), but said, with the option that takes one.
ID_COLUMN_NAMES = frozenset({"id", "key", "image_id", "uid"})
BLOCK_BYTES = 16 << 20  # text read a block at a time (CSV, TSV, JSON lines)
BATCH_ROWS = 65_536  # rows a batch (Parquet, .txt)


class ManifestSource(Source):
    """One row an image: the path column (detected or named), an id column as the key."""

    @classmethod
    def claims(cls, location: str, is_dir: bool) -> bool:
        return not is_dir and os.path.splitext(location)[1].lower() in MANIFEST_SUFFIXES

    def batches(self) -> Iterator[pa.Table]:
        return _items_from_manifest(self.spec)

    def check(self) -> None:
        """The columns the options name, from the manifest's first block."""
        blocks = read_manifest(self.spec.location)
        try:
            first = next(blocks, None)
        finally:
            blocks.close()
        if first is not None:
            _check_columns(self.spec, first.column_names, self.spec.location, say=False)

    def list_items(self) -> pa.Table:
        return pa.concat_tables(self.batches())


def read_manifest(path: str) -> Iterator[pa.Table]:
    """A manifest file as it is, a block at a time; CSV/TSV/TXT columns stay text, so ids
    like 007 survive."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise UsageError(
            f"{path} is neither a folder nor a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    try:
        with open_input(path) as fh:
            if suffix in (".csv", ".tsv"):
                yield from _csv_blocks(path, "\t" if suffix == ".tsv" else ",")
            elif suffix == ".txt":
                yield from _lines(fh)
            elif suffix == ".jsonl":
                reader = pajson.open_json(fh, read_options=pajson.ReadOptions(
                    block_size=BLOCK_BYTES))
                for batch in reader:
                    yield pa.Table.from_batches([batch])
            else:
                # Spark writes timestamps as INT96, which pyarrow reads in ns by default: dates
                # after 2262 (9999-12-31 is a common "open" end) wrap around silently.
                parquet = pq.ParquetFile(fh, coerce_int96_timestamp_unit="us")
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
                    yield pa.Table.from_batches([batch])
    except UnicodeDecodeError as exc:
        raise UsageError(f"manifest {path} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        text = str(exc).strip()
        if "Empty CSV file" in text:
            raise UsageError(f"manifest {path} is empty") from None
        if "invalid UTF8" in text or "Invalid UTF8" in text:
            raise UsageError(f"manifest {path} is not UTF-8 text ({text.splitlines()[0]})") \
                from None
        raise UsageError(f"cannot read manifest {path}: "
                         f"{text.splitlines()[0] if text else type(exc).__name__}") from None


def _csv_blocks(path: str, delimiter: str) -> Iterator[pa.Table]:
    """Every column as text ("007" stays "007", an empty cell ""), a block at a time."""
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    read = pacsv.ReadOptions(block_size=BLOCK_BYTES, encoding="utf8")
    with open_input(path) as fh:  # the header first: its names are the columns to type
        names = pacsv.open_csv(fh, read_options=read, parse_options=parse).schema.names
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in names},
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
    with open_input(path) as fh:
        for batch in pacsv.open_csv(fh, read_options=read, parse_options=parse,
                                    convert_options=convert):
            yield pa.Table.from_batches([batch])


def _lines(fh) -> Iterator[pa.Table]:
    """One path a line; blank lines skipped; a byte-order mark at the start ignored."""
    first, lines = True, []
    for raw in fh:
        line = raw.decode("utf-8-sig" if first else "utf-8").rstrip("\r\n")
        first = False
        if line.strip():
            lines.append(line)
        if len(lines) == BATCH_ROWS:
            yield pa.table({"path": pa.array(lines, pa.string())})
            lines = []
    if lines:
        yield pa.table({"path": pa.array(lines, pa.string())})


def _items_from_manifest(spec) -> Iterator[pa.Table]:
    manifest_path = spec.location
    checked, offset = False, 0
    for table in read_manifest(manifest_path):
        if not checked:  # the columns, once: every block has the first one's
            path_column = _check_columns(spec, table.column_names, manifest_path)
            base = spec.root if spec.root is not None else _parent(manifest_path)
            checked = True
        if table.num_rows:
            yield _items(spec, table, path_column, base, offset)
        offset += table.num_rows
    if offset == 0:
        raise UsageError(f"manifest {manifest_path} is empty")


def _check_columns(spec, columns: list[str], manifest_path: str, say: bool = True) -> str:
    path_column = spec.path_column or _detect_path_column(columns, manifest_path)
    for option, name in (("--path-column", path_column), ("--id-column", spec.id_column)):
        if name is not None and name not in columns:
            raise UsageError(f"{option} {name!r} is not a column of {manifest_path} "
                             f"(columns: {', '.join(columns)})")
    if spec.id_column is None and say:
        named = [c for c in columns if c.lower() in ID_COLUMN_NAMES and c != path_column]
        if named:
            notice(f"{manifest_path} has a column {named[0]!r}: the keys are the paths of "
                   f"{path_column!r}; pass --id-column {named[0]} to key the rows by it")
    unknown = [c for c in spec.keep_columns if c not in columns]
    if unknown:
        raise UsageError(f"--keep-columns names {', '.join(unknown)}, not in {manifest_path} "
                         f"(columns: {', '.join(columns)})")
    return path_column


def _items(spec, table: pa.Table, path_column: str, base: str, offset: int) -> pa.Table:
    """key, path and the kept columns of one block; `offset`: rows in the blocks before."""
    manifest_path = spec.location
    listed = _as_text(table[path_column], path_column, manifest_path, offset)
    empty = pc.equal(pc.utf8_trim_whitespace(listed), "")
    if pc.any(empty).as_py():
        rows = [offset + i + 2 for i, e in enumerate(empty.to_pylist()) if e][:5]
        raise UsageError(f"{manifest_path}: empty path in column {path_column!r} "
                         f"(line(s) {', '.join(map(str, rows))})")
    keys = listed if spec.id_column is None else _as_text(
        table[spec.id_column], spec.id_column, manifest_path, offset)
    result = pa.table({"key": keys, "path": _resolve(listed, base)})
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


def _as_text(column: pa.ChunkedArray, name: str, manifest_path: Path,
             offset: int = 0) -> pa.ChunkedArray:
    if column.null_count:
        rows = [offset + i + 1 for i, v in enumerate(column.is_null().to_pylist()) if v][:5]
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


def _resolve(listed: pa.ChunkedArray, base: str) -> pa.ChunkedArray:
    """Relative paths resolve against base; absolute paths and URLs stay as they are (all
    at once, in Arrow: a Python call a row is minutes at 10^8 rows)."""
    kept = pc.or_(pc.or_(pc.match_substring(listed, "://"), pc.starts_with(listed, "file:")),
                  pc.starts_with(listed, "/") if os.sep == "/" else pc.match_substring_regex(
                      listed, r"^([A-Za-z]:)?[\\/]"))
    separator = "/" if is_remote(base) else os.sep
    joined = pc.binary_join_element_wise(base.rstrip(separator), listed, separator)
    return pc.if_else(kept, listed, joined).cast(pa.string())
