"""Where files live: local paths, or fsspec URLs (s3://, gs://, ...) for sources and run directories.

A local commit is write-to-temporary, fsync, rename. Object stores have no atomic rename, but
an object appears only once its upload completes: there a commit is writing the object once,
and a failed or killed write leaves nothing behind. Local paths need no extra package; remote
ones need fsspec's backend for the scheme (`pip install '.[s3]'` for S3).
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import secrets
import shutil
import stat
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pipeline.errors import UsageError

TMP_MARK = ".tmp-"


@contextmanager
def atomic_path(path: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; on success flush it and rename it into place.

    A reader (or a resumed run) sees either the old file or the whole new one, never half.
    Without replace, an existing file stays and FileExistsError says so (a hard link, not a
    rename: the one atomic create-if-absent a file system offers).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and a random tag: unique even among hosts sharing one directory
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        _fsync(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            tmp.unlink()
        _fsync_directory(path.parent)  # the rename itself
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    try:
        _fsync(path)
    except OSError as exc:
        # Some file systems cannot fsync a directory at all (CIFS mounts before Linux 4.17
        # answer EINVAL, as RocksDB and libgit2 users found): the file itself is on disk,
        # and the rename is as durable as that file system makes it.
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            raise


def remove_temporaries(directory: Path, owned=lambda name: True) -> None:
    """Delete temporaries a killed run left behind (never a committed file)."""
    if not directory.is_dir():
        return
    for entry in os.scandir(directory):
        if (entry.name.startswith(".") and TMP_MARK in entry.name and entry.is_file()
                and owned(entry.name)):
            os.unlink(entry.path)


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def local_path(location: str) -> str:
    """The local path a path or a file: URL names.

    A file: URL is percent-encoded (RFC 8089): `Path.as_uri()` writes `file:///a%20b.jpg`,
    Spark's file listings `file:/a%20b.jpg`; both name `/a b.jpg`. A plain path is taken as
    it is, % and all.
    """
    if not location.startswith("file:"):
        return location
    path = location.removeprefix("file:")
    if path.startswith("//"):  # an authority: empty or localhost on this machine
        host, _, rest = path[2:].partition("/")
        path = "/" + rest if host in ("", "localhost") else path
    # surrogateescape: an encoded byte that is not UTF-8 names the same byte on disk
    return urllib.parse.unquote(path, errors="surrogateescape")


# A local path that is not valid UTF-8 (say, a Latin-1 file name from an old archive) cannot
# go into a Parquet or CSV column as it is: listings show each stray byte as \xNN, and
# reading an image turns them back into bytes when no file has the escaped name itself.
_ESCAPED_BYTE = re.compile(rb"\\x([0-9a-f]{2})")


def printable_path(path: str) -> str:
    """The path as valid UTF-8 text: bytes that are not UTF-8 become \\xNN."""
    return path if path.isascii() else os.fsencode(path).decode("utf-8", "backslashreplace")


def image_path(location: str) -> str:
    """The local file a listed image path names, \\xNN escapes and all."""
    path = local_path(location)
    if "\\x" in path and not os.path.lexists(path):
        return os.fsdecode(_ESCAPED_BYTE.sub(lambda m: bytes([int(m[1], 16)]), os.fsencode(path)))
    return path


def filesystem(location: str):
    """The fsspec filesystem for a URL, and the path within it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(location)
    except ImportError as exc:
        scheme = location.split("://", 1)[0]
        raise UsageError(f"{location}: reading {scheme}:// needs an extra package ({exc}); "
                         f"for S3: pip install 'label-images[s3]'") from None
    except ValueError as exc:
        raise UsageError(f"{location}: {exc}") from None


