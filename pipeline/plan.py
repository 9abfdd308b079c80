"""Freeze the items, as they are listed, into numbered shards; find the done ones.

A plan is a folder of Parquet files, each holding SHARDS_PER_FILE shards as its row groups,
and plan.json, written last, which makes it whole (its commit). Memory while planning is a
shard and a batch of the listing; reading a shard opens one small file, whatever the size
of the plan. Keys are checked for duplicates out of core (keys.py). Run directories of
earlier versions hold one plan.parquet, still read.
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import keys as key_checks
from pipeline.errors import RunError, UsageError
from pipeline.rundir import LEGACY_PLAN_FILE, PLAN_DIR, PLAN_RECORD, plan_file
from pipeline.storage import Store

# 1,024 shards a file: its footer (a few hundred KB at most) is what reading one shard
# parses. One file of 100,000 row groups has a 33 MB footer and takes 0.4 s to open.
SHARDS_PER_FILE = 1024
_SHARD_SIZE_KEY = "label_images.shard_size"
# The shard is the unit of commit, so of what a kill loses. 1,000 images keeps a plan of
# 10^8 at 10^5 files; a job whose listing ends within SMALL_JOB images (a few minutes on a
# CPU) gets shards of a SMALL_JOB_SHARDS-th of it instead, so that a kill loses at most
# that share of its work (600 images: shards of 38), never all of it.
DEFAULT_SHARD_SIZE = 1000
SMALL_JOB = 16_000
SMALL_JOB_SHARDS = 16
MIN_SHARD_SIZE = 16


def shard_size_for(items: int) -> int:
    """The default shard size of a job of `items` images."""
    return max(MIN_SHARD_SIZE, min(DEFAULT_SHARD_SIZE, math.ceil(items / SMALL_JOB_SHARDS)))


@dataclass(frozen=True)
class Plan:
    """The frozen items of a run: shard i is row group i % SHARDS_PER_FILE of file
    i // SHARDS_PER_FILE in `folder` (or row group i of a legacy plan.parquet)."""

    store: Store
    num_items: int
    shard_size: int
    folder: str | None = None  # None: an earlier version's single plan.parquet

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_items / self.shard_size)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """First item index of the shard and one past its last."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_items)

    def items_in(self, shards: list[int]) -> int:
        return sum(end - start for start, end in map(self.shard_bounds, shards))

    def _where(self, shard: int) -> tuple[str, int]:
        if self.folder is None:
            return LEGACY_PLAN_FILE, shard
        return plan_file(self.folder, shard // SHARDS_PER_FILE), shard % SHARDS_PER_FILE

    def schema(self) -> pa.Schema:
        """The items' columns: key, path, and the kept ones (and versions, if any)."""
        with self.store.open(self._where(0)[0]) as fh:
            return pq.read_schema(fh)

    def read_shard(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        name, group = self._where(shard)
        with self.store.open(name) as fh:
            return pq.ParquetFile(fh).read_row_group(group, columns=columns)

    def batches(self, columns: list[str] | None = None) -> Iterable[pa.Table]:
        """Every shard in order, one at a time."""
        for shard in range(self.num_shards):
            yield self.read_shard(shard, columns)


class _Aborted(Exception):
    """Given to an open file's context, so that it discards instead of committing."""


class PlanWriter:
    """Items written as they are listed: full shards go out as row groups, a file every
    SHARDS_PER_FILE of them; `commit` checks the keys and writes plan.json last.

    Each writer writes a folder of its own, so two processes planning at once (slices of an
    array starting together) never mix their files: the first plan.json stands."""

    def __init__(self, store: Store, shard_size: int, check_keys: bool = True,
                 what: str = "the source", noun: str = "key"):
        self.store, self.shard_size, self.what, self.noun = store, shard_size, what, noun
        self.folder = f"{PLAN_DIR}/{uuid.uuid4().hex[:12]}"
        self.num_items = 0
        self._pending: list[pa.Table] = []  # fewer than a shard's rows, waiting for more
        self._pending_rows = 0
        self._schema: pa.Schema | None = None
        self._files = ExitStack()
        self._writer: pq.ParquetWriter | None = None
        self._shards_written = 0
        self._keys = key_checks.KeySpool(store) if check_keys else None

    def write(self, items: pa.Table) -> None:
        if not items.num_rows:
            return
        if self._schema is None:
            self._schema = items.schema.with_metadata({_SHARD_SIZE_KEY: str(self.shard_size)})
        elif items.schema.remove_metadata() != self._schema.remove_metadata():
            try:  # a later batch whose inferred types differ (JSON lines, say)
                items = items.cast(self._schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
                raise UsageError(f"{self.what}: its columns change part way (items "
                                 f"{self.num_items + 1}...: {exc})") from None
        if self._keys is not None:
            self._keys.add(items["key"])
        self.num_items += items.num_rows
        self._pending.append(items)
        self._pending_rows += items.num_rows
        if self._pending_rows >= self.shard_size:
            whole = pa.concat_tables(self._pending)
            cut = self._pending_rows - self._pending_rows % self.shard_size
            for start in range(0, cut, self.shard_size):
                self._write_shard(whole.slice(start, self.shard_size))
            rest = whole.slice(cut)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def _write_shard(self, shard: pa.Table) -> None:
        if self._writer is None or self._shards_written % SHARDS_PER_FILE == 0:
            self._close_file()
            name = plan_file(self.folder, self._shards_written // SHARDS_PER_FILE)
            sink = self._files.enter_context(self.store.writing(name))
            self._writer = pq.ParquetWriter(sink, self._schema)
        self._writer.write_table(shard.replace_schema_metadata(self._schema.metadata),
                                 row_group_size=self.shard_size)
        self._shards_written += 1

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._files.close()  # the file is committed under its name

    def commit(self, allow_duplicates: bool = False) -> Plan:
        """The plan, whole: refused (nothing kept) if there are no items, or a key twice."""
        try:
            if self._pending_rows:
                self._write_shard(pa.concat_tables(self._pending))
            self._close_file()
            if self.num_items == 0:
                raise UsageError(f"no images in {self.what}")
            if self._keys is not None and not allow_duplicates:
                self._keys.refuse_duplicates(self.what, self.noun)
        except BaseException:
            self.abort()
            raise
        finally:
            if self._keys is not None:
                self._keys.close()
        record = {"items": self.num_items, "shard_size": self.shard_size,
                  "folder": self.folder, "files": math.ceil(
                      self._shards_written / SHARDS_PER_FILE)}
        try:
            with self.store.writing(PLAN_RECORD, replace=False) as sink:
                sink.write((json.dumps(record, indent=2) + "\n").encode())
        except FileExistsError:  # another process froze a plan here first: that one stands
            self.store.remove(self.folder)
        return load(self.store)

    def abort(self) -> None:
        """A listing that failed part way: nothing of it is kept (the open file's upload or
        temporary is discarded, not committed)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._files.__exit__(_Aborted, _Aborted(), None)
        self.store.remove(self.folder)


def freeze(batches: Iterable[pa.Table] | pa.Table, store: Store, shard_size: int | None,
           allow_duplicates: bool = False, what: str = "the source", noun: str = "key") -> Plan:
    """Write the items once, as they come; from then on the plan, not the source, is the
    truth. If another process froze a plan here first, that plan stands and is returned.
    `shard_size` None: sized for the job (shard_size_for)."""
    if isinstance(batches, pa.Table):
        batches = [batches]
    if shard_size is None:
        batches, shard_size = _sized_for_the_job(batches)
    writer = PlanWriter(store, shard_size, check_keys=not allow_duplicates, what=what,
                        noun=noun)
    try:
        for batch in batches:
            writer.write(batch)
    except BaseException:
        writer.abort()
        raise
    return writer.commit(allow_duplicates)


def _sized_for_the_job(batches: Iterable[pa.Table]) -> tuple[Iterable[pa.Table], int]:
    """The listing's first SMALL_JOB items held (a bounded look ahead): one that ends
    within them is a small job, sized by its count; a longer one gets the default."""
    listing, held, rows = iter(batches), [], 0
    for batch in listing:
        held.append(batch)
        rows += batch.num_rows
        if rows > SMALL_JOB:
            return itertools.chain(held, listing), DEFAULT_SHARD_SIZE
    return held, shard_size_for(rows)


def exists(store: Store) -> bool:
    return store.exists(PLAN_RECORD) or store.exists(LEGACY_PLAN_FILE)


def load(store: Store) -> Plan:
    """The frozen plan; its shard size is the one it was made with, whatever is asked now."""
    text = store.read_text(PLAN_RECORD)
    if text is None:
        return _load_legacy(store)
    try:
        record = json.loads(text)
        return Plan(store=store, num_items=int(record["items"]),
                    shard_size=int(record["shard_size"]), folder=str(record["folder"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{store.url(PLAN_RECORD)} is damaged ({exc}); rerun with --overwrite "
                       "to start afresh") from None


def _load_legacy(store: Store) -> Plan:
    try:
        with store.open(LEGACY_PLAN_FILE) as fh:
            meta = pq.ParquetFile(fh).metadata
        shard_size = int(meta.metadata[_SHARD_SIZE_KEY.encode()])
    except (pa.ArrowInvalid, KeyError, TypeError) as exc:
        raise RunError(f"{store.url(LEGACY_PLAN_FILE)} is damaged ({exc}); rerun with "
                       "--overwrite to start afresh") from None
    plan = Plan(store=store, num_items=meta.num_rows, shard_size=shard_size)
    # Shard = row group is what makes a shard cheap to read; check it rather than trust it.
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    expected = [plan.shard_bounds(i)[1] - plan.shard_bounds(i)[0] for i in range(plan.num_shards)]
    if sizes != expected:
        raise RunError(f"{store.url(LEGACY_PLAN_FILE)}: row groups {sizes[:5]}... do not "
                       f"match shard size {shard_size}; rerun with --overwrite to start afresh")
    return plan
