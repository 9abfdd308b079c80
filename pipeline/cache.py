"""What the tool keeps between runs in the user's cache directory: torch-free.

Measurements of a machine (batch sizes, what a compile cost and gave) and the weights
catalogue live here as small JSON files of keyed entries. Every read and write is best
effort: a cache that cannot be read or written costs a measurement next time, no more.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.errors import notice


def directory() -> Path:
    """$LABEL_IMAGES_CACHE, else label-images under $XDG_CACHE_HOME (default ~/.cache)."""
    base = os.environ.get("LABEL_IMAGES_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "label-images")
    return Path(base)


def read(name: str) -> dict:
    """The entries of one cache file; none when it is missing or unreadable."""
    try:
        entries = json.loads((directory() / name).read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def keep(name: str, key: str, value, what: str = "a measurement",
         then: str = "the next run measures again") -> None:
    """Add one entry, replacing the file whole (a reader never sees half of it)."""
    entries = read(name)
    entries[key] = value
    path = directory() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        notice(f"cannot keep {what} in {path} ({exc.strerror}); {then}")
