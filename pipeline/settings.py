"""The settings resolved at start: device, precision, batch size, workers, prefetch, compile.

Decided here, in one place, from the configuration and the machine; frozen; recorded in
run.json as they were decided, with the reason for any that the machine forced.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from pipeline.classifier import resolve_device, resolve_precision
from pipeline.config import RunConfig
from pipeline.errors import notice
from pipeline.launchers import Slice
from pipeline.loader import (PREFETCH_BATCHES, LoaderSize, fit_shared_memory,
                             free_shared_memory, size_for_shared_memory)

# Cores up to which a CPU run decodes in its own process, between batches: what was measured.
SMALL_CPU = 2


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    workers: int
    prefetch: int  # batches each worker is asked for ahead
    compile: bool

    def to_dict(self) -> dict:
        return {"device": str(self.device), "precision": str(self.dtype).removeprefix("torch."),
                "batch_size": self.batch_size, "workers": self.workers,
                "prefetch": self.prefetch, "compile": self.compile}


def resolve(config: RunConfig, part: Slice, crop_bytes: int) -> Settings:
    """Everything the run decides about the machine, before any image is read."""
    device = resolve_device(config.device)
    if part.distributed and device.type == "cuda" and config.device in ("auto", "cuda"):
        device = torch.device("cuda", part.local_rank)  # one GPU per torchrun process
    wanted = LoaderSize(
        workers=config.workers if config.workers is not None else default_workers(device),
        batch_size=config.batch_size or default_batch_size(device), prefetch=PREFETCH_BATCHES)
    size = size_for_shared_memory(
        wanted, crop_bytes, fixed_workers=config.workers is not None,
        fixed_batch=config.batch_size is not None,
        # torchrun's processes on one node share it
        sharing=int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if part.distributed else 1)
    return Settings(device=device, dtype=resolve_precision(config.precision, device),
                    batch_size=size.batch_size, workers=size.workers, prefetch=size.prefetch,
                    compile=config.compile)


def after_abrupt_end(settings: Settings, config: RunConfig, crop_bytes: int,
                     where: str) -> Settings:
    """The last run here was killed, or a file crashed the decoder in its own process:
    decode in a worker this time (where none was asked for), so that such a file is found
    and becomes an error row instead of ending the run again at the same place."""
    if settings.workers or config.workers is not None:
        return settings
    worker = fit_shared_memory(LoaderSize(1, settings.batch_size, PREFETCH_BATCHES),
                               crop_bytes, free_shared_memory(), fixed_workers=True,
                               fixed_batch=True)
    if worker is None:
        return settings
    notice(f"the last run in {where} ended abruptly: decoding in a worker process this "
           "time, so that a file that crashes the decoder cannot end it again")
    return dataclasses.replace(settings, workers=1, prefetch=worker.prefetch)


def default_batch_size(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 32


def default_workers(device: torch.device) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    if device.type == "cuda":
        return min(8, cpus)
    if cpus <= SMALL_CPU:
        # The model's threads take every core. A worker decoding beside them preempts one,
        # and the other waits for it at each layer's end: on 2 cores, ResNet-50 on 500x375
        # photos ran at 0.75-0.93x the model alone that way, 0.85-1.02x decoding here between
        # batches (seven interleaved pairs); on 12 MP photos the two were even.
        return 0
    # With more cores the model gets faster, so decoding in turn with it costs more, while
    # a worker's share of the cores shrinks. Not measured (no such machine here).
    return cpus // 2
