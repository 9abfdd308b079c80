"""Launchers: which shards this process labels, and whether it assembles the table."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from pipeline.errors import UsageError


@dataclass(frozen=True)
class Slice:
    """Shard s belongs to slice s % count: deterministic, balanced, no coordination needed."""

    index: int = 0
    count: int = 1
    distributed: bool = False  # a torch.distributed process group (torchrun) joins the slices
    local_rank: int = 0
    # this job's processes on this machine (torchrun's ranks, Ray's actors): each sizes its
    # cores, decode workers, shared and pinned memory as that share of the machine
    per_node: int = 1

    @property
    def whole(self) -> bool:
        return self.count == 1

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index

    @property
    def merges(self) -> bool:
        """Whether this process assembles the table: one process, or torchrun's rank 0
        (after every rank's shards are in); an array job's slices leave it to `merge`."""
        return self.whole or (self.distributed and self.index == 0)

    def describe(self) -> str:
        kind = "rank" if self.distributed else "slice"
        return f"{kind} {self.index} of {self.count}"


def _int(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UsageError(f"environment variable {name}={env[name]!r} is not a number") from None


def _torchrun(env: dict, count: int | None, index: int | None) -> Slice | None:
    """torchrun's RANK and WORLD_SIZE: every rank labels its share, rank 0 merges."""
    if "WORLD_SIZE" not in env or _int(env, "WORLD_SIZE") <= 1:
        return None
    if count is not None or index is not None:
        raise UsageError("--num-slices/--slice-index cannot be combined with torchrun; "
                         "torchrun's ranks already split the work")
    return Slice(index=_int(env, "RANK"), count=_int(env, "WORLD_SIZE"), distributed=True,
                 local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                 per_node=max(1, _int(env, "LOCAL_WORLD_SIZE")) if "LOCAL_WORLD_SIZE" in env
                 else 1)


def _slurm_array(env: dict, count: int | None, index: int | None) -> Slice | None:
    if index is not None or "SLURM_ARRAY_TASK_ID" not in env:
        return None
    # Arrays may start at any number (--array=1-8): count from the first task.
    first = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
    if count is None and "SLURM_ARRAY_TASK_COUNT" in env:
        count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    return _array_slice(count, _int(env, "SLURM_ARRAY_TASK_ID") - first)


def _kubernetes_indexed_job(env: dict, count: int | None, index: int | None) -> Slice | None:
    if index is not None or "JOB_COMPLETION_INDEX" not in env:
        return None
    return _array_slice(count, _int(env, "JOB_COMPLETION_INDEX"))


def _flags(env: dict, count: int | None, index: int | None) -> Slice | None:
    """--num-slices/--slice-index by hand; neither: one process labels everything."""
    if count is None and index is None:
        return Slice()
    return _array_slice(count, index)


def _array_slice(count: int | None, index: int | None) -> Slice:
    if count is None:
        raise UsageError(f"slice index {index} given (flag or environment) but not how "
                         "many slices there are: pass --num-slices")
    if index is None:
        raise UsageError("--num-slices given without --slice-index (or SLURM_ARRAY_TASK_ID, "
                         "JOB_COMPLETION_INDEX)")
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--slice-index must be in 0..{count - 1}, got {index}")
    return Slice(index=index, count=count)


# The launchers, asked in turn; the first that recognises its environment decides.
LAUNCHERS = [_torchrun, _slurm_array, _kubernetes_indexed_job, _flags]


def from_environment(num_slices: int | None, slice_index: int | None,
                     env: dict | None = None) -> Slice:
    """Which share of the shards this process labels, and whether it merges."""
    env = os.environ if env is None else env
    return next(found for launcher in LAUNCHERS
                if (found := launcher(env, num_slices, slice_index)) is not None)


class ProcessGroup:
    """torch.distributed for torchrun: barriers and one rank's verdict shared with all."""

    def __init__(self, part: Slice, backend: str):
        import torch.distributed as dist

        self.dist = dist
        self.part = part
        # Long barriers: ranks wait for each other's whole share of the work.
        dist.init_process_group(backend=backend, timeout=timedelta(hours=24))

    def barrier(self) -> None:
        self.dist.barrier()

    def share(self, value):
        """Rank 0's value, on every rank."""
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        self.dist.destroy_process_group()


def shard_ranges(shards: list[int]) -> str:
    """'0-3, 7, 9-10': a readable list of shard numbers."""
    ranges, start, previous = [], None, None
    for shard in sorted(shards):
        if start is None:
            start = previous = shard
        elif shard == previous + 1:
            previous = shard
        else:
            ranges.append(f"{start}-{previous}" if previous > start else f"{start}")
            start = previous = shard
    if start is not None:
        ranges.append(f"{start}-{previous}" if previous > start else f"{start}")
    return ", ".join(ranges)