def read_bytes(location: str, max_bytes: int | None = None) -> bytes:
    """One image's bytes, from disk or object storage (workers call this concurrently).

    A local path must be a regular file; no more than max_bytes are read of anything. A FIFO
    named like an image would wait forever for a writer, a link to /dev/zero would never
    end, and a 50 GB file would be read whole into memory before anything could refuse it.
    """
    if not is_remote(location):
        # O_NONBLOCK: opening a FIFO returns at once (to be refused below) instead of waiting
        fd = os.open(image_path(location), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as fh:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            if not stat.S_ISREG(info.st_mode):
                raise OSError("not a regular file (a pipe, socket or device)")
            if max_bytes is not None and info.st_size > max_bytes:
                raise _too_large(info.st_size, max_bytes)
            if hasattr(os, "O_NONBLOCK"):
                os.set_blocking(fd, True)  # reads as usual, on any file system
            return fh.read()
    fs, path = filesystem(location)
    if max_bytes is None:
        return fs.cat_file(path)
    data = fs.cat_file(path, start=0, end=max_bytes + 1)  # one ranged request, bounded
    if len(data) > max_bytes:
        raise _too_large(fs.size(path), max_bytes)
    return data


def _too_large(size: int, max_bytes: int) -> OSError:
    return OSError(f"the file is {size / 2**20:,.1f} MB, more than an image within "
                   f"--max-pixels can take ({max_bytes / 2**20:,.1f} MB)")


def open_input(location: str) -> IO[bytes]:
    if not is_remote(location):
        return open(image_path(location), "rb")
    fs, path = filesystem(location)
    return fs.open(path, "rb")


class Store:
    """The files of one run directory, addressed by names relative to it ('parts/part-1')."""

    def __init__(self, location: str):
        self.location = location.rstrip("/") or location
        self.remote = is_remote(location)
        self._fs, self._pid = None, None
        self.root = filesystem(self.location)[1] if self.remote else local_path(self.location)

    @property
    def fs(self):
        # fsspec's async filesystems refuse to be used across fork (loader workers are
        # forked): each process gets its own instance.
        if self._pid != os.getpid():
            self._fs, self._pid = filesystem(self.location)[0], os.getpid()
        return self._fs

    def url(self, name: str = "") -> str:
        """The full path or URL of a name, for messages and for readers."""
        return f"{self.location}/{name}" if name else self.location

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name) if self.remote else os.path.join(self.root, name)

    def makedirs(self) -> None:
        if self.remote:
            self.fs.makedirs(self.root, exist_ok=True)  # buckets: a no-op beyond existing
        else:
            os.makedirs(self.root, exist_ok=True)

    def exists(self, name: str) -> bool:
        if not self.remote:
            return os.path.exists(self._path(name))
        self.fs.invalidate_cache(self._path(name))  # other processes write here too
        return self.fs.exists(self._path(name))

    def open(self, name: str) -> IO[bytes]:
        return self.fs.open(self._path(name), "rb") if self.remote else open(self._path(name),
                                                                             "rb")

    def read_text(self, name: str) -> str | None:
        try:
            with self.open(name) as fh:
                return fh.read().decode()
        except FileNotFoundError:
            return None

    def list(self, folder: str) -> list[str]:
        """Names (not paths) of the files directly in folder; empty if it does not exist."""
        path = self._path(folder)
        if self.remote:
            self.fs.invalidate_cache(path)  # other slices and ranks commit here too
            try:
                return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False)]
            except FileNotFoundError:
                return []
        return os.listdir(path) if os.path.isdir(path) else []

    def remove(self, name: str) -> None:
        path = self._path(name)
        if self.remote:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)

    def is_folder(self, name: str) -> bool:
        if self.remote:
            return self.fs.isdir(self._path(name))
        return os.path.isdir(self._path(name))

    def move(self, name: str, to: str) -> None:
        """`name` becomes `to`, replacing it: locally one atomic rename; an object store
        copies the whole object over `to` (which readers see change at once) and deletes."""
        if self.remote:
            self.fs.mv(self._path(name), self._path(to))
            return
        target = Path(self._path(to))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path(name), target)
        _fsync_directory(target.parent)

    @contextmanager
    def writing(self, name: str, replace: bool = True) -> Iterator[IO[bytes]]:
        """A file to write `name` through; it becomes visible whole, on success only.

        Without replace, locally, a file already there stays (FileExistsError). Object stores
        have no such check here: the last whole upload stands.
        """
        if self.remote:
            handle = self.fs.open(self._path(name), "wb")
            try:
                yield handle
            except BaseException:
                handle.discard()  # abort the upload: the object never appears
                raise
            handle.close()  # completes the upload: the object appears whole
            return
        with atomic_path(self._path(name), replace) as tmp, open(tmp, "wb") as handle:
            yield handle

    def write_text(self, name: str, text: str) -> None:
        with self.writing(name) as fh:
            fh.write(text.encode())
