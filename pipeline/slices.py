"""Which shards this process labels: all, an array job's slice, or a torchrun rank's share."""

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

    @property
    def whole(self) -> bool:
        return self.count == 1

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index

    def describe(self) -> str:
        kind = "rank" if self.distributed else "slice"
        return f"{kind} {self.index} of {self.count}"


def _int(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UsageError(f"environment variable {name}={env[name]!r} is not a number") from None


def from_environment(num_shards: int | None, shard_index: int | None,
                     env: dict | None = None) -> Slice:
    """torchrun's RANK/WORLD_SIZE, else --num-shards/--shard-index, else Slurm or Kubernetes."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and _int(env, "WORLD_SIZE") > 1:
        if num_shards is not None or shard_index is not None:
            raise UsageError("--num-shards/--shard-index cannot be combined with torchrun; "
                             "torchrun's ranks already split the work")
        return Slice(index=_int(env, "RANK"), count=_int(env, "WORLD_SIZE"), distributed=True,
                     local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0)
    if shard_index is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            # Arrays may start at any number (--array=1-8): count from the first task.
            first = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
            shard_index = _int(env, "SLURM_ARRAY_TASK_ID") - first
            if num_shards is None and "SLURM_ARRAY_TASK_COUNT" in env:
                num_shards = _int(env, "SLURM_ARRAY_TASK_COUNT")
        elif "JOB_COMPLETION_INDEX" in env:  # a Kubernetes Indexed Job
            shard_index = _int(env, "JOB_COMPLETION_INDEX")
    if num_shards is None and shard_index is None:
        return Slice()
    if num_shards is None:
        raise UsageError(f"slice index {shard_index} given (flag or environment) but not how "
                         "many slices there are: pass --num-shards")
    if shard_index is None:
        raise UsageError("--num-shards given without --shard-index (or SLURM_ARRAY_TASK_ID, "
                         "JOB_COMPLETION_INDEX)")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise UsageError(f"--shard-index must be in 0..{num_shards - 1}, got {shard_index}")
    return Slice(index=shard_index, count=num_shards)


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
