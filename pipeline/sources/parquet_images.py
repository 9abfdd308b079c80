"""Parquet files that hold the images' bytes in a column: img2dataset's output, HF datasets.

The image column is `binary`, or Hugging Face's `Image` struct (`bytes`, `path`);
`--image-column` names it, else the one such column is taken. A row is located as
`FILE#row=N`; reading a batch reads only the image column of the row groups it falls in,
one row group held at a time, so memory is bounded by a shard, not by the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

import pyarrow.fs

from pipeline.errors import ImageError, UsageError
from pipeline.sources.base import Source
from pipeline.storage import filesystem, is_remote, local_path

_ROW = re.compile(r"^(?P<file>.+)#row=(?P<row>\d+)$")


def image_columns(schema: pa.Schema) -> list[str]:
    """Columns that can hold an image's bytes: binary, or a struct with binary `bytes`."""
    found = []
    for f in schema:
        kind = f.type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            found.append(f.name)
        elif pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and (
                pa.types.is_binary(kind.field("bytes").type)
                or pa.types.is_large_binary(kind.field("bytes").type)):
            found.append(f.name)
    return found


class ParquetImagesSource(Source):
    """Rows of Parquet files (one file, or a folder or prefix of them) with image bytes."""

    holds_files = False

    @classmethod
    def claims(cls, location: str, is_dir: bool) -> bool:
        files = _parquet_files(location) if is_dir else (
            [location] if location.lower().endswith(".parquet") else [])
        if not files:
            return False
        return bool(image_columns(_open_parquet(files[0]).schema_arrow))

    def batches(self) -> Iterator[pa.Table]:
        """A file's rows at a time (their keys and locators; the image bytes are read when
        labelled): a folder of many files is never listed whole before the plan."""
        spec = self.spec
        if spec.path_column or spec.root:
            raise UsageError("--path-column and --root apply to manifests of paths, but "
                             f"{spec.location} holds the images themselves")
        for file in self._files():
            source = _open_parquet(file)
            self.image_column(source.schema_arrow, file)  # there, or one line why not
            names = source.schema_arrow.names
            wanted = [c for c in (spec.id_column, *spec.keep_columns) if c]
            missing = [c for c in wanted if c not in names]
            if missing:
                raise UsageError(f"{', '.join(missing)}: not a column of {file} "
                                 f"(columns: {', '.join(names)})")
            rows = source.read(columns=wanted) if wanted else pa.table(
                {"_": pa.nulls(source.metadata.num_rows)})
            count = rows.num_rows
            locators = [f"{file}#row={i}" for i in range(count)]
            if spec.id_column:
                keys = rows[spec.id_column].cast(pa.string())
            else:  # the file's name and the row: stable while the file is
                stem = os.path.basename(file)
                keys = pa.array([f"{stem}#{i}" for i in range(count)], pa.string())
            table = pa.table({"key": keys, "path": pa.array(locators, pa.string())})
            for name in spec.keep_columns:
                table = table.append_column(name, rows[name])
            if table.num_rows:
                yield table

    def list_items(self) -> pa.Table:
        tables = list(self.batches())
        return pa.concat_tables(tables) if tables else pa.table(
            {"key": pa.array([], pa.string()), "path": pa.array([], pa.string())})

    def image_column(self, schema: pa.Schema, file: str) -> str:
        if self.spec.image_column:
            if self.spec.image_column not in schema.names:
                raise UsageError(f"--image-column {self.spec.image_column!r} is not a column "
                                 f"of {file} (columns: {', '.join(schema.names)})")
            return self.spec.image_column
        found = image_columns(schema)
        if len(found) != 1:
            raise UsageError(f"{file} has {len(found)} columns that could hold image bytes "
                             f"({', '.join(found) or 'none'}); pass --image-column")
        return found[0]

    def _files(self) -> list[str]:
        location = self.spec.location
        if location.lower().endswith(".parquet") and not _is_dir(location):
            return [location]
        return _parquet_files(location)

    def fetch(self, paths: list[str], max_bytes: int) -> list[bytes | Exception]:
        """Each row's image bytes: the image column of the row groups the rows fall in."""
        found: list[bytes | Exception] = []
        for path in paths:
            match = _ROW.match(path)
            if match is None:
                found.append(ValueError(f"not a row of a Parquet file: {path}"))
                continue
            try:
                value = self._row(match["file"], int(match["row"]))
            except (OSError, pa.ArrowException) as exc:
                found.append(OSError(f"cannot read its row: {exc}"))
                continue
            if value is None:  # img2dataset keeps a failed download as a row without bytes
                found.append(ImageError("no image bytes in this row"))
            elif len(value) > max_bytes:
                found.append(OSError(f"{len(value) / 2**20:,.1f} MB of image bytes, more "
                                     "than an image within --max-pixels can take"))
            else:
                found.append(value)
        return found

    def _row(self, file: str, row: int) -> bytes | None:
        cached = getattr(self, "_open", None)
        # Per process: a loader worker forked with the parent's open file would share its
        # file offset with the parent and its siblings.
        if cached is None or cached[:2] != (os.getpid(), file):
            parquet = _open_parquet(file)
            starts = [0]
            for group in range(parquet.num_row_groups):
                starts.append(starts[-1] + parquet.metadata.row_group(group).num_rows)
            column = self.image_column(parquet.schema_arrow, file)
            cached = self._open = (os.getpid(), file, parquet, starts, column, [None, None])
        _, _, parquet, starts, column, group_cache = cached
        group = next(g for g in range(len(starts) - 1) if starts[g] <= row < starts[g + 1])
        if group_cache[0] != group:  # one row group's image column held at a time
            group_cache[:] = [group, parquet.read_row_group(group, columns=[column])[column]]
        value = group_cache[1][row - starts[group]].as_py()
        if isinstance(value, dict):  # Hugging Face's Image struct
            value = value.get("bytes")
        return value

    def versions(self, paths: list[str]) -> list[tuple[int, str]]:
        """A row changes with its file: the file's size and version, asked once a file."""
        files = [(_ROW.match(p) or {"file": p})["file"] for p in paths]
        unique = sorted(set(files))
        known = dict(zip(unique, super().versions(unique)))
        return [known[f] for f in files]


def _open_parquet(location: str) -> pq.ParquetFile:
    """Through pyarrow's own files (closed with the object, no Python file left open)."""
    if is_remote(location):
        fs, path = filesystem(location)
        files = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
        return pq.ParquetFile(files.open_input_file(path))
    return pq.ParquetFile(local_path(location))


def _is_dir(location: str) -> bool:
    if is_remote(location):
        fs, root = filesystem(location)
        return fs.isdir(root)
    return os.path.isdir(local_path(location))


def _parquet_files(location: str) -> list[str]:
    """The .parquet files directly in a folder or under a prefix, sorted (no hidden ones)."""
    return sorted(_listed(location))


def _listed(location: str) -> Iterator[str]:
    if is_remote(location):
        fs, root = filesystem(location)
        base = location.rstrip("/")
        for path in fs.ls(root, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.lower().endswith(".parquet") and not name.startswith((".", "_")):
                yield f"{base}/{name}"
        return
    folder = local_path(location)
    for name in os.listdir(folder):
        if name.lower().endswith(".parquet") and not name.startswith((".", "_")):
            yield os.path.join(os.path.abspath(folder), name)
