"""The settings resolved at start: device, precision, batch size, workers, prefetch, compile.

Decided here, in one place, before any image is labelled; where the best value depends on
the machine it is measured on it (tuning.py), and the figures behind each choice are
recorded with it in run.json and summary.json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from pipeline import heap, runtimes, tuning
from pipeline.classifier import Classifier, resolve_device, resolve_precision
from pipeline.config import RunConfig
from pipeline.errors import UsageError, notice
from pipeline.launchers import Slice
from pipeline.options import declared
from pipeline.memory import (PREFETCH_BATCHES, LoaderSize, available_memory, fit_pinned_memory,
                             fit_shared_memory, free_shared_memory, size_for_shared_memory)
from pipeline.progress import step
from pipeline.sources import Source

# Below this many images to label, compiling cannot pay on any machine we know: it takes
# 20-30 s and saves a third of the model's time. Not measured for, then.
MIN_IMAGES_TO_COMPILE = 1000
# Below this many, the batch size and the runtimes are not measured either (what this
# machine measured before is still used): measuring takes 10-60 s on a CPU, longer than
# labelling such a job at any of the candidates. LABEL_IMAGES_MEASURE_FROM sets another.
MIN_IMAGES_TO_MEASURE = 1000
CUDA_PREFETCH_BATCHES = 2
COMPILED = runtimes.COMPILED  # torch's own: chosen by what compiling costs and gives here


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    workers: int
    prefetch: int  # batches each worker is asked for ahead
    threads: int | None = None  # torch threads while labelling; None: torch's default
    # Every batch padded to batch_size (a compiled network: one graph; CUDA: one cuDNN choice)
    pad_batches: bool = False
    runtime: str = runtimes.EAGER  # runtimes.RUNTIMES: what runs the network
    measured: dict = field(default_factory=dict, compare=False)  # the figures behind them

    @property
    def compile(self) -> bool:
        """torch.compile runs the network (run.json's `compile`, as before runtimes)."""
        return self.runtime == COMPILED

    def to_dict(self) -> dict:
        return {"device": str(self.device), "precision": str(self.dtype).removeprefix("torch."),
                "batch_size": self.batch_size, "workers": self.workers,
                "prefetch": self.prefetch, "compile": self.compile, "runtime": self.runtime,
                "torch_threads": self.threads, "measured": self.measured}


def apply(classifier: Classifier, settings: Settings) -> None:
    """The one place the run's classifier takes its settings: the chosen runtime's network
    (prepared while measuring: a compile that was measured is kept, not redone) and one
    batch shape."""
    # a runtime with threads of its own gets those the workers leave it (torch's: runner)
    if settings.threads and hasattr(classifier.net, "with_threads"):
        classifier.use_network(classifier.net.with_threads(settings.threads), settings.runtime,
                               classifier.own_kernels)
    if settings.runtime != classifier.runtime or settings.compile:
        runtimes.get(settings.runtime).prepare(classifier, runtimes.Preparing(
            batch_size=settings.batch_size, cache=tuning.cache_dir()))
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


def resolve(config: RunConfig, part: Slice, classifier: Classifier, source: Source,
            sample: list[str], pending: int, ended_abruptly: str | None = None) -> Settings:
    """Everything the run decides about the machine, once; `apply` gives it to the classifier.

    `sample`: paths of the job's first images, to measure decoding on; `pending`: how many
    images this process is to label; `ended_abruptly`: where the last run crashed (a file
    that crashed the decoder in its process), read from the run directory. Each step may use
    what the ones before it measured (docs/design.md lists the order and why). Measuring a
    compiled model compiles the classifier; apply keeps that compile.
    """
    device = classifier.device
    # first: every measurement below, and the run, with the heap as the run will have it
    measured: dict = {"machine": tuning.machine_name(device), "heap": heap.keep_freed_memory()}
    cores = max(1, tuning.usable_cores() // _ranks_per_node(part))
    shown = not config.quiet
    runtime = _runtime_asked(config, classifier, source, sample, measured)
    model = _batch_size(config, classifier, measured, pending)
    if runtime is None:  # auto: another runtime installed here is measured against torch's
        runtime, model = _fastest_runtime(config, classifier, model, pending, measured)
    # where a compiled model's best batch is looked for: around the eager best, if measured
    compiled_sizes = (tuning.around(model.batch_size, tuning.candidate_batches(device))
                      if config.batch_size is None else None)
    compile, compiled, eager = _compile_asked(config), None, None
    if runtime != runtimes.EAGER:
        compile = False
    elif compile is None:
        compile = _compile_pays(classifier, model, compiled_sizes, pending, measured)
    if compile:
        # the eager model, measured before compiling: what the compiled one is held to
        eager = _Model(classifier, model.batch_size, model.images_per_second())
        expected = measured.get("compile", {}).get("expected", {}).get("compile_seconds")
        with step(f"compiling {classifier.spec.model} with torch.compile"
                  + (f" (about {expected:.0f} s, once: the kernels are cached)" if expected
                     else ""), shown):
            compiled = _compile(classifier, model, compiled_sizes, cores, measured)
    workers = config.workers
    if workers is None:
        workers = _workers(config, source, sample[:tuning.DECODE_SAMPLE], model, cores,
                           measured, pending)
    size = _fit_memory(config, part, classifier, LoaderSize(workers, model.batch_size,
                                                            _prefetch(device)), measured)
    if compile:
        measured["compiled"] = _compile_figures(classifier, compiled, size.batch_size, eager)
    if ended_abruptly:
        size = _after_abrupt_end(size, config, classifier.spec.preprocess.crop_bytes,
                                 ended_abruptly)
    return Settings(device=device, dtype=classifier.dtype, batch_size=size.batch_size,
                    workers=size.workers, prefetch=size.prefetch,
                    threads=_model_threads(device, size.workers),
                    pad_batches=compile or classifier.on_cuda,
                    runtime=COMPILED if compile else runtime, measured=measured)


def _compile_asked(config: RunConfig) -> bool | None:
    """torch's two runtimes: compiled or eager as asked; None (auto): as it pays."""
    if config.runtime == "auto":
        return None
    return config.runtime == COMPILED


def _runtime_asked(config: RunConfig, classifier: Classifier, source: Source,
                   sample: list[str], measured: dict) -> str | None:
    """The runtime asked for, made the classifier's (converted or read from its cache; a
    precision of its own, such as INT8, calibrated and checked on the job's `sample`); None
    for auto, where torch's is measured first. torch's own (eager, compile) are decided
    with compiling."""
    runtime = runtimes.get(config.runtime) if config.runtime != "auto" else None
    if runtime is not None and runtime.name not in (runtimes.EAGER, COMPILED):
        runtime.check(classifier.device, config.precision)
        if config.embeddings and runtime.own_kernels:
            raise UsageError("--embeddings come from torch's forward pass: use --runtime "
                             f"{' or '.join(n for n, r in runtimes.RUNTIMES.items() if not r.own_kernels)} "
                             "with them")
        preprocess = classifier.spec.preprocess
        preparing = runtimes.Preparing(
            precision=config.precision, agreement=config.int8_agreement,
            cache=tuning.cache_dir(), options=declared(runtime, config.options), images=lambda n: (tuning.first_crops(
                source, sample[:n], preprocess, config.max_pixels), len(sample[:n])))
        what = (f"quantizing {classifier.spec.model} to {config.precision.upper()} on this "
                "job's first images and checking it against fp32"
                if runtime.sample_size(config.precision) else
                f"preparing {classifier.spec.model} for {config.runtime}")
        with step(what, not config.quiet):
            measured.update(runtime.prepare(classifier, preparing))
        return config.runtime
    if config.runtime == "auto" and not config.embeddings:
        return None
    return runtimes.EAGER


def _fastest_runtime(config: RunConfig, classifier: Classifier, model: _Model, pending: int,
                     measured: dict) -> tuple[str, _Model]:
    """auto: torch at its best batch against each other runtime installed here at its own;
    the faster is kept, and what each did is recorded. torch counts at its compiled rate
    where compiling would pay for the `pending` images: the speedup compiling gave on this
    machine last time (else our prior), since compiling only to compare costs a minute. Torch
    is then compiled or not as ever (_compile_pays, the same figures). A job too small to
    repay converting and measuring another runtime runs on torch."""
    eager = runtimes.EAGER
    others = [name for name in runtimes.installed(classifier.device)
              if runtimes.get(name).own_kernels]
    if not others:
        return eager, model
    if pending < min_images_to_measure():
        measured["runtimes"] = {"chosen": eager, "not_measured": _too_few(pending)}
        return eager, model
    rates = {eager: model.images_per_second()}
    torch_rate, record = rates[eager] or 0, {}
    if pending >= MIN_IMAGES_TO_COMPILE:
        expected = tuning.compile_figures(classifier, model.batch_size)
        if tuning.compile_pays(pending, torch_rate, expected["speedup"],
                               expected["compile_seconds"]):
            torch_rate *= expected["speedup"]
            record = {"compiled_expected": round(torch_rate, 1),
                      "compiled_expected_from": expected["from"]}
    best, best_rate, best_model = eager, torch_rate, model
    for name in others:
        with step(f"measuring {classifier.spec.model} on {name} against torch (converted "
                  "once, then cached)", not config.quiet):
            runtimes.get(name).prepare(classifier, runtimes.Preparing(cache=tuning.cache_dir()))
            other = _batch_size(config, classifier, {}, pending, announce=False)
            rates[name] = other.images_per_second()
        if (rates[name] or 0) > best_rate:
            best, best_rate, best_model = name, rates[name], other
    if best == eager:
        runtimes.get(eager).prepare(classifier)
    measured["runtimes"] = {"images_per_second": {k: round(v or 0, 1) for k, v in
                                                  rates.items()}, **record, "chosen": best}
    return best, best_model


def min_images_to_measure() -> int:
    return int(os.environ.get("LABEL_IMAGES_MEASURE_FROM", MIN_IMAGES_TO_MEASURE))


def _too_few(pending: int) -> str:
    return (f"{pending} images to label, fewer than the {min_images_to_measure()} that "
            "repay measuring")


@dataclass
class _Model:
    """The batch the model runs at, and its images/s there, measured when first needed."""
    classifier: Classifier
    batch_size: int
    rate: float | None = None

    def images_per_second(self) -> float | None:
        if self.rate is None:
            self.rate = tuning.model_rate(self.classifier, self.batch_size,
                                          tuning.MEASURE_SECONDS)
        return self.rate


def _batch_size(config: RunConfig, classifier: Classifier, measured: dict, pending: int,
                announce: bool = True) -> _Model:
    """--batch-size, else the size at which the eager model is fastest here (measured once
    per machine; a job too small to repay it takes the second smallest candidate)."""
    if config.batch_size is not None:
        return _Model(classifier, config.batch_size)
    known = tuning.batch_known(classifier)
    if not known and pending < min_images_to_measure():
        size = tuning.candidate_batches(classifier.device)[1]
        measured["batch_sizes"] = {"not_measured": _too_few(pending), "chosen": size}
        return _Model(classifier, size)
    sizes = ", ".join(map(str, tuning.candidate_batches(classifier.device)))
    with step(f"measuring the fastest batch size of {classifier.spec.model} "
              f"({str(classifier.dtype).removeprefix('torch.')}, {classifier.device.type}) among "
              f"{sizes}: once per machine, then cached",
              announce and not known and not config.quiet):
        choice = tuning.measure_batch_size(classifier)
    measured["batch_sizes"] = choice.to_dict()
    return _Model(classifier, choice.batch_size, choice.rates.get(choice.batch_size))


def _compile_pays(classifier: Classifier, model: _Model, compiled_sizes: tuple[int, ...] | None,
                  pending: int, measured: dict) -> bool:
    """Whether the pending images at the eager rate repay what compiling costs here."""
    expected = tuning.compile_figures(classifier, model.batch_size)
    # The first compile on a machine also tries the sizes around the eager best, each a
    # compile of its own; later runs know the best and compile once.
    compiles = 1 if compiled_sizes is None or tuning.compiled_batch_known(
        classifier, compiled_sizes) else len(compiled_sizes)
    pays = pending >= MIN_IMAGES_TO_COMPILE and tuning.compile_pays(
        pending, model.images_per_second(), expected["speedup"],
        compiles * expected["compile_seconds"])
    measured["compile"] = {"pending_images": pending, "chosen": pays, "expected": expected}
    return pays


def _compile(classifier: Classifier, model: _Model, compiled_sizes: tuple[int, ...] | None,
             cores: int, measured: dict) -> tuning.BatchChoice | None:
    """Compiles the classifier; `model` becomes the compiled one at its own best batch
    (measured around the eager best), unless the batch size was given."""
    tuning.use_inductor_cache(cores)
    runtimes.get(COMPILED).prepare(classifier, runtimes.Preparing(batch_size=model.batch_size))
    if not compiled_sizes:
        # The batch was given: the workers go by the eager rate, and the compiled one is
        # measured last, at the size the run ends up with (its first call the compile).
        return None
    compiled = tuning.measure_batch_size(classifier, compiled_sizes, compiled=True)
    measured["compiled_batch_sizes"] = compiled.to_dict()
    model.batch_size = compiled.batch_size
    model.rate = compiled.rates.get(compiled.batch_size)  # the rate the decoders feed
    return compiled


def _workers(config: RunConfig, source: Source, sample: list[str], model: _Model, cores: int,
             measured: dict, pending: int) -> int:
    """Decode workers from the model's rate and the decode rate per core. The model's rate
    is the batch measurement's, or measured now for a job that repays it; a smaller job
    measures nothing it does not know (seconds of a model run before its first image)."""
    preprocess = model.classifier.spec.preprocess
    decode_rate = tuning.decode_rate(source, sample, preprocess, config.max_pixels)
    if model.rate is None and pending < min_images_to_measure():
        rate = None
        measured["model_images_per_second"] = {"not_measured": _too_few(pending)}
    else:
        rate = model.images_per_second()
        measured["model_images_per_second"] = round(rate or 0, 1)
    measured.update(decode_images_per_second_per_core=round(decode_rate or 0, 1), cores=cores)
    return default_workers(model.classifier.device, rate, decode_rate, cores)


def _prefetch(device: torch.device) -> int:
    # On CUDA each batch in flight is also pinned, in page-locked memory nothing else may
    # use: fewer ahead there.
    return CUDA_PREFETCH_BATCHES if device.type == "cuda" else PREFETCH_BATCHES


def _fit_memory(config: RunConfig, part: Slice, classifier: Classifier, wanted: LoaderSize,
                measured: dict) -> LoaderSize:
    """The workers and batch within the shared memory (and on CUDA the pinned memory) this
    process may use; torchrun's processes on one node share both."""
    crop_bytes = classifier.spec.preprocess.crop_bytes
    size = size_for_shared_memory(
        wanted, crop_bytes, fixed_workers=config.workers is not None,
        fixed_batch=config.batch_size is not None, sharing=_ranks_per_node(part))
    if classifier.device.type == "cuda":
        size = fit_pinned_memory(size, crop_bytes, available_memory(),
                                 sharing=_ranks_per_node(part))
        measured["pinned_megabytes"] = round(size.pinned_bytes(crop_bytes) / 2**20)
    return size


def _compile_figures(classifier: Classifier, compiled: tuning.BatchChoice | None,
                     batch_size: int, eager: _Model) -> dict:
    """What the compile cost and gave against the eager model, kept for the next run."""
    if compiled and compiled.first_call_seconds and batch_size in compiled.rates:
        # just compiled and measured at this size: what it cost and gave is known
        return tuning.keep_compile_figures(classifier, eager.batch_size,
                                           compiled.first_call_seconds,
                                           compiled.rates[batch_size], eager.rate)
    # compiled now, at the size the run uses
    return tuning.measure_compile(classifier, batch_size, eager.rate, eager.batch_size)


def default_workers(device: torch.device, model_rate: float | None,
                    decode_rate: float | None, cores: int) -> int:
    """Decode workers from the measured rates (tuning.workers_for); with nothing to go by,
    none on a CPU and one a core on a GPU."""
    if not model_rate or not decode_rate:
        return min(8, cores) if device.type == "cuda" else 0
    return tuning.workers_for(model_rate, decode_rate, cores, device.type == "cuda")


def _model_threads(device: torch.device, workers: int) -> int | None:
    """On a CPU with decode workers, the model's threads on the cores they leave it, as
    tuning.workers_for counts them: two threads on a core a worker decodes on wait for it
    at every layer (12 MP photos, 1 worker on 2 cores: 29-30 images/s with 2 threads, 36-37
    with 1). Counted from torch's own default (physical cores); None leaves that default.
    An OMP_NUM_THREADS of the user's (or torchrun's) is kept."""
    if device.type != "cpu" or not workers or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, torch.get_num_threads() - workers)


def _ranks_per_node(part: Slice) -> int:
    return part.per_node


def _after_abrupt_end(size: LoaderSize, config: RunConfig, crop_bytes: int,
                      where: str) -> LoaderSize:
    """A file crashed the decoder in the last run's own process (a fatal signal's trace):
    decode in a worker this time (where none was asked for), so that such a file is found
    and becomes an error row instead of ending the run again at the same place."""
    if size.workers or config.workers is not None:
        return size
    worker = fit_shared_memory(LoaderSize(1, size.batch_size, PREFETCH_BATCHES),
                               crop_bytes, free_shared_memory(), fixed_workers=True,
                               fixed_batch=True)
    if worker is None:
        return size
    notice(f"the last run in {where} crashed (a fatal signal, as when a file crashes the "
           "decoder): decoding in a worker process this time, so that such a file becomes "
           "an error row instead of ending the run again")
    return worker
