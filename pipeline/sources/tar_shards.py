"""WebDataset tar shards: a `.tar`, a brace pattern of them, or a folder or prefix of them.

A sample is the members sharing a key (the member's name up to the first dot of its base
name, as WebDataset groups them); its image is the first member named as an image. Listing
reads each tar once, front to back, as a stream (one request per tar on object storage),
and keeps where each image's bytes lie; a batch then reads the span of its images in one
read of each tar it touches.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator

import pyarrow as pa

from pipeline.errors import ImageError, UsageError, notice
from pipeline.sources.base import Source
from pipeline.sources.folder import IMAGE_EXTENSIONS
from pipeline.storage import filesystem, is_remote, local_path, open_input

# FILE#MEMBER@OFFSET+SIZE: where an image's bytes lie; FILE#MEMBER! names what went wrong
_LOCATED = re.compile(r"^(?P<tar>.+?\.tar)#(?P<member>.*)@(?P<offset>\d+)\+(?P<size>\d+)$")
_BRACES = re.compile(r"\{(?P<first>\d+)\.\.(?P<last>\d+)\}")
_PROBLEM = re.compile(r"^(?P<tar>.+?\.tar)#(?P<member>.*?)!(?P<problem>.+)$")


class TarShardsSource(Source):
    """Samples of WebDataset tars; a sample without an image, or a truncated tar, is an
    error row of its own, never a silent gap."""

    holds_files = False

    @classmethod
    def claims_pattern(cls, location: str) -> bool:
        return location.lower().endswith(".tar") and _BRACES.search(location) is not None

    @classmethod
    def claims(cls, location: str, is_dir: bool) -> bool:
        if not is_dir:
            return location.lower().endswith(".tar")
        return bool(_tars(location))

    def batches(self) -> Iterator[pa.Table]:
        """A tar's samples at a time, each tar read once as a stream: a collection of
        thousands of shards is never listed whole before the plan takes its first rows."""
        spec = self.spec
        if spec.path_column or spec.root or spec.id_column:
            raise UsageError("--path-column, --root and --id-column apply to manifests, but "
                             f"{spec.location} holds tar shards")
        location = spec.location
        if self.claims_pattern(location):
            tars = expand_braces(location)
        else:
            tars = [location] if location.lower().endswith(".tar") else _tars(location)
        for tar in tars:
            keys: list[str] = []
            paths: list[str] = []
            kept: dict[str, list[str | None]] = {name: [] for name in spec.keep_columns}
            for key, path, fields in _samples(tar, spec.keep_columns):
                keys.append(key)
                paths.append(path)
                for name, values in kept.items():
                    values.append(fields.get(name))
            if not keys:
                continue
            table = pa.table({"key": pa.array(keys, pa.string()),
                              "path": pa.array(paths, pa.string())})
            for name, values in kept.items():
                table = table.append_column(name, pa.array(values, pa.string()))
            yield table

    def list_items(self) -> pa.Table:
        tables = list(self.batches())
        return pa.concat_tables(tables) if tables else pa.table(
            {"key": pa.array([], pa.string()), "path": pa.array([], pa.string())})

    def fetch(self, paths: list[str], max_bytes: int) -> list[bytes | Exception]:
        """Each image's bytes; the images of one tar in a batch come in one read."""
        found: dict[int, bytes | Exception] = {}
        spans: dict[str, list[tuple[int, int, int]]] = {}
        for position, path in enumerate(paths):
            located = _LOCATED.match(path)
            if located is None:
                problem = _PROBLEM.match(path)
                found[position] = ImageError(problem["problem"] if problem else
                                             f"not an image of a tar shard: {path}")
                continue
            size = int(located["size"])
            if size > max_bytes:
                found[position] = OSError(f"the member is {size / 2**20:,.1f} MB, more than "
                                          "an image within --max-pixels can take")
                continue
            spans.setdefault(located["tar"], []).append(
                (position, int(located["offset"]), size))
        for tar, members in spans.items():
            start = min(offset for _, offset, _ in members)
            end = max(offset + size for _, offset, size in members)
            try:
                with open_input(tar) as fh:
                    fh.seek(start)
                    data = fh.read(end - start)
            except OSError as exc:
                for position, _, _ in members:
                    found[position] = exc
                continue
            for position, offset, size in members:
                piece = data[offset - start:offset - start + size]
                found[position] = piece if len(piece) == size else OSError(
                    "the tar ends before this member's bytes")
        return [found[position] for position in range(len(paths))]

    def versions(self, paths: list[str]) -> list[tuple[int, str]]:
        """A sample changes with its tar: the tar's size and version, asked once a tar."""
        tars = [path.split("#", 1)[0] for path in paths]
        unique = sorted(set(tars))
        known = dict(zip(unique, super().versions(unique)))
        return [known[tar] for tar in tars]


