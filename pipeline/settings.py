"""The settings resolved at start: runtime, batch size, workers, prefetch, threads.

Decided here, in one place, before any image is labelled: an ordered list of small
decisions (`DECISIONS`, read top to bottom), each over what the ones before it decided and
over the machine's measurements (tuning.Measurements: each figure measured when a decision
first asks, kept per machine). The figures behind each choice are recorded with it in
run.json and summary.json. What a runtime costs and gives is its own to say (runtimes/).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from pipeline import runtimes, tuning
from pipeline.classifier import Classifier, resolve_device, resolve_precision
from pipeline.config import RunConfig
from pipeline.errors import UsageError, notice
from pipeline.launchers import Slice
from pipeline.options import declared
from pipeline.memory import (PREFETCH_BATCHES, LoaderSize, available_memory, fit_pinned_memory,
                             fit_shared_memory, free_shared_memory, size_for_shared_memory)
from pipeline.sources import Source

CUDA_PREFETCH_BATCHES = 2


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    workers: int
    prefetch: int  # batches each worker is asked for ahead
    threads: int | None = None  # torch threads while labelling; None: torch's default
    # Every batch padded to batch_size (a network prepared for one shape; CUDA: one cuDNN
    # choice)
    pad_batches: bool = False
    runtime: str = runtimes.EAGER  # runtimes.RUNTIMES: what runs the network
    measured: dict = field(default_factory=dict, compare=False)  # the figures behind them

    @property
    def compile(self) -> bool:
        """Whether a compiler prepared the network for one shape (run.json's `compile`)."""
        return runtimes.get(self.runtime).one_shape

    def to_dict(self) -> dict:
        return {"device": str(self.device), "precision": str(self.dtype).removeprefix("torch."),
                "batch_size": self.batch_size, "workers": self.workers,
                "prefetch": self.prefetch, "compile": self.compile, "runtime": self.runtime,
                "torch_threads": self.threads, "measured": self.measured}


def apply(classifier: Classifier, settings: Settings) -> None:
    """The one place the run's classifier takes its settings beyond its runtime (which
    resolve prepared: a compile or a conversion made while measuring is kept): the threads
    the workers leave it, and one batch shape."""
    # a runtime with threads of its own gets those the workers leave it (torch's: runner)
    if settings.threads and hasattr(classifier.net, "with_threads"):
        classifier.use_network(classifier.net.with_threads(settings.threads), settings.runtime,
                               classifier.own_kernels, classifier.speed_key)
    if settings.pad_batches:
        classifier.pad_batches_to(settings.batch_size)


def device_and_precision(config: RunConfig, part: Slice,
                         only: str | None = None) -> tuple[torch.device, torch.dtype]:
    """`only`: the one precision the model's backend runs it in (Keras: fp32), if any."""
    # one GPU per torchrun process: its local rank's, unless --device cuda:N says which
    device = resolve_device(config.device, part.local_rank if part.distributed else None)
    if only is not None and config.precision not in ("auto", only):
        raise UsageError(f"--precision {config.precision}: {config.model} runs in {only} only")
    return device, resolve_precision(only or config.precision, device)


@dataclass
class _Draft:
    """The settings as decided so far, and what the decisions go by."""

    config: RunConfig
    part: Slice
    classifier: Classifier
    measure: tuning.Measurements
    ended_abruptly: str | None
    runtime: runtimes.Runtime | None = None
    speed: tuning.Speed | None = None  # the chosen runtime's batch size and rate
    size: LoaderSize | None = None  # workers, batch size and prefetch
    threads: int | None = None


def resolve(config: RunConfig, part: Slice, classifier: Classifier, source: Source,
            sample: list[str], pending: int, ended_abruptly: str | None = None) -> Settings:
    """Everything the run decides about the machine, once: `DECISIONS` in order. The
    classifier leaves it prepared for the chosen runtime; `apply` gives it the rest.

    `sample`: paths of the job's first images, to measure decoding on; `pending`: how many
    images this process is to label; `ended_abruptly`: where the last run crashed (a file
    that crashed the decoder in its process), read from the run directory.
    """
    measure = tuning.Measurements(
        classifier, source, sample, pending, config.max_pixels,
        cores=max(1, tuning.usable_cores() // part.per_node), batch_size=config.batch_size,
        shown=not config.quiet)
    draft = _Draft(config, part, classifier, measure, ended_abruptly)
    for decide in DECISIONS:
        decide(draft)
    size = draft.size
    return Settings(device=classifier.device, dtype=classifier.dtype,
                    batch_size=size.batch_size, workers=size.workers, prefetch=size.prefetch,
                    threads=draft.threads,
                    pad_batches=draft.runtime.one_shape or classifier.on_cuda,
                    runtime=draft.runtime.name, measured=measure.record)


def runtime(d: _Draft) -> None:
    """--runtime as asked; auto: of the runtimes that can run this job here (with
    --embeddings, those running torch's forward pass), the one that labels the pending
    images soonest, counting what each costs once (a compile, a conversion). Each says
    what it costs and gives (Runtime.expected); one that a job this small cannot repay is
    not weighed, and says why."""
    config, classifier, measure = d.config, d.classifier, d.measure
    if config.runtime != "auto":
        d.runtime = runtimes.get(config.runtime)
        d.runtime.check(classifier.device, config.precision)
        if config.embeddings and d.runtime.own_kernels:
            raise UsageError("--embeddings come from torch's forward pass: use --runtime "
                             f"{' or '.join(n for n, r in runtimes.RUNTIMES.items() if not r.own_kernels)} "
                             "with them")
        return
    able = [runtimes.get(name) for name in runtimes.installed(classifier.device)]
    able = [r for r in able if not (config.embeddings and r.own_kernels)]
    not_weighed = {r.name: r.not_weighed(measure) for r in able}
    weighed = [r for r in able if not_weighed[r.name] is None]
    record = {"pending_images": measure.pending}
    if [r.name for r in weighed] == [runtimes.EAGER]:  # nothing to weigh it against
        d.runtime = runtimes.get(runtimes.EAGER)
    else:
        expected = {r.name: r.expected(classifier, measure) for r in weighed}
        d.runtime = runtimes.get(runtimes.fastest(measure.pending, expected))
        record["weighed"] = {name: e.to_dict(measure.pending) for name, e in expected.items()}
    record["not_weighed"] = {name: why for name, why in not_weighed.items() if why}
    measure.record["runtimes"] = {**record, "chosen": d.runtime.name}


def batch_size(d: _Draft) -> None:
    """The chosen runtime's: the classifier prepared for it (converted, compiled, or
    quantized and checked on the job's first images, where asked), at the batch size asked
    or the one it runs fastest at here."""
    config, classifier, measure, chosen = d.config, d.classifier, d.measure, d.runtime
    preprocess = classifier.spec.preprocess
    preparing = runtimes.Preparing(
        precision=config.precision, cache=measure.cache,
        options=declared(chosen, config.options), images=lambda n: (tuning.first_crops(
            d.measure.source, measure.sample[:n], preprocess, config.max_pixels),
            len(measure.sample[:n])))
    d.speed = chosen.take(classifier, measure, preparing)
    batches = measure.batches.get(chosen.name) or measure.batches.get(runtimes.EAGER)
    if batches:
        measure.record["batch_sizes"] = batches


def workers(d: _Draft) -> None:
    """--workers, else decode workers from the model's rate and the decode rate per core.
    The model's rate is the batch measurement's, or measured now for a job that repays
    it; a smaller job measures nothing it does not know (seconds of a model run before its
    first image)."""
    config, measure, speed = d.config, d.measure, d.speed
    count = config.workers
    if count is None:
        decode_rate = measure.decode_rate()
        if speed.rate is None and not measure.worth_measuring:
            rate = None
            measure.record["model_images_per_second"] = {"not_measured": measure.too_few()}
        else:
            rate = speed.images_per_second()
            measure.record["model_images_per_second"] = round(rate or 0, 1)
        count = default_workers(d.classifier.device, rate, decode_rate, measure.cores)
    d.size = LoaderSize(count, speed.batch_size, _prefetch(d.classifier.device))


def memory(d: _Draft) -> None:
    """The workers and batch within the shared memory (and on CUDA the pinned memory) this
    process may use; torchrun's processes on one node share both."""
    config, classifier = d.config, d.classifier
    crop_bytes = classifier.spec.preprocess.crop_bytes
    size = size_for_shared_memory(
        d.size, crop_bytes, fixed_workers=config.workers is not None,
        fixed_batch=config.batch_size is not None, sharing=d.part.per_node)
    if classifier.device.type == "cuda":
        size = fit_pinned_memory(size, crop_bytes, available_memory(), sharing=d.part.per_node)
        d.measure.record["pinned_megabytes"] = round(size.pinned_bytes(crop_bytes) / 2**20)
    d.size = size


def after_abrupt_end(d: _Draft) -> None:
    """A file crashed the decoder in the last run's own process (a fatal signal's trace):
    decode in a worker this time (where none was asked for), so that such a file is found
    and becomes an error row instead of ending the run again at the same place."""
    if not d.ended_abruptly or d.size.workers or d.config.workers is not None:
        return
    worker = fit_shared_memory(LoaderSize(1, d.size.batch_size, PREFETCH_BATCHES),
                               d.classifier.spec.preprocess.crop_bytes, free_shared_memory(),
                               fixed_workers=True, fixed_batch=True)
    if worker is None:
        return
    notice(f"the last run in {d.ended_abruptly} crashed (a fatal signal, as when a file "
           "crashes the decoder): decoding in a worker process this time, so that such a "
           "file becomes an error row instead of ending the run again")
    d.size = worker


def threads(d: _Draft) -> None:
    """On a CPU with decode workers, the model's threads on the cores they leave it, as
    tuning.workers_for counts them: two threads on a core a worker decodes on wait for it
    at every layer (12 MP photos, 1 worker on 2 cores: 29-30 images/s with 2 threads, 36-37
    with 1). Counted from torch's own default (physical cores); None leaves that default.
    An OMP_NUM_THREADS of the user's (or torchrun's) is kept."""
    if (d.classifier.device.type == "cpu" and d.size.workers
            and "OMP_NUM_THREADS" not in os.environ):
        d.threads = max(1, torch.get_num_threads() - d.size.workers)


def settled(d: _Draft) -> None:
    """The batch size is final: the runtime keeps or records what it measured at it (a
    compile's cost and speedup, for the next run's weighing)."""
    d.runtime.settled(d.classifier, d.measure, d.speed, d.size.batch_size)


DECISIONS = (runtime, batch_size, workers, memory, after_abrupt_end, threads, settled)


def default_workers(device: torch.device, model_rate: float | None,
                    decode_rate: float | None, cores: int) -> int:
    """Decode workers from the measured rates (tuning.workers_for); with nothing to go by,
    none on a CPU and one a core on a GPU."""
    if not model_rate or not decode_rate:
        return min(8, cores) if device.type == "cuda" else 0
    return tuning.workers_for(model_rate, decode_rate, cores, device.type == "cuda")


def _prefetch(device: torch.device) -> int:
    # On CUDA each batch in flight is also pinned, in page-locked memory nothing else may
    # use: fewer ahead there.
    return CUDA_PREFETCH_BATCHES if device.type == "cuda" else PREFETCH_BATCHES
