"""Dataset and DataLoader over the pending shards of a plan; keys travel beside the tensors."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from pipeline.decode import DECODE_ERRORS, ImageError, Preprocess, decode
from pipeline.errors import UsageError, notice
from pipeline.plan import Plan
from pipeline.sources import Source

PREFETCH_BATCHES = 4  # per worker: batches asked for ahead of the one the model is on
# A file larger than this per --max-pixels pixel is not read: even uncompressed 16-bit RGBA
# takes 8 bytes a pixel, so it cannot be an image the run would accept.
MAX_BYTES_PER_PIXEL = 8
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


def available_memory() -> int | None:
    """Bytes of memory available to new allocations now (Linux); None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            kib = next(line.split()[1] for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return int(kib) * 1024


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


@dataclass
class Batch:
    """A batch in plan order. `images` holds only the decoded items, at `decoded` positions."""

    indices: list[int]
    keys: list[str]
    images: torch.Tensor  # uint8 (len(decoded), 3, crop, crop)
    decoded: list[int]  # positions in this batch whose image decoded
    widths: list[int]
    heights: list[int]
    errors: list[str | None]

    def pin_memory(self) -> Batch:
        # Called by the DataLoader's pin thread (CUDA only): page-locked for async copies.
        self.images = self.images.pin_memory()
        return self


class PlanItems(Dataset):
    """Item i of the plan, decoded. Each worker keeps only the shard it is reading in memory."""

    def __init__(self, plan: Plan, source: Source, preprocess: Preprocess, max_pixels: int,
                 quarantined: dict[int, str] | None = None):
        self.plan = plan
        self.source = source  # reads the bytes: its kind knows how
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        # index -> error row: files that crash the decoder, never read again
        self.quarantined = {} if quarantined is None else quarantined
        self._shard: int | None = None
        self._keys: list[str] = []
        self._paths: list[str] = []

    def __len__(self) -> int:
        return self.plan.num_items

    def _item(self, index: int) -> tuple[str, str]:
        shard, offset = divmod(index, self.plan.shard_size)
        if shard != self._shard:
            rows = self.plan.read_shard(shard, columns=["key", "path"])
            self._keys = rows["key"].to_pylist()
            self._paths = rows["path"].to_pylist()
            self._shard = shard
        return self._keys[offset], self._paths[offset]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A whole batch, read by the source at once (on object storage, reads overlap)."""
        items = [self._item(i) for i in indices]
        # A file larger than this cannot be an image the run would accept: not read at all.
        fetched = iter(self.source.fetch(
            [path for i, (_, path) in zip(indices, items) if i not in self.quarantined],
            MAX_BYTES_PER_PIXEL * self.max_pixels))
        # a file that crashed the decoder is never read again, let alone decoded
        return [self._sample(i, key, ImageError(self.quarantined[i]) if i in self.quarantined
                             else next(fetched)) for i, (key, _) in zip(indices, items)]

    def _sample(self, index: int, key: str, data: bytes | BaseException) -> dict:
        sample = {"index": index, "key": key, "image": None, "width": 0, "height": 0,
                  "error": None}
        try:
            if isinstance(data, BaseException):
                raise data
            decoded = decode(data, self.preprocess, self.max_pixels)
        except ImageError as exc:
            sample["error"] = str(exc)
        except DECODE_ERRORS as exc:
            sample["error"] = describe_error(exc)
        else:
            sample.update(image=decoded.image, width=decoded.width, height=decoded.height)
        return sample


def describe_error(exc: BaseException) -> str:
    """A short, path-free reason: the path is already in the row."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (unknown or corrupt format)"
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc).splitlines()[0] if str(exc) else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:200]


def collate(samples: list[dict]) -> Batch:
    decoded = [i for i, s in enumerate(samples) if s["image"] is not None]
    if decoded:
        images = stack_images([samples[i]["image"] for i in decoded])
    else:
        images = torch.empty((0, 3, 1, 1), dtype=torch.uint8)
    return Batch(
        indices=[s["index"] for s in samples], keys=[s["key"] for s in samples],
        images=images, decoded=decoded,
        widths=[s["width"] for s in samples], heights=[s["height"] for s in samples],
        errors=[s["error"] for s in samples],
    )


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """(3, H, W) crops as one (N, 3, H, W) batch laid out channels_last, as the model takes it.

    The resize leaves each crop's pixels in that order, so stacking them so is a copy of
    whole rows (stacking them planar is a transpose, several times the work), and the
    model's channels_last step has nothing left to do.
    """
    # torch's own collate: in a worker it stacks straight into shared memory, where a plain
    # stack would be copied there again on the way to the main process.
    return default_collate([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


class PendingItems(Sampler[int]):
    """Item indices of the given shards, in plan order, generated lazily."""

    def __init__(self, plan: Plan, shards: list[int]):
        self.plan = plan
        self.shards = sorted(shards)

    def __iter__(self) -> Iterator[int]:
        for shard in self.shards:
            yield from range(*self.plan.shard_bounds(shard))

    def __len__(self) -> int:
        return sum(end - start for start, end in map(self.plan.shard_bounds, self.shards))


def init_worker(_: int = 0) -> None:
    # Decoding is one image per worker at a time; torch's own thread pool there would only
    # fight the model's threads for the same cores.
    torch.set_num_threads(1)
    sys.excepthook = _quiet_hang_ups(sys.excepthook)


def _quiet_hang_ups(hook):
    """The hook, minus tracebacks of a parent hanging up on a batch being handed over.

    A worker hands each batch's memory to the parent over a socket (multiprocessing's
    resource_sharer), whose thread prints any error through sys.excepthook. When Ctrl-C stops
    the parent mid-handover, that is a "Connection reset by peer" traceback on the user's
    terminal under the parent's own one-line message. The parent reports why it stopped.
    """
    def hook_without_hang_ups(kind, error, traceback):
        if not issubclass(kind, (ConnectionError, EOFError)):
            hook(kind, error, traceback)
    return hook_without_hang_ups


def make_loader(plan: Plan, shards: list[int], source: Source, preprocess: Preprocess, *,
                batch_size: int, workers: int, max_pixels: int, pin_memory: bool,
                quarantined: dict[int, str] | None = None,
                prefetch: int = PREFETCH_BATCHES) -> DataLoader:
    """Batches of the pending shards in plan order (DataLoader keeps order across workers)."""
    extra = {}
    if workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": prefetch,
                 "worker_init_fn": init_worker,
                 "multiprocessing_context": "fork" if os.name == "posix" else None}
    return DataLoader(
        PlanItems(plan, source, preprocess, max_pixels, quarantined), batch_size=batch_size,
        sampler=PendingItems(plan, shards), num_workers=workers, collate_fn=collate,
        pin_memory=pin_memory, **extra,
    )
