"""The settings resolved at start: device, precision, batch size, workers, prefetch, compile.

Decided here, in one place, before any image is labelled; where the best value depends on
the machine it is measured on it (tuning.py), and the figures behind each choice are
recorded with it in run.json and summary.json.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from pipeline import tuning
from pipeline.classifier import Classifier, resolve_device, resolve_precision
from pipeline.config import RunConfig
from pipeline.errors import notice
from pipeline.launchers import Slice
from pipeline.loader import (PREFETCH_BATCHES, LoaderSize, available_memory, fit_pinned_memory,
                             fit_shared_memory, free_shared_memory, size_for_shared_memory)
from pipeline.sources import Source

# Below this many images to label, compiling cannot pay on any machine we know: it takes
# 20-30 s and saves a third of the model's time. Not measured for, then.
MIN_IMAGES_TO_COMPILE = 1000
CUDA_PREFETCH_BATCHES = 2


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    workers: int
    prefetch: int  # batches each worker is asked for ahead
    compile: bool
    measured: dict = field(default_factory=dict, compare=False)  # the figures behind them

    def to_dict(self) -> dict:
        return {"device": str(self.device), "precision": str(self.dtype).removeprefix("torch."),
                "batch_size": self.batch_size, "workers": self.workers,
                "prefetch": self.prefetch, "compile": self.compile, "measured": self.measured}


def device_and_precision(config: RunConfig, part: Slice) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(config.device)
    if part.distributed and device.type == "cuda" and config.device in ("auto", "cuda"):
        device = resolve_device(f"cuda:{part.local_rank}")  # one GPU per torchrun process
    return device, resolve_precision(config.precision, device)


def resolve(config: RunConfig, part: Slice, classifier: Classifier, source: Source,
            sample: list[str], pending: int) -> Settings:
    """Everything the run decides about the machine; compiles the classifier if it pays.

    `sample`: paths of the job's first images, to measure decoding on; `pending`: how many
    images this process is to label.
    """
    preprocess, device = classifier.spec.preprocess, classifier.device
    measured: dict = {"machine": tuning.machine_name(device)}
    choice = None
    if config.batch_size is None:
        choice = tuning.measure_batch_size(classifier)
        measured["batch_sizes"] = choice.to_dict()
    batch_size = config.batch_size or choice.batch_size
    model_rate = choice.rates.get(batch_size) if choice else None

    def rate_of_model() -> float | None:
        nonlocal model_rate
        if model_rate is None:
            model_rate = tuning.model_rate(classifier, batch_size, tuning.MEASURE_SECONDS)
        return model_rate

    compile = config.compile
    compiled_sizes = None  # where the compiled model's best batch is looked for
    if config.batch_size is None and compile is not False:
        compiled_sizes = tuning.around(batch_size, tuning.candidate_batches(device))
    if compile is None:
        expected = tuning.compile_figures(classifier, batch_size)
        # The first compile on a machine also tries the sizes around the eager best, each
        # a compile of its own; later runs know the best and compile once.
        compiles = 1 if compiled_sizes is None or tuning.compiled_batch_known(
            classifier, compiled_sizes) else len(compiled_sizes)
        compile = pending >= MIN_IMAGES_TO_COMPILE and tuning.compile_pays(
            pending, rate_of_model(), expected["speedup"], compiles * expected["compile_seconds"])
        measured["compile"] = {"pending_images": pending, "chosen": compile,
                               "expected": expected}
    eager_batch, compiled = batch_size, None
    if compile:
        eager_rate = rate_of_model()  # before compiling: what the compiled rate is held to
        tuning.use_inductor_cache(max(1, tuning.usable_cores() // _ranks_per_node(part)))
        classifier.compile(fixed_batch=batch_size)
        if compiled_sizes:
            compiled = tuning.measure_batch_size(classifier, compiled_sizes, compiled=True)
            measured["compiled_batch_sizes"] = compiled.to_dict()
            batch_size = compiled.batch_size
            model_rate = compiled.rates.get(batch_size)  # the rate the decoders feed
    workers = config.workers
    if workers is None:
        cores = max(1, tuning.usable_cores() // _ranks_per_node(part))
        decode_rate = tuning.decode_rate(source, sample, preprocess, config.max_pixels)
        workers = default_workers(device, rate_of_model(), decode_rate, cores)
        measured.update(model_images_per_second=round(rate_of_model() or 0, 1),
                        decode_images_per_second_per_core=round(decode_rate or 0, 1),
                        cores=cores)
    # On CUDA each batch in flight is also pinned, in page-locked memory nothing else may
    # use: fewer ahead there.
    prefetch = CUDA_PREFETCH_BATCHES if device.type == "cuda" else PREFETCH_BATCHES
    size = size_for_shared_memory(
        LoaderSize(workers, batch_size, prefetch), preprocess.crop_bytes,
        fixed_workers=config.workers is not None, fixed_batch=config.batch_size is not None,
        sharing=_ranks_per_node(part))  # torchrun's processes on one node share it
    if device.type == "cuda":
        size = fit_pinned_memory(size, preprocess.crop_bytes, available_memory(),
                                 sharing=_ranks_per_node(part))
        measured["pinned_megabytes"] = round(size.pinned_bytes(preprocess.crop_bytes) / 2**20)
        classifier.pad_batches_to(size.batch_size)  # one shape for cuDNN's kernel choice
    if compile:
        classifier.pad_batches_to(size.batch_size)  # one shape: one compile serves the run
        if compiled and compiled.first_call_seconds and size.batch_size in compiled.rates:
            # just compiled and measured at this size: what it cost and gave is known
            measured["compiled"] = tuning.keep_compile_figures(
                classifier, eager_batch, compiled.first_call_seconds,
                compiled.rates[size.batch_size], eager_rate)
        else:  # compiled now, at the size the run uses
            measured["compiled"] = tuning.measure_compile(classifier, size.batch_size,
                                                          eager_rate, eager_batch)
    return Settings(device=device, dtype=classifier.dtype, batch_size=size.batch_size,
                    workers=size.workers, prefetch=size.prefetch, compile=compile,
                    measured=measured)


def default_workers(device: torch.device, model_rate: float | None,
                    decode_rate: float | None, cores: int) -> int:
    """Decode workers from the measured rates (tuning.workers_for); with nothing to go by,
    none on a CPU and one a core on a GPU."""
    if not model_rate or not decode_rate:
        return min(8, cores) if device.type == "cuda" else 0
    return tuning.workers_for(model_rate, decode_rate, cores, device.type == "cuda")


def _ranks_per_node(part: Slice) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if part.distributed else 1


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
