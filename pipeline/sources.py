"""List a folder or read a manifest into a table of (key, path, extra columns); no torch."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.errors import UsageError, notice
from pipeline.storage import (filesystem, image_path, is_remote, local_path, open_input,
                              printable_path)
from pipeline.writer import output_schema

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
     ".avif", ".heic", ".heif", ".hif", ".jp2", ".j2k", ".ppm", ".pgm", ".pbm", ".pnm"}
)
MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".txt")
# Column names taken as the path column when --path-column is not given, in no order:
# more than one of them present is ambiguous and refused.
PATH_COLUMN_NAMES = frozenset(
    {"path", "filepath", "file_path", "filename", "file_name", "file", "image", "image_path",
     "img", "img_path", "url", "uri", "location"}
)
# What incremental runs compare to find changed images (they are kept in their tables).
VERSION_COLUMNS = ("source_size", "source_version")
# Output columns a passed-through manifest column may not shadow, optional ones included.
RESERVED_COLUMNS = frozenset(
    output_schema(1, pa.schema([]), {}, embedding_size=1).names) | frozenset(VERSION_COLUMNS)


@dataclass(frozen=True)
class SourceSpec:
    """Where the items come from and how a manifest is read."""

    location: str
    path_column: str | None = None
    id_column: str | None = None
    root: str | None = None
    keep_columns: tuple[str, ...] = ()
    allow_duplicates: bool = False

    def describe(self) -> dict:
        """The parts of the spec that decide which items a run labels (for the fingerprint)."""
        return {
            "location": _absolute(self.location),
            "path_column": self.path_column,
            "id_column": self.id_column,
            "root": _absolute(self.root) if self.root else None,
            "keep_columns": list(self.keep_columns),
        }


def read_source(spec: SourceSpec, versions: bool = False) -> pa.Table:
    """Return the items as a table: `key`, `path` (as it will be read), then kept columns.

    With versions, also `source_size` and `source_version` (modification time in ns, or the
    object's ETag): what incremental runs compare to find changed images.
    """
    if is_remote(spec.location):
        fs, root = filesystem(spec.location)
        is_dir, is_file = fs.isdir(root), fs.isfile(root)
    else:
        location = Path(local_path(spec.location))
        is_dir, is_file = location.is_dir(), location.is_file()
    if is_dir:
        if spec.path_column or spec.id_column or spec.keep_columns:
            raise UsageError(
                "--path-column, --id-column and --keep-columns apply to manifests, "
                f"but {spec.location} is a folder"
            )
        table = (list_remote_directory(spec.location) if is_remote(spec.location)
                 else list_directory(location))
    elif is_file:
        table = _items_from_manifest(spec)
    else:
        raise UsageError(f"source not found: {spec.location}")
    if table.num_rows == 0:
        raise UsageError(f"no images in {spec.location}")
    if not spec.allow_duplicates:
        _refuse_duplicate_keys(table["key"], spec)
    has_versions = VERSION_COLUMNS[1] in table.column_names  # an object-store listing
    if versions and not has_versions:
        table = _with_versions(table, _versions(table["path"].to_pylist()))
    elif has_versions and not versions:
        table = table.drop_columns(list(VERSION_COLUMNS))
    return table


def _with_versions(table: pa.Table, versions: list[tuple[int, str]]) -> pa.Table:
    sizes, stamps = zip(*versions) if versions else ((), ())
    size_column, version_column = VERSION_COLUMNS
    table = table.append_column(size_column, pa.array(sizes, pa.int64()))
    return table.append_column(version_column, pa.array(stamps, pa.string()))


def _versions(paths: list[str]) -> list[tuple[int, str]]:
    """(size, version) per path; (-1, "missing") for what cannot be found."""
    remote = [p for p in paths if is_remote(p)]
    infos = {}
    if remote:
        with ThreadPoolExecutor(32) as pool:  # one request each: overlap them
            infos = dict(zip(remote, pool.map(_remote_version, remote)))
    result = []
    for path in paths:
        if path in infos:
            result.append(infos[path])
            continue
        try:
            st = os.stat(image_path(path))
            result.append((st.st_size, str(st.st_mtime_ns)))
        except OSError:
            result.append((-1, "missing"))
    return result


def _remote_version(location: str) -> tuple[int, str]:
    fs, path = filesystem(location)  # per URL: a manifest may mix stores
    try:
        return _version_of(fs.info(path))
    except OSError:  # FileNotFoundError included
        return -1, "missing"


def _version_of(info: dict) -> tuple[int, str]:
    """Size and a change stamp from an fsspec info dict: the ETag where the store has one."""
    version = info.get("ETag") or info.get("etag") or info.get("md5Hash") or str(
        info.get("mtime") or info.get("LastModified") or "")
    return int(info.get("size") or 0), str(version).strip('"')


def list_directory(root: Path) -> pa.Table:
    """Image files below root, recursively, sorted by relative path; hidden entries skipped.

    The key is the path relative to root (stable when the folder moves); symlinked
    folders are not followed (no cycles), symlinked files are listed, broken ones too,
    so that they become error rows instead of vanishing.
    """
    relative: list[str] = []
    unlisted: list[OSError] = []
    passed_over: Counter[str] = Counter()
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted.append):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith(".") or not _named_as_image(name, passed_over):
                continue
            relative.append(printable_path(
                name if base == "." else f"{base}/{name}".replace(os.sep, "/")))
    for exc in unlisted:  # say so rather than leave its images out without a word
        notice(f"cannot list {printable_path(exc.filename)} ({exc.strerror}): the images "
               "in it, if any, are not in this run")
    _say_passed_over(passed_over)
    base = printable_path(os.path.abspath(root))  # resolves from elsewhere (reports, users)
    return _listing(relative, lambda rel: os.path.join(base, rel))


def list_remote_directory(location: str) -> pa.Table:
    """The same listing under an object-store prefix: keys relative to it, paths as URLs.

    The listing already carries each object's size and ETag: they are kept for incremental
    runs, so that no object is asked about twice.
    """
    fs, root = filesystem(location)
    root = root.rstrip("/")
    relative, infos = [], []
    passed_over: Counter[str] = Counter()
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root) + 1:]
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):
            continue
        if _named_as_image(parts[-1], passed_over):
            relative.append(rel)
            infos.append(_version_of(info))
    _say_passed_over(passed_over)
    base = location.rstrip("/")
    table = _listing(relative, lambda rel: f"{base}/{rel}")
    order = sorted(range(len(relative)), key=relative.__getitem__)  # _listing sorts keys
    return _with_versions(table, [infos[i] for i in order])


def _named_as_image(name: str, passed_over: Counter[str]) -> bool:
    """Whether a file's extension is an image's; the others are counted, by extension."""
    extension = os.path.splitext(name)[1].lower()
    if extension in IMAGE_EXTENSIONS:
        return True
    passed_over[extension] += 1
    return False


def _say_passed_over(extensions: Counter[str]) -> None:
    """One line on the files a folder holds besides images: none is left out unseen."""
    if not extensions:
        return
    most = sorted(extensions.items(), key=lambda item: (-item[1], item[0]))[:5]
    kinds = ", ".join(f"{extension or '(no extension)'} {count:,}" for extension, count in most)
    if len(extensions) > 5:
        kinds += ", ..."
    notice(f"passed over {extensions.total():,} file(s) not named as images ({kinds}); "
           "a manifest that lists them has them labelled, whatever their names")


def _listing(relative: list[str], full_path) -> pa.Table:
    relative.sort()
    paths = [full_path(rel) for rel in relative]
    return pa.table({"key": pa.array(relative, pa.string()), "path": pa.array(paths, pa.string())})


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


def _items_from_manifest(spec: SourceSpec) -> pa.Table:
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
    clashing = [c for c in spec.keep_columns if c in RESERVED_COLUMNS]
    if clashing:
        raise UsageError(f"--keep-columns {', '.join(clashing)} would clash with output columns "
                         f"of the same name; rename them in the manifest")

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


def _absolute(location: str) -> str:
    return location if is_remote(location) else os.path.abspath(local_path(location))


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


def _refuse_duplicate_keys(keys: pa.ChunkedArray, spec: SourceSpec) -> None:
    counts = pc.value_counts(keys)
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):
        examples = ", ".join(repr(v) for v in repeated.field("values")[:5].to_pylist())
        what = "id" if spec.id_column else "path"
        raise UsageError(f"{len(repeated)} {what}(s) appear more than once in {spec.location} "
                         f"(e.g. {examples}); fix the manifest or pass --allow-duplicates")
