"""The loader's memory budget: workers, batch and prefetch within shared and pinned memory.

Torch-free: settings, tuning, recovery and bench size the loader with it before one exists.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pipeline.errors import UsageError, notice

PREFETCH_BATCHES = 4  # per worker: batches asked for ahead of the one the model is on
# Workers hand their batches over in shared memory (/dev/shm on Linux), which containers
# keep small: 64 MB under Docker and Kubernetes unless raised. The batches in flight may
# take at most this share of what is free when the run starts.
SHARED_MEMORY = "/dev/shm"
SHARED_MEMORY_SHARE = 0.5
MIN_BATCH_SIZE = 32  # how far a default batch size is lowered to keep decoding workers
# On CUDA each batch in flight is also copied into page-locked (pinned) host memory, which
# the rest of the machine cannot use: at most this share of what is available.
PINNED_MEMORY_SHARE = 0.25


@dataclass(frozen=True)
class LoaderSize:
    workers: int
    batch_size: int
    prefetch: int  # batches each worker is asked for ahead

    def shared_bytes(self, image_bytes: int) -> int:
        """Shared memory the batches in flight can take: the prefetched ones and one in use."""
        if self.workers == 0:
            return 0  # decoded in the main process: nothing is handed over
        return (self.workers * self.prefetch + 1) * self.batch_size * image_bytes

    def pinned_bytes(self, image_bytes: int) -> int:
        """Page-locked memory the batches in flight hold on CUDA: the prefetched ones (pinned
        as they arrive) and two at the model (one computing, the next being copied), each
        in a power-of-two block, as CUDA's host allocator rounds them and keeps them."""
        block = 1 << max(0, self.batch_size * image_bytes - 1).bit_length()
        return (max(1, self.workers) * self.prefetch + 2) * block


