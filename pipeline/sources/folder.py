"""A folder of images, on local disk or under an object-store prefix, listed recursively."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa

from pipeline.errors import UsageError, notice
from pipeline.sources.base import Source, version_of, with_versions
from pipeline.storage import filesystem, is_remote, local_path, printable_path

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

    @classmethod
    def claims(cls, location: str, is_dir: bool) -> bool:
        return is_dir

    def list_items(self) -> pa.Table:
        spec = self.spec
        if spec.path_column or spec.id_column or spec.keep_columns or spec.image_column:
            raise UsageError("--path-column, --id-column and --keep-columns apply to manifests, "
                             f"but {spec.location} is a folder")
        remote = is_remote(spec.location)
        walk = _walk_prefix(spec.location) if remote else _walk_folder(local_path(spec.location))
        found: dict[str, tuple[int, str] | None] = {}
        passed_over: Counter[str] = Counter()
        for relative, version in walk:
            if any(part.startswith(".") for part in relative.split("/")):
                continue
            if _named_as_image(relative, passed_over):
                found[relative] = version
        _say_passed_over(passed_over)
        keys = sorted(found)
        if remote:
            base = spec.location.rstrip("/")
            paths = [f"{base}/{key}" for key in keys]
        else:  # resolves from anywhere (reports, users)
            base = printable_path(os.path.abspath(local_path(spec.location)))
            paths = [os.path.join(base, key) for key in keys]
        table = pa.table({"key": pa.array(keys, pa.string()), "path": pa.array(paths, pa.string())})
        return with_versions(table, [found[k] for k in keys]) if remote else table


def _walk_folder(root: str) -> Iterator[tuple[str, None]]:
    """Relative paths below a local folder; a subfolder that cannot be read is named."""
    unlisted: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted.append):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = os.path.relpath(dirpath, root)
        for name in filenames:
            relative = name if base == "." else f"{base}/{name}".replace(os.sep, "/")
            yield printable_path(relative), None
    for exc in unlisted:  # say so rather than leave its images out without a word
        notice(f"cannot list {printable_path(exc.filename)} ({exc.strerror}): the images "
               "in it, if any, are not in this run")


def _walk_prefix(location: str) -> Iterator[tuple[str, tuple[int, str]]]:
    """Relative paths below an object-store prefix, with each object's size and version."""
    fs, root = filesystem(location)
    root = root.rstrip("/")
    for path, info in fs.find(root, detail=True).items():
        yield path[len(root) + 1:], version_of(info)


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