def expand_braces(pattern: str) -> list[str]:
    """`shards/{00000..00002}.tar` -> shards/00000.tar ... shards/00002.tar (zero-padded as
    written; several groups multiply), as WebDataset and img2dataset write them."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    first, last = match["first"], match["last"]
    width = len(first) if first.startswith("0") else 0
    if int(last) < int(first):
        raise UsageError(f"{pattern}: {{{first}..{last}}} counts down")
    return [expanded for number in range(int(first), int(last) + 1)
            for expanded in expand_braces(
                pattern[:match.start()] + str(number).zfill(width) + pattern[match.end():])]


def _samples(tar: str, keep: tuple[str, ...] = ()
             ) -> Iterator[tuple[str, str, dict[str, str | None]]]:
    """(key, locator, kept fields) of each sample of one tar, in the tar's order.

    Kept fields: `txt` and `cls` are those members' text; any other name is a field of the
    sample's `json` member (as text; JSON for lists and objects).
    """
    order: list[str] = []
    images: dict[str, str] = {}
    others: dict[str, list[str]] = {}
    fields: dict[str, dict[str, str | None]] = {}
    truncated = None
    try:
        # "r|": a stream, read once front to back (no seeking back on object storage)
        with open_input(tar) as fh, tarfile.open(fileobj=fh, mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, dot, suffix = name.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                if key not in images and key not in others:
                    order.append(key)
                extension = "." + suffix.rsplit(".", 1)[-1].lower() if dot else ""
                if extension in IMAGE_EXTENSIONS and key not in images:
                    images[key] = f"{tar}#{member.name}@{member.offset_data}+{member.size}"
                else:
                    others.setdefault(key, []).append(suffix or "(no extension)")
                    if keep and suffix in ("txt", "cls", "json"):
                        fields.setdefault(key, {}).update(_fields(
                            suffix, archive.extractfile(member).read(), keep))
    except (tarfile.TarError, EOFError, OSError) as exc:  # truncated, damaged, or gone
        truncated = str(exc) or type(exc).__name__
    for key in order:
        if key in images:
            yield key, images[key], fields.get(key, {})
        else:
            kinds = ", ".join(others.get(key, [])) or "none"
            yield key, f"{tar}#{key}!no image in this sample (members: {kinds})", \
                fields.get(key, {})
    if truncated is not None:
        name = os.path.basename(tar)
        notice(f"{tar} is truncated or damaged after {len(order)} sample(s) ({truncated}): "
               "those are labelled; the rest of it cannot be read")
        yield f"{name}#unreadable", (f"{tar}#!the tar is truncated or damaged after "
                                     f"{len(order)} sample(s): {truncated}"[:400]), {}


def _fields(suffix: str, data: bytes, keep: tuple[str, ...]) -> dict[str, str | None]:
    """The kept fields one small member holds (text is read as UTF-8, bad bytes replaced)."""
    text = data.decode("utf-8", "replace")
    if suffix != "json":
        return {suffix: text.strip()} if suffix in keep else {}
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(record, dict):
        return {}
    return {name: value if isinstance(value, str) or value is None else json.dumps(value)
            for name, value in record.items() if name in keep}


def _tars(location: str) -> list[str]:
    """The .tar files directly in a folder or under a prefix, sorted (no hidden ones)."""
    if is_remote(location):
        fs, root = filesystem(location)
        base = location.rstrip("/")
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        return sorted(f"{base}/{n}" for n in names
                      if n.lower().endswith(".tar") and not n.startswith("."))
    folder = os.path.abspath(local_path(location))
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.lower().endswith(".tar") and not n.startswith("."))