def free_shared_memory() -> int | None:
    """Bytes free in shared memory now; None where there is no /dev/shm to measure."""
    try:
        stats = os.statvfs(SHARED_MEMORY)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def fit_shared_memory(wanted: LoaderSize, image_bytes: int, free: int | None, *,
                      fixed_workers: bool, fixed_batch: bool) -> LoaderSize | None:
    """The largest loader like `wanted` whose batches in flight fit in the shared memory.

    Fewer batches prefetched first, then (unless fixed) smaller batches, down to
    MIN_BATCH_SIZE, then (unless fixed) fewer workers; None if that is not enough.
    """
    if free is None:
        return wanted
    budget = int(free * SHARED_MEMORY_SHARE)
    size = wanted
    while size.prefetch > 1 and size.shared_bytes(image_bytes) > budget:
        size = LoaderSize(size.workers, size.batch_size, size.prefetch - 1)
    while (not fixed_batch and size.batch_size > MIN_BATCH_SIZE
           and size.shared_bytes(image_bytes) > budget):
        size = LoaderSize(size.workers, max(MIN_BATCH_SIZE, size.batch_size // 2), size.prefetch)
    while not fixed_workers and size.workers > 0 and size.shared_bytes(image_bytes) > budget:
        size = LoaderSize(size.workers - 1, size.batch_size, size.prefetch)
    if size.workers == 0:
        return LoaderSize(0, wanted.batch_size, wanted.prefetch)  # nothing shared: as wanted
    return size if size.shared_bytes(image_bytes) <= budget else None


def size_for_shared_memory(wanted: LoaderSize, image_bytes: int, *, fixed_workers: bool,
                           fixed_batch: bool, sharing: int = 1) -> LoaderSize:
    """The loader as wanted, or smaller where shared memory is short; says what and why.

    `sharing`: processes that share the shared memory (torchrun's on one node).
    """
    free = free_shared_memory()
    size = fit_shared_memory(wanted, image_bytes, None if free is None else free // sharing,
                             fixed_workers=fixed_workers, fixed_batch=fixed_batch)
    if size == wanted:
        return size
    held = wanted.shared_bytes(image_bytes) * sharing
    each = f" in each of {sharing} processes" if sharing > 1 else ""
    shortage = (f"{SHARED_MEMORY} has {free / 2**20:.0f} MB free, and {wanted.workers} loader "
                f"workers with batches of {wanted.batch_size}{each} can hold "
                f"{held / 2**20:.0f} MB there")
    if size is None:
        raise UsageError(f"{shortage}: {more_shared_memory(held)}, or lower --workers or "
                         "--batch-size")
    using = ("decoding in the main process" if size.workers == 0 else
             f"using {size.workers} worker(s), batches of {size.batch_size}, {size.prefetch} "
             "prefetched by each")
    notice(f"{shortage}: {using}; for full speed {more_shared_memory(held)}")
    return size


def available_memory(proc: str = "/proc", cgroups: str = "/sys/fs/cgroup") -> int | None:
    """Bytes of memory available to new allocations now (Linux); None where unknown.

    The host's MemAvailable, or less where the process's memory cgroup (a container's,
    a Kubernetes pod's, a Slurm job's) is limited: the kernel kills the job at its limit,
    however much the host has free.
    """
    try:
        with open(os.path.join(proc, "meminfo")) as fh:
            kib = next(line.split()[1] for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    host = int(kib) * 1024
    room = cgroup_room(proc, cgroups)
    return host if room is None else min(host, room)


# Each cgroup version's limit and usage files; v1's "no limit" is a page-rounded 2^63 - 1
_CGROUP_FILES = {"v2": ("memory.max", "memory.current"),
                 "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes")}


def cgroup_room(proc: str = "/proc", cgroups: str = "/sys/fs/cgroup") -> int | None:
    """What the process's memory cgroup still allows (its limit less its usage), or None
    where it sets no limit. Its folder is the one /proc/self/cgroup names, else the mount's
    root (a container sees its own cgroup there)."""
    try:
        with open(os.path.join(proc, "self", "cgroup")) as fh:
            lines = [line.rstrip("\n").split(":", 2) for line in fh]
    except OSError:
        return None
    for parts in lines:
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            version, mount = "v2", cgroups
        elif "memory" in controllers.split(","):
            version, mount = "v1", os.path.join(cgroups, "memory")
        else:
            continue
        limit_file, usage_file = _CGROUP_FILES[version]
        for folder in (os.path.join(mount, path.lstrip("/")), mount):
            limit, usage = _read_number(folder, limit_file), _read_number(folder, usage_file)
            if limit is not None and usage is not None:
                return max(0, limit - usage) if limit < 2**62 else None
    return None


def _read_number(folder: str, name: str) -> int | None:
    try:
        with open(os.path.join(folder, name)) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if text == "max":  # v2: no limit
        return 2**63
    return int(text) if text.isdigit() else None


def fit_pinned_memory(wanted: LoaderSize, image_bytes: int, available: int | None,
                      sharing: int = 1) -> LoaderSize:
    """The loader as wanted, with fewer batches prefetched while their page-locked copies
    would take more than PINNED_MEMORY_SHARE of the memory available (among `sharing`
    processes): pinned memory is never swapped out or given back, and a node of 8 GPUs
    fed 12 MP-sized batches could otherwise lock ~17 GiB."""
    if available is None:
        return wanted
    budget = int(available * PINNED_MEMORY_SHARE) // sharing
    size = wanted
    while size.prefetch > 1 and size.pinned_bytes(image_bytes) > budget:
        size = LoaderSize(size.workers, size.batch_size, size.prefetch - 1)
    if size.pinned_bytes(image_bytes) > budget:
        notice(f"the batches in flight would lock {size.pinned_bytes(image_bytes) / 2**20:.0f}"
               f" MB of page-locked memory per process, more than "
               f"{PINNED_MEMORY_SHARE:.0%} of the {available / 2**20:.0f} MB available"
               + (f" shared by {sharing} processes" if sharing > 1 else "")
               + ": lower --workers or --batch-size if the machine starts swapping")
    return size


def more_shared_memory(held: int) -> str:
    """What to tell a user whose loader would hold `held` bytes in shared memory."""
    gigabytes = max(1, math.ceil(held / SHARED_MEMORY_SHARE / 2**30))
    return (f"give the container {gigabytes} GB of shared memory (docker run "
            f"--shm-size={gigabytes}g; Kubernetes: an emptyDir volume with medium: Memory "
            "mounted at /dev/shm)")
