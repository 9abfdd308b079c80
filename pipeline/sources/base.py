"""The Source interface: what a run labels (items) and how their bytes are read.

A kind of source is a subclass of `Source` in a module of this package and one line in
`KINDS` (pipeline/sources/__init__.py). It lists its items as a table (`key`, `path` as
the locator, kept columns, and with versions `source_size` and `source_version`) and reads
the bytes of a batch of them, returning each item's failure as a value: one unreadable file
fails only its own row.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.storage import filesystem, image_path, is_remote, local_path, read_bytes

# What incremental runs compare to find changed images (they are kept in their tables).
VERSION_COLUMNS = ("source_size", "source_version")
# Object reads in flight per process: a batch's requests overlap, so a store's latency is
# paid about once per 16 images rather than once per image, without more decoding processes.
REMOTE_READS = 16


@dataclass(frozen=True)
class SourceSpec:
    """Where the items come from and how a manifest is read."""

    location: str
    path_column: str | None = None
    id_column: str | None = None
    root: str | None = None
    keep_columns: tuple[str, ...] = ()
    allow_duplicates: bool = False
    image_column: str | None = None  # sources that hold the images' bytes
    # the run's --option values: a kind reads those it declares (options.declared)
    options: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def key_noun(self) -> str:
        """What a key is, for messages: the manifest's id, or the path."""
        return "id" if self.id_column else "path"

    def describe(self) -> dict:
        """What decides which items a run labels: in the fingerprint, so a resume that
        names another source (or reads it another way) is refused."""
        return {
            "location": absolute(self.location),
            "path_column": self.path_column,
            "id_column": self.id_column,
            "root": absolute(self.root) if self.root else None,
            "keep_columns": list(self.keep_columns),
            **({"image_column": self.image_column} if self.image_column else {}),
        }


class Source:
    """One kind of source. Subclasses say which locations they take and list their items."""

    # Whether each item is a file of its own at its path (folders, manifests), rather than
    # a part of one (a tar's member, a Parquet row): what a tool opening paths can open.
    holds_files = True
    # Whether its listing brings each item's size and version at little cost (a folder's
    # walk, an object-store listing, an inventory report): then every run records them, so
    # a plain run's table can become a nightly one. A manifest names paths only; asking
    # about each (a stat, a HEAD) is left to the nights, which need it.
    lists_versions = False
    options: tuple = ()  # options.Option: what this kind declares (--option NAME=VALUE)

    def __init__(self, spec: SourceSpec):
        self.spec = spec

    @classmethod
    def kind(cls) -> str:
        """Its name in messages: FolderSource is `folder`."""
        return cls.__name__.removesuffix("Source").lower()

    def describe(self) -> dict:
        """What decides which items a run labels (the fingerprint's source)."""
        return self.spec.describe()

    def check(self) -> None:
        """Its cheap refusals (a column that is not there), said before the model is loaded:
        a glance, never a listing. Kinds with nothing cheap to check keep this."""

    @classmethod
    def claims_pattern(cls, location: str) -> bool:
        """Whether `location` is a pattern of this kind's (it names no one file to check)."""
        return False

    @classmethod
    def claims(cls, location: str, is_dir: bool) -> bool:
        """Whether this kind reads `location` (a folder or prefix when is_dir, else a file)."""
        raise NotImplementedError

    def list_items(self) -> pa.Table:
        """key, path, then kept columns (and, if the listing has them, the versions)."""
        raise NotImplementedError

    def batches(self) -> Iterator[pa.Table]:
        """The items a batch at a time, in order: a kind that can list without holding
        everything (manifests, local folders) overrides this; the rest list at once."""
        yield self.list_items()

    def fetch(self, paths: list[str], max_bytes: int) -> list[bytes | Exception]:
        """The bytes behind each path (files: local or object store), or why not.

        On object storage the requests overlap: a batch pays the latency about once.
        """
        def read(path: str) -> bytes | Exception:
            try:
                return read_bytes(path, max_bytes=max_bytes)
            except (OSError, ValueError, RuntimeError, EOFError) as exc:  # gone, refused, ...
                return exc
        if any(is_remote(path) for path in paths):
            if getattr(self, "_readers", None) is None:  # made in the worker, never forked
                self._readers = ThreadPoolExecutor(REMOTE_READS)
            return list(self._readers.map(read, paths))
        return [read(path) for path in paths]

    def versions(self, paths: list[str]) -> list[tuple[int, str]]:
        """(size, version) per path, (-1, "missing") for what is gone: what a night compares."""
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


def with_versions(table: pa.Table, versions: list[tuple[int, str]]) -> pa.Table:
    sizes, stamps = zip(*versions) if versions else ((), ())
    size_column, version_column = VERSION_COLUMNS
    table = table.append_column(size_column, pa.array(sizes, pa.int64()))
    return table.append_column(version_column, pa.array(stamps, pa.string()))


def _remote_version(location: str) -> tuple[int, str]:
    fs, path = filesystem(location)  # per URL: a manifest may mix stores
    try:
        return version_of(fs.info(path))
    except OSError:  # FileNotFoundError included
        return -1, "missing"


def version_of(info: dict) -> tuple[int, str]:
    """Size and a change stamp from an fsspec info dict: the ETag where the store has one."""
    version = info.get("ETag") or info.get("etag") or info.get("md5Hash") or str(
        info.get("mtime") or info.get("LastModified") or "")
    return int(info.get("size") or 0), str(version).strip('"')


def absolute(location: str) -> str:
    return location if is_remote(location) else os.path.abspath(local_path(location))
