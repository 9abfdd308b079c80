"""The Source seam: one module per kind of source, one line each in KINDS; found by location."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.errors import UsageError
from pipeline.sources.base import (VERSION_COLUMNS, Source, SourceSpec, refuse_duplicate_keys,
                                   with_versions)
from pipeline.sources.folder import FolderSource
from pipeline.sources.manifest import ManifestSource
from pipeline.sources.parquet_images import ParquetImagesSource
from pipeline.sources.tar_shards import TarShardsSource
from pipeline.storage import filesystem, is_remote, local_path

__all__ = ["KINDS", "VERSION_COLUMNS", "Source", "SourceSpec", "open_source", "read_items",
           "read_source"]

# Asked in order; the first that claims the location reads it.
KINDS: list[type[Source]] = [TarShardsSource, ParquetImagesSource, FolderSource,
                             ManifestSource]


def open_source(spec: SourceSpec) -> Source:
    """The source kind that reads spec.location; a clear line if none does or it is missing."""
    for kind in KINDS:
        if kind.claims_pattern(spec.location):
            return kind(spec)
    if is_remote(spec.location):
        fs, root = filesystem(spec.location)
        is_dir, is_file = fs.isdir(root), fs.isfile(root)
    else:
        location = Path(local_path(spec.location))
        is_dir, is_file = location.is_dir(), location.is_file()
    if not (is_dir or is_file):
        raise UsageError(f"source not found: {spec.location}")
    for kind in KINDS:
        if kind.claims(spec.location, is_dir):
            return kind(spec)
    raise UsageError(f"{spec.location} is neither a folder nor a manifest (.csv .tsv "
                     ".parquet .jsonl .txt)")


def read_items(source: Source, versions: bool = False) -> pa.Table:
    """The source's items, checked: none at all or a key twice is refused before any work.

    With versions, also `source_size` and `source_version` (modification time in ns, or the
    object's ETag): what incremental runs compare to find changed images.
    """
    table = source.list_items()
    if table.num_rows == 0:
        raise UsageError(f"no images in {source.spec.location}")
    if not source.spec.allow_duplicates:
        refuse_duplicate_keys(table["key"], source.spec)
    has_versions = VERSION_COLUMNS[1] in table.column_names  # a listing that brings them
    if versions and not has_versions:
        table = with_versions(table, source.versions(table["path"].to_pylist()))
    elif has_versions and not versions:
        table = table.drop_columns(list(VERSION_COLUMNS))
    return table


def read_source(spec: SourceSpec, versions: bool = False) -> pa.Table:
    return read_items(open_source(spec), versions)
