"""Run `label-images` and SIGKILL it at an exact moment: `python killpoints.py POINT N ARGS...`.

POINT is where the process dies, at the N-th time it gets there (1-based):
  part-mid-write      a part's temporary file is half written
  part-before-rename  a part is fully written but not yet renamed into place
  part-after-rename   a part was renamed into place, before anything else happens
  part-committed      a part was committed (local: renamed; object storage: uploaded)
  merge-mid-write     the final file is being assembled
  merge-after-rename  the final file is in place, before the parts are removed
  night-staged        a night's rewritten part is staged, before the night's commit
  night-moved         a staged part was moved into the nightly table, mid-commit
or, with a file's path for N, `decoding FILE`: every process that decodes FILE dies of
SIGSEGV, as in a decoder crash, with the default of no loader workers of a small CPU.
Under torchrun, set KILL_RANK to kill only that rank.
Used by the crash, scale-out and storage tests; the production code has no hooks for this.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

import pyarrow.parquet as pq

from pipeline import cli, loader, settings, storage, writer

POINT = sys.argv[1]
COUNT = int(sys.argv[2]) if POINT != "decoding" else 0
# Under torchrun, KILL_RANK picks the one rank that dies; the others run normally.
if os.environ.get("KILL_RANK", os.environ.get("RANK")) != os.environ.get("RANK"):
    POINT = "none"
seen = {"n": 0}


def die_on_count() -> bool:
    seen["n"] += 1
    return seen["n"] == COUNT


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def is_part(path) -> bool:
    return "part-" in os.path.basename(str(path))  # also its hidden temporary name


real_replace = os.replace


def replace(src, dst, *args, **kwargs):
    part = is_part(dst)
    wanted = {"part-before-rename": part, "part-after-rename": part,
              "merge-after-rename": os.path.basename(str(dst)).startswith("labels.")}
    if wanted.get(POINT) and die_on_count():
        if POINT == "part-before-rename":
            die()
        real_replace(src, dst, *args, **kwargs)
        die()
    return real_replace(src, dst, *args, **kwargs)


real_write_table = pq.write_table


def write_table(table, where, *args, **kwargs):
    if POINT == "part-mid-write" and is_part(where) and die_on_count():
        half = table.slice(0, max(1, table.num_rows // 2))
        real_write_table(half, where, *args, **kwargs)
        die()
    return real_write_table(table, where, *args, **kwargs)


class ParquetWriter(pq.ParquetWriter):
    def __init__(self, where, *args, **kwargs):
        super().__init__(where, *args, **kwargs)
        self.merging = "labels." in os.path.basename(str(where))

    def write_table(self, table, *args, **kwargs):
        super().write_table(table, *args, **kwargs)
        if POINT == "merge-mid-write" and self.merging and die_on_count():
            die()


real_writing = storage.Store.writing


@contextmanager
def writing(store, name, **options):
    with real_writing(store, name, **options) as sink:
        yield sink
    if POINT == "part-committed" and is_part(name) and die_on_count():  # committed: die
        die()
    if POINT == "night-staged" and name.startswith(".night/") and die_on_count():
        die()


real_move = storage.Store.move


def move(store, name, to):
    real_move(store, name, to)
    if POINT == "night-moved" and die_on_count():
        die()


real_decode = loader.decode


def decode(data, *args, **kwargs):
    if data == POISON:
        os.kill(os.getpid(), signal.SIGSEGV)
    return real_decode(data, *args, **kwargs)


if POINT == "decoding":
    with open(sys.argv[2], "rb") as fh:
        POISON = fh.read()
    loader.decode = decode
    settings.default_workers = lambda *measured: 0
storage.Store.writing = writing
storage.Store.move = move
os.replace = replace
writer.pq.write_table = write_table
writer.pq.ParquetWriter = ParquetWriter
sys.argv = ["label-images", *sys.argv[3:]]
cli.main()
