"""Bench stage: the DataLoader alone, at the job's workers, batch and prefetch."""

from __future__ import annotations

import time

from pipeline.bench.sample import Figure, Sample, rate
from pipeline.loader import make_loader
from pipeline.memory import LoaderSize


def measure(sample: Sample) -> None:
    chosen = sample.job.settings
    size = LoaderSize(chosen.workers, chosen.batch_size, chosen.prefetch)
    found = alone(sample.plan, sample.job.source, sample.job.spec.preprocess, size,
                  sample.config.max_pixels, pin_memory=sample.job.classifier.on_cuda)
    sample.figures.append(figure(found, size, len(sample.paths)))


def ready_at_start(size: LoaderSize) -> int:
    """Batches the loader may hold ready when its first arrives: each worker's prefetched
    ones (workers start together), or the one in hand when decoding in the main process."""
    return max(1, size.workers * size.prefetch)


def alone(plan, source, preprocess, size: LoaderSize, max_pixels: int,
          pin_memory: bool = False) -> float | None:
    """Images/s out of the DataLoader, nothing else running; the better of two passes.

    Timed from when the batches ready at start (ready_at_start) are taken: worker
    start-up is not throughput, and batches decoded before the clock started would count
    as taking no time (64 images with 2 workers once "measured" 300,000 images/s). None
    when no batch comes after those.
    """
    ready = ready_at_start(size)
    if plan.num_items <= ready * size.batch_size:
        return None
    best = 0.0
    for _ in range(2):  # the first pass also pays for warming files and allocator
        loader = make_loader(plan, list(range(plan.num_shards)), source, preprocess,
                             batch_size=size.batch_size, workers=size.workers,
                             max_pixels=max_pixels, pin_memory=pin_memory,
                             prefetch=size.prefetch)
        batches = iter(loader)
        for _ in range(ready):
            next(batches)
        started, count = time.perf_counter(), 0
        for batch in batches:
            count += len(batch.indices)
        seconds = time.perf_counter() - started
        del batches, loader
        best = max(best, rate(count, seconds))
    return best


def figure(found: float | None, size: LoaderSize, images: int) -> Figure:
    if found is None:
        return Figure("loader alone", 0.0, f"not timed: {images} image(s) are no more than "
                      f"the {ready_at_start(size)} batch(es) of {size.batch_size} the loader "
                      "has ready at its start; use more --images")
    workers = size.workers
    return Figure("loader alone", found, f"{workers} worker(s), {found / workers:.1f}/worker"
                  if workers else "in the main process (--workers 0)")
