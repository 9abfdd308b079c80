"""A folder of images, on local disk or under an object-store prefix, listed recursively."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import UsageError, notice
from pipeline.sources.base import Source, version_of, with_versions
from pipeline.storage import filesystem, is_remote, local_path, printable_path

BATCH_ROWS = 65_536  # keys a batch of the listing
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
     ".avif", ".heic", ".heif", ".hif", ".jp2", ".j2k", ".ppm", ".pgm", ".pbm", ".pnm"}
)


class FolderSource(Source):
    """Image files below a folder or prefix, sorted by relative path; hidden entries skipped.

    The key is the path relative to the folder (stable when the folder moves). Locally,
    symlinked folders are not followed (no cycles), symlinked files are listed, broken ones
    too, so that they become error rows instead of vanishing. An object-store listing
    brings each object's size and ETag: kept for incremental runs, so no object is asked
    about twice.
    """

    lists_versions = True  # the walk's stat, or the object listing's size and ETag

    @classmethod
    def claims(cls, location: str, is_dir: bool) -> bool:
        return is_dir

    def batches(self) -> Iterator[pa.Table]:
        """Local folders a batch at a time in key order (a walk in sorted order, never
        the whole listing held); an object-store prefix in one listing, with versions."""
        spec = self.spec
        if spec.path_column or spec.id_column or spec.keep_columns or spec.image_column:
            raise UsageError("--path-column, --id-column and --keep-columns apply to manifests, "
                             f"but {spec.location} is a folder")
        passed_over: Counter[str] = Counter()
        if is_remote(spec.location):
            yield from self._prefix_items(passed_over)
        else:
            base = printable_path(os.path.abspath(local_path(spec.location)))
            keys: list[str] = []
            for relative in _walk_folder(local_path(spec.location)):
                if _named_as_image(relative, passed_over):
                    keys.append(relative)
                if len(keys) == BATCH_ROWS:
                    yield _local_items(keys, base)
                    keys = []
            if keys:
                yield _local_items(keys, base)
        say_passed_over(passed_over)

    def list_items(self) -> pa.Table:
        return pa.concat_tables(self.batches())

    def _prefix_items(self, passed_over: Counter[str]) -> Iterator[pa.Table]:
        """The prefix's images a batch at a time, as the store lists them (S3: a page at a
        time, in key order, never the whole listing held)."""
        base = self.spec.location.rstrip("/")
        found: list[tuple[str, tuple[int, str]]] = []
        for relative, version in _walk_prefix(self.spec.location):
            if any(part.startswith(".") for part in relative.split("/")):
                continue
            if _named_as_image(relative, passed_over):
                found.append((relative, version))
            if len(found) == BATCH_ROWS:
                yield _prefix_batch(found, base)
                found = []
        if found:
            yield _prefix_batch(found, base)


def _prefix_batch(found: list[tuple[str, tuple[int, str]]], base: str) -> pa.Table:
    keys = [key for key, _ in found]
    table = pa.table({"key": pa.array(keys, pa.string()),
                      "path": pa.array([f"{base}/{key}" for key in keys], pa.string())})
    return with_versions(table, [version for _, version in found])


def _local_items(keys: list[str], base: str) -> pa.Table:
    """Paths that resolve from anywhere (reports, users)."""
    return pa.table({"key": pa.array(keys, pa.string()),
                     "path": pa.array([os.path.join(base, key) for key in keys], pa.string())})


def _walk_folder(root: str, relative: str = "") -> Iterator[str]:
    """Relative paths below a local folder, in sorted order of the relative path (printable,
    as keys are): entries sorted by name, a folder's as its name and "/", so that its files
    come just where a sort of every key would put them. Hidden entries and symlinked folders
    are passed over; a subfolder that cannot be read is named."""
    try:
        with os.scandir(os.path.join(root, relative) if relative else root) as found:
            entries = []
            for entry in found:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    if not is_dir and entry.is_symlink() and entry.is_dir():
                        continue  # a symlinked folder: not followed (no cycles)
                except OSError:
                    is_dir = False
                name = printable_path(entry.name)
                entries.append((name + "/" if is_dir else name, entry.name, is_dir))
    except OSError as exc:
        # say so rather than leave its images out without a word
        notice(f"cannot list {printable_path(exc.filename or relative)} ({exc.strerror}): "
               "the images in it, if any, are not in this run")
        return
    for shown, name, is_dir in sorted(entries):
        path = f"{relative}/{name}" if relative else name
        if is_dir:
            yield from _walk_folder(root, path)
        else:
            yield printable_path(path)


# Objects asked for a request of the listing (S3's most; the tests ask for small pages)
LIST_PAGE = 1000


def _walk_prefix(location: str) -> Iterator[tuple[str, tuple[int, str]]]:
    """Relative paths below an object-store prefix, in key order, with each object's size
    and version. S3 is listed a page at a time (list_objects_v2 and its continuation
    token, through s3fs's retrying call); another store in one listing, sorted here."""
    fs, root = filesystem(location)
    root = root.rstrip("/")
    if not hasattr(fs, "_call_s3"):
        listed = fs.find(root, detail=True)
        for path in sorted(listed):
            yield path[len(root) + 1:], version_of(listed[path])
        return
    from fsspec.asyn import sync

    bucket, _, key = root.partition("/")
    request = {"Bucket": bucket, "Prefix": f"{key}/" if key else "", "MaxKeys": LIST_PAGE}
    while True:
        page = sync(fs.loop, fs._call_s3, "list_objects_v2", **request)
        for entry in page.get("Contents", []):
            if entry["Key"].endswith("/"):  # a "folder" placeholder object
                continue
            info = {"size": entry["Size"], "ETag": entry.get("ETag")}
            yield entry["Key"][len(request["Prefix"]):], version_of(info)
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _named_as_image(name: str, passed_over: Counter[str]) -> bool:
    """Whether a file's extension is an image's; the others are counted, by extension."""
    extension = os.path.splitext(name)[1].lower()
    if extension in IMAGE_EXTENSIONS:
        return True
    passed_over[extension] += 1
    return False


def images_among(keys: pa.ChunkedArray | pa.Array, passed_over: Counter[str]) -> pa.Array:
    """A mask of the keys named as images, all at once; the others counted by extension."""
    pattern = "(" + "|".join(e.replace(".", "\\.") for e in sorted(IMAGE_EXTENSIONS)) + ")$"
    mask = pc.match_substring_regex(pc.utf8_lower(keys), pattern)
    others = pc.filter(keys, pc.invert(mask)).to_pylist()
    passed_over.update(os.path.splitext(name)[1].lower() for name in others)
    return mask


def say_passed_over(extensions: Counter[str]) -> None:
    """One line on the files a folder holds besides images: none is left out unseen."""
    if not extensions:
        return
    most = sorted(extensions.items(), key=lambda item: (-item[1], item[0]))[:5]
    kinds = ", ".join(f"{extension or '(no extension)'} {count:,}" for extension, count in most)
    if len(extensions) > 5:
        kinds += ", ..."
    notice(f"passed over {extensions.total():,} file(s) not named as images ({kinds}); "
           "a manifest that lists them has them labelled, whatever their names")
