"""The Source seam: one module per kind of source, one line each in KINDS; found by location."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from pipeline.errors import UsageError
from pipeline.keys import KeySpool
from pipeline.sources.base import VERSION_COLUMNS, Source, SourceSpec, with_versions
from pipeline.sources.folder import FolderSource
from pipeline.sources.inventory import InventorySource
from pipeline.sources.manifest import ManifestSource
from pipeline.sources.parquet_images import ParquetImagesSource
from pipeline.sources.tar_shards import TarShardsSource
from pipeline.storage import filesystem, is_remote, local_path

__all__ = ["KINDS", "VERSION_COLUMNS", "Source", "SourceSpec", "first_items", "listing",
           "open_source", "read_items", "read_source"]

# Asked in order; the first that claims the location reads it.
KINDS: list[type[Source]] = [TarShardsSource, ParquetImagesSource, InventorySource,
                             FolderSource, ManifestSource]


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


def listing(source: Source, versions: bool = False) -> Iterator[pa.Table]:
    """The source's items a batch at a time, as its kind lists them (a manifest a block, a
    folder a page of its walk): key, path, kept columns. With versions, also `source_size`
    and `source_version` (modification time in ns, or the object's ETag): what incremental
    runs compare to find changed images. Empty and repeated keys are the plan's to refuse
    (plan.freeze), which sees every batch."""
    for table in source.batches():
        has_versions = VERSION_COLUMNS[1] in table.column_names  # a listing that brings them
        if versions and not has_versions:
            table = with_versions(table, source.versions(table["path"].to_pylist()))
        elif has_versions and not versions:
            table = table.drop_columns(list(VERSION_COLUMNS))
        yield table


def first_items(source: Source, count: int) -> pa.Table:
    """The first `count` items, listing no further than needed (bench's sample)."""
    found, rows = [], 0
    for table in listing(source):
        found.append(table.slice(0, count - rows))
        rows += found[-1].num_rows
        if rows >= count:
            break
    if not rows:
        raise UsageError(f"no images in {source.spec.location}")
    return pa.concat_tables(found)


def read_items(source: Source, versions: bool = False) -> pa.Table:
    """The whole listing in memory, checked as a plan is: for small sources (tests)."""
    tables = list(listing(source, versions))
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        raise UsageError(f"no images in {source.spec.location}")
    if not source.spec.allow_duplicates:
        spool = KeySpool()
        try:
            spool.add(table["key"])
            spool.refuse_duplicates(source.spec.location, source.spec.key_noun)
        finally:
            spool.close()
    return table


def read_source(spec: SourceSpec, versions: bool = False) -> pa.Table:
    return read_items(open_source(spec), versions)
