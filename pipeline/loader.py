"""Dataset and DataLoader over the pending shards of a plan; keys travel beside the tensors."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from pipeline.decode import DECODE_ERRORS, ImageError, decode
from pipeline.memory import PREFETCH_BATCHES
from pipeline.preprocess import Preprocess
from pipeline.plan import Plan
from pipeline.sources import Source

# A file larger than this per --max-pixels pixel is not read: even uncompressed 16-bit RGBA
# takes 8 bytes a pixel, so it cannot be an image the run would accept.
MAX_BYTES_PER_PIXEL = 8


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
