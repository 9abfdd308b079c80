"""The run directory: its lock, its run.json and fingerprint, and starting afresh."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from pathlib import Path

from pipeline.errors import RunError, UsageError
from pipeline.plan import PARTS_DIR, PLAN_FILE
from pipeline.slices import Slice
from pipeline.writer import remove_temporaries, write_json

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"
OUTPUT_STEM = "labels"
_TEMPORARY_PART = re.compile(r"^\.part-(\d+)\.parquet\.tmp-")


class RunDirectory:
    """An output directory held by one run at a time; a killed run's lock goes with it."""

    def __init__(self, path: str | Path, part: Slice = Slice()):
        self.path = Path(path)
        self.part = part
        self._lock_fd: int | None = None

    def __enter__(self) -> RunDirectory:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"cannot create output directory {self.path}: {exc.strerror}") from None
        # Slices of one job run side by side, each with a lock of its own.
        lock_name = (LOCK_FILE if self.part.whole
                     else f"{LOCK_FILE}-{self.part.index}-of-{self.part.count}")
        fd = os.open(self.path / lock_name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # A POSIX record lock, not flock: forked loader workers do not inherit it, so a
            # killed run's orphaned workers cannot keep the next run out; the kernel drops
            # it when the process dies, so a lock is never left behind.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            which = "" if self.part.whole else f" ({self.part.describe()})"
            raise RunError(f"another label-images run{which} (pid {holder}) is using "
                           f"{self.path}; wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        # Only temporaries nobody else can be writing: this slice's own parts, and the
        # top-level files when no other slice can be running.
        if self.part.whole:
            remove_temporaries(self.path)
        remove_temporaries(self.path / PARTS_DIR, owned=self._owns_temporary)
        return self

    def _owns_temporary(self, name: str) -> bool:
        match = _TEMPORARY_PART.match(name)
        return bool(match) and self.part.owns(int(match.group(1)))

    def __exit__(self, *exc_info) -> None:
        if self._lock_fd is not None:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def output_path(self, fmt: str) -> Path:
        return self.path / f"{OUTPUT_STEM}.{fmt}"

    def read_run(self) -> dict | None:
        try:
            return json.loads((self.path / RUN_FILE).read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(f"{self.path / RUN_FILE} is damaged; rerun with --overwrite "
                             "to start afresh") from None

    def clear(self) -> None:
        """Forget a previous run: only the files this tool writes are removed."""
        for name in (RUN_FILE, SUMMARY_FILE, PLAN_FILE, f"{OUTPUT_STEM}.parquet",
                     f"{OUTPUT_STEM}.csv"):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / PARTS_DIR, ignore_errors=True)

    def prepare(self, fingerprint: dict, record: dict, overwrite: bool) -> bool:
        """Check a previous run here is the same job, then record this one; True if resuming."""
        if overwrite:
            self.clear()
        previous = self.read_run()
        if previous is not None:
            differences = describe_differences(previous.get("fingerprint", {}), fingerprint)
            if differences:
                raise UsageError(
                    f"{self.path} holds a run with a different {'; '.join(differences)}; "
                    "rerun with --overwrite to start afresh, or choose another --out")
        write_json(self.path / RUN_FILE, {"fingerprint": fingerprint, **record})
        return previous is not None


def describe_differences(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Human-readable 'what changed' between two fingerprints, e.g. 'top_k (5 -> 3)'."""
    differences = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        name = f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            differences += describe_differences(old, new, prefix=f"{name}.")
        elif isinstance(old, str) and len(old) > 40 or isinstance(new, str) and len(new) > 40:
            differences.append(f"{name} (changed)")
        else:
            differences.append(f"{name} ({old} -> {new})")
    return differences
