"""Freeze the item list into numbered shards (one Parquet row group each); find the done ones."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import RunError
from pipeline.storage import Store

PLAN_FILE = "plan.parquet"
PARTS_DIR = "parts"
_SHARD_SIZE_KEY = "label_images.shard_size"
_PART_NAME = re.compile(r"^part-(\d{6})\.parquet$")


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

    def read_shard(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        with self.store.open(PLAN_FILE) as fh:
            return pq.ParquetFile(fh).read_row_group(shard, columns=columns)


def freeze(table: pa.Table, store: Store, shard_size: int) -> Plan:
    """Write the items once, atomically; from then on the plan, not the source, is the truth."""
    table = table.replace_schema_metadata({_SHARD_SIZE_KEY: str(shard_size)})
    with store.writing(PLAN_FILE) as sink:
        pq.write_table(table, sink, row_group_size=shard_size)
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


def part_name(shard: int) -> str:
    return f"{PARTS_DIR}/part-{shard:06d}.parquet"


def shard_of_part(name: str) -> int | None:
    """The shard a part file name (without its directory) belongs to; None for other names."""
    match = _PART_NAME.match(name)
    return int(match.group(1)) if match else None


def committed_shards(store: Store) -> set[int]:
    """Shards whose part file was committed; temporaries and aborted uploads do not count."""
    return {shard for shard in map(shard_of_part, store.list(PARTS_DIR)) if shard is not None}
