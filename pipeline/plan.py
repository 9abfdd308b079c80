"""Freeze the item list into numbered shards (one Parquet row group each); find the done ones."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import RunError
from pipeline.rundir import PLAN_FILE
from pipeline.storage import Store

_SHARD_SIZE_KEY = "label_images.shard_size"


@dataclass(frozen=True)
class Plan:
    """The frozen items of a run: shard i is row group i of plan.parquet."""

    store: Store
    num_items: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_items / self.shard_size)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """First item index of the shard and one past its last."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_items)

    def items_in(self, shards: list[int]) -> int:
        return sum(end - start for start, end in map(self.shard_bounds, shards))

    def schema(self) -> pa.Schema:
        """The items' columns: key, path, and the kept ones (and versions, if any)."""
        with self.store.open(PLAN_FILE) as fh:
            return pq.read_schema(fh)

    def read_shard(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        with self.store.open(PLAN_FILE) as fh:
            return pq.ParquetFile(fh).read_row_group(shard, columns=columns)


def freeze(table: pa.Table, store: Store, shard_size: int) -> Plan:
    """Write the items once; from then on the plan, not the source, is the truth.

    If another process froze a plan here first (two slices of an array starting at the same
    moment), that plan stands and is the one returned.
    """
    table = table.replace_schema_metadata({_SHARD_SIZE_KEY: str(shard_size)})
    try:
        with store.writing(PLAN_FILE, replace=False) as sink:
            pq.write_table(table, sink, row_group_size=shard_size)
    except FileExistsError:
        pass
    return load(store)


def load(store: Store) -> Plan:
    """The frozen plan; its shard size is the one it was made with, whatever is asked now."""
    try:
        with store.open(PLAN_FILE) as fh:
            meta = pq.ParquetFile(fh).metadata
        shard_size = int(meta.metadata[_SHARD_SIZE_KEY.encode()])
    except (pa.ArrowInvalid, KeyError, TypeError) as exc:
        raise RunError(f"{store.url(PLAN_FILE)} is damaged ({exc}); rerun with --overwrite "
                       "to start afresh") from None
    plan = Plan(store=store, num_items=meta.num_rows, shard_size=shard_size)
    # Shard = row group is what makes a shard cheap to read; check it rather than trust it.
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    expected = [plan.shard_bounds(i)[1] - plan.shard_bounds(i)[0] for i in range(plan.num_shards)]
    if sizes != expected:
        raise RunError(f"{store.url(PLAN_FILE)}: row groups {sizes[:5]}... do not match "
                       f"shard size {shard_size}; rerun with --overwrite to start afresh")
    return plan


def items_digest(table: pa.Table) -> str:
    """A hash of the keys and paths in order: a changed source gives a different digest."""
    digest = hashlib.sha256()
    for batch in table.select(["key", "path"]).to_batches(max_chunksize=65536):
        for column in batch.columns:
            digest.update(b"\x1e".join(v.encode() for v in column.to_pylist()))
            digest.update(b"\x1d")
    return digest.hexdigest()


def changes_since(plan: Plan, items: pa.Table) -> tuple[int, int]:
    """How many of a listing's keys the frozen plan lacks (new) and holds no longer (removed)."""
    planned = pa.concat_tables([plan.read_shard(s, ["key"]) for s in range(plan.num_shards)])
    planned_keys, listed_keys = planned["key"].combine_chunks(), items["key"].combine_chunks()
    new = len(listed_keys) - pc.sum(pc.is_in(listed_keys, planned_keys)).as_py()
    removed = len(planned_keys) - pc.sum(pc.is_in(planned_keys, listed_keys)).as_py()
    return new, removed
