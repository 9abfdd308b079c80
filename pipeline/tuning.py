"""Measuring the machine: the model's speed on each runtime, the decode rate, a compile's cost.

A default that depends on the machine is measured on it: a few synthetic batches at
candidate sizes on the chosen device and precision, the decode rate per core on the job's
own first images. `Measurements` is what the settings' decisions (settings.py) ask, each
figure measured when first asked. Batch measurements are cached per machine, model,
precision, input size, runtime and heap (heap.py) in the user's cache directory, so later
runs pay nothing; every figure is recorded.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from pipeline import cache, heap
from pipeline.cache import directory as cache_dir
from pipeline.classifier import Classifier
from pipeline.decode import DECODE_ERRORS, ImageError, decode
from pipeline.preprocess import Preprocess
from pipeline.progress import step
from pipeline.loader import MAX_BYTES_PER_PIXEL

CPU_BATCHES = (8, 16, 32, 64)
CUDA_BATCHES = (32, 64, 128, 256, 512)
MEASURE_SECONDS = 0.5  # per candidate, after its warm-up: enough for a steady figure
# Untimed batches first: the first chooses kernels (or compiles), and the heap grows to
# hold a batch over the first few (heap.py); timed from the first, a size read 25% low.
WARM_UP_BATCHES = 3
DECODE_SAMPLE = 16  # of the job's first images, decoded to measure the rate per core
# What compiling costs and gives when this machine has not said yet (then it is measured at
# the compile and kept): ResNet-50 bf16 on 2 cores, 1.5x on an Intel Xeon with AMX (the
# issue's figure), 1.2-1.45x with frozen weights on an AMD EPYC (docs/benchmarks.md).
COMPILE_SECONDS_COLD = 30.0
COMPILE_SPEEDUP = 1.4
BATCHES = "batch-sizes.json"  # the cache file of batch measurements
# Below this many images to label, the batch size and other runtimes are not measured (what
# this machine measured before is still used): measuring takes 10-60 s on a CPU, longer
# than labelling such a job at any of the candidates. LABEL_IMAGES_MEASURE_FROM sets another.
MIN_IMAGES_TO_MEASURE = 1000


def min_images_to_measure() -> int:
    return int(os.environ.get("LABEL_IMAGES_MEASURE_FROM", MIN_IMAGES_TO_MEASURE))


@dataclass
class Speed:
    """A model's batch size here and its images/s there, measured when first needed;
    `choice`: the batch measurement behind it, if one was made."""

    classifier: Classifier
    batch_size: int
    rate: float | None = None
    choice: BatchChoice | None = None

    def images_per_second(self) -> float | None:
        if self.rate is None:
            self.rate = model_rate(self.classifier, self.batch_size, MEASURE_SECONDS)
        return self.rate


@dataclass
class Measurements:
    """What the run's decisions (settings.py) go by, for this machine, model and job, each
    figure measured when a decision first asks for it (kept per machine where it does not
    depend on the job); `record`: every figure, for run.json's `resolved.measured`.

    `sample`: paths of the job's first images; `pending`: how many images this process is
    to label; `batch_size`: the one asked for, if any; `cores`: this process's share."""

    classifier: Classifier
    source: object
    sample: list[str]
    pending: int
    max_pixels: int
    cores: int
    batch_size: int | None = None
    shown: bool = True
    record: dict = field(default_factory=dict)
    batches: dict = field(default_factory=dict)  # each runtime's batch measurement, by name
    _speeds: dict = field(default_factory=dict)
    _decode: list = field(default_factory=list)

    def __post_init__(self):
        # first: every measurement below, and the run, with the heap as the run will have it
        self.record.update(machine=machine_name(self.device), heap=heap.keep_freed_memory())

    @property
    def device(self) -> torch.device:
        return self.classifier.device

    @property
    def cache(self):
        return cache_dir()

    @property
    def worth_measuring(self) -> bool:
        return self.pending >= min_images_to_measure()

    def too_few(self) -> str:
        return (f"{self.pending} images to label, fewer than the {min_images_to_measure()} "
                "that repay measuring")

    def step(self, what: str, shown: bool = True):
        return step(what, shown and self.shown)

    def speed(self, runtime: str, announce: bool = True) -> Speed:
        """The classifier's speed on `runtime` (which it runs now): at the batch size asked,
        else at the one it is fastest at here (measured once per machine; a job too small
        to repay measuring takes the second smallest candidate)."""
        if runtime not in self._speeds:
            self._speeds[runtime] = self._measure_speed(runtime, announce)
        return self._speeds[runtime]

    def _measure_speed(self, runtime: str, announce: bool) -> Speed:
        classifier, device = self.classifier, self.device
        if self.batch_size is not None:
            return Speed(classifier, self.batch_size)
        if not batch_known(classifier) and not self.worth_measuring:
            size = candidate_batches(device)[1]
            self.batches[runtime] = {"not_measured": self.too_few(), "chosen": size}
            return Speed(classifier, size)
        sizes = ", ".join(map(str, candidate_batches(device)))
        with self.step(f"measuring the fastest batch size of {classifier.spec.model} "
                       f"({str(classifier.dtype).removeprefix('torch.')}, {device.type}) "
                       f"among {sizes}: once per machine, then cached",
                       announce and not batch_known(classifier)):
            choice = measure_batch_size(classifier)
        self.batches[runtime] = choice.to_dict()
        return Speed(classifier, choice.batch_size, choice.rates.get(choice.batch_size), choice)

    def decode_rate(self) -> float | None:
        """Images/s one core decodes, on the job's first images (measured once)."""
        if not self._decode:
            rate = decode_rate(self.source, self.sample[:DECODE_SAMPLE],
                               self.classifier.spec.preprocess, self.max_pixels)
            self._decode.append(rate)
            self.record.update(decode_images_per_second_per_core=round(rate or 0, 1),
                               cores=self.cores)
        return self._decode[0]


def machine_name(device: torch.device) -> str:
    """The CPU model (and the cores this process may use), or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh
                         if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} x{usable_cores()}"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


@dataclass(frozen=True)
class BatchChoice:
    batch_size: int
    rates: dict[int, float]  # images/s of the model alone, by batch size
    cached: bool  # read from an earlier run's measurement
    first_call_seconds: float | None = None  # compiled, measured now: the first compile's

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "from_cache": self.cached,
                "images_per_second": {str(b): round(r, 1) for b, r in self.rates.items()}}


def measure_batch_size(classifier: Classifier, candidates: tuple[int, ...] | None = None,
                       seconds: float = MEASURE_SECONDS, compiled: bool = False) -> BatchChoice:
    """The batch size at which the model alone labels most images a second, here.

    `compiled` (after Classifier.compile): each size is a compile of its own, timed on its
    first batch, and the classifier is left padding to the best. Cached apart from the
    eager sizes, so a later run compiles the best one only.
    """
    candidates = candidates or candidate_batches(classifier.device)
    key = _batch_key(classifier, candidates, compiled)
    cached = cache.read(BATCHES).get(key)
    rates: dict[int, float] = {int(b): r for b, r in (cached or {}).items()}
    first_call = None
    for size in ([] if cached else candidates):
        if compiled:
            classifier.pad_batches_to(size)
        rate, first = timed_rate(classifier, size, seconds)
        if rate is None:  # the device has no memory for it: larger ones fit even less
            break
        rates[size] = rate
        first_call = first_call or first
    if rates and not cached:
        cache.keep(BATCHES, key, {str(b): r for b, r in rates.items()})
    best = max(rates, key=rates.get) if rates else candidates[0]
    if compiled:
        classifier.pad_batches_to(best)
    return BatchChoice(best, rates, cached=bool(cached),
                       first_call_seconds=round(first_call, 1) if compiled and first_call else None)


def candidate_batches(device: torch.device) -> tuple[int, ...]:
    return CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES


def around(batch_size: int, candidates: tuple[int, ...]) -> tuple[int, ...]:
    """The eager model's best batch and its neighbours among the candidates: where a
    compiled model's best is looked for, since each size it tries is a compile of its own."""
    if batch_size not in candidates:
        return (batch_size,)
    at = candidates.index(batch_size)
    return candidates[max(0, at - 1):at + 2]


def compiled_batch_known(classifier: Classifier, candidates: tuple[int, ...]) -> bool:
    return _batch_key(classifier, candidates, compiled=True) in cache.read(BATCHES)


def batch_known(classifier: Classifier) -> bool:
    """Whether this machine measured the eager model's batch sizes before (cached)."""
    return _batch_key(classifier, candidate_batches(classifier.device)) in cache.read(BATCHES)


def _batch_key(classifier: Classifier, candidates: tuple[int, ...], compiled: bool = False) -> str:
    return _measurement_key(classifier, ",".join(map(str, candidates)),
                            *(["compiled, frozen"] if compiled else []))


def _measurement_key(classifier: Classifier, *what: str) -> str:
    """Where a measurement of the model's speed is kept: what that speed depends on (the
    machine, model, weights, precision, input size, torch, the heap), then what was
    measured."""
    return "|".join([machine_name(classifier.device), classifier.spec.model,
                     classifier.spec.weights_id, str(classifier.dtype),
                     _input_size(classifier.spec.preprocess), torch.__version__, heap.state(),
                     # another runtime's speed is its own (torch eager's keys stay as they were)
                     *filter(None, [classifier.speed_key]), *what])


def model_rate(classifier: Classifier, batch_size: int, seconds: float) -> float | None:
    """Images/s of the model alone on synthetic uint8 batches; None if it does not fit."""
    return timed_rate(classifier, batch_size, seconds)[0]


def timed_rate(classifier: Classifier, batch_size: int,
               seconds: float) -> tuple[float | None, float]:
    """model_rate, and the seconds its first batch took (a compiled model's compile)."""
    images = synthetic_batch(classifier.spec.preprocess.size, batch_size)
    fits_before = classifier.fits
    started = time.perf_counter()
    try:
        # warm-up: allocator, oneDNN/cuDNN kernel choice, a compile. Halved, it did not
        # fit; the halving is not kept: it is the run's to find, at the size it uses.
        classifier.predict(images)
        if classifier.fits != fits_before:
            return None, 0.0
    finally:
        classifier.fits = fits_before
    first_call = time.perf_counter() - started
    for _ in range(WARM_UP_BATCHES - 1):
        classifier.predict(images)
    done, started = 0, time.perf_counter()
    while done < 2 * batch_size or time.perf_counter() - started < seconds:
        classifier.predict(images)
        done += batch_size
    return done / (time.perf_counter() - started), first_call


def _input_size(preprocess) -> str:
    height, width = preprocess.size
    return str(width) if height == width else f"{height}x{width}"  # square: as it always was


def synthetic_batch(size: tuple[int, int], batch_size: int) -> torch.Tensor:
    images = torch.randint(0, 256, (batch_size, 3, *size), dtype=torch.uint8)
    return images.contiguous(memory_format=torch.channels_last)  # the loader's layout


def decode_rate(source, paths: list[str], preprocess: Preprocess, max_pixels: int) -> float | None:
    """Images/s that one core decodes, on these files (None if none could be read)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's setting
    try:
        fetched = [data for data in source.fetch(paths, MAX_BYTES_PER_PIXEL * max_pixels)
                   if isinstance(data, bytes)]
        decoded, started = 0, time.perf_counter()
        for data in fetched:
            try:
                decode(data, preprocess, max_pixels)
                decoded += 1
            except (ImageError, *DECODE_ERRORS):
                pass
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    return decoded / elapsed if decoded and elapsed > 0 else None


def first_crops(source, paths: list[str], preprocess: Preprocess,
                max_pixels: int) -> list[torch.Tensor]:
    """The decodable images among `paths`, as the loader makes them (uint8 crops): what a
    runtime calibrates on (INT8)."""
    found = []
    for start in range(0, len(paths), 16):
        part = paths[start:start + 16]
        for data in source.fetch(part, MAX_BYTES_PER_PIXEL * max_pixels):
            if isinstance(data, BaseException):
                continue
            try:
                found.append(decode(data, preprocess, max_pixels).image)
            except (ImageError, *DECODE_ERRORS):
                continue
    return found


def workers_for(model_rate: float, decode_rate: float, cores: int, on_cuda: bool) -> int:
    """Decode workers that keep the model fed, from the two measured rates.

    On a GPU the model does not use the cores: enough workers to decode at its rate (and a
    fifth more, for slower files), within the cores. On a CPU the model's threads use every
    core, so each worker takes a core from it: the estimate of each choice is compared,
    decoding between batches in the main process (rates add as times) or w workers beside
    a model on the cores left (the slower of the two sides), and the best kept.
    """
    if on_cuda:
        return max(1, min(cores, math.ceil(1.2 * model_rate / decode_rate)))
    best, best_rate = 0, 1 / (1 / model_rate + 1 / decode_rate)
    for workers in range(1, cores):
        rate = min(model_rate * (cores - workers) / cores, workers * decode_rate)
        if rate > best_rate:
            best, best_rate = workers, rate
    return best


def compile_pays(pending: int, eager_rate: float, speedup: float = COMPILE_SPEEDUP,
                 compile_seconds: float = COMPILE_SECONDS_COLD) -> bool:
    """Whether compiling saves more time on the pending images than it takes."""
    if speedup <= 1 or not eager_rate:
        return False  # it gave nothing here: never worth its compile time
    saved = pending / eager_rate * (1 - 1 / speedup)
    return saved > compile_seconds


def use_inductor_cache(cores: int) -> None:
    """Compiled kernels kept in our cache directory: the next night's compile takes seconds.

    Inductor's compile workers are held to this process's cores (its default is one per
    core of the machine, in every torchrun rank). A TORCHINDUCTOR_CACHE_DIR or
    TORCHINDUCTOR_COMPILE_THREADS of the user's own is kept.
    """
    import torch._inductor.config as inductor
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Importing torchvision imports torch._dynamo, which sets the variable to torch's
    # default, /tmp/torchinductor_USER (emptied at a reboot): that value is not the user's.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        inductor.compile_threads = cores  # read from the environment at import: too late


def _compile_key(classifier: Classifier, batch_size: int) -> str:
    # "frozen" names how it is compiled: figures from compiles without frozen weights (which
    # gave no speedup on some machines) must not decide for these.
    return _measurement_key(classifier, str(batch_size), "frozen")


def compile_figures(classifier: Classifier, batch_size: int) -> dict:
    """What compiling cost and gave the last time on this machine, for a model whose eager
    best batch is `batch_size` (its kernels were then kept, so the next compile is the warm
    one), else the figures we measured elsewhere."""
    known = cache.read("compiles.json").get(_compile_key(classifier, batch_size))
    if known:
        return {**known, "from": "this machine"}
    return {"compile_seconds": COMPILE_SECONDS_COLD, "speedup": COMPILE_SPEEDUP,
            "from": "defaults (not yet measured here)"}


def measure_compile(classifier: Classifier, batch_size: int, eager_rate: float | None,
                    eager_batch: int | None = None) -> dict:
    """Compile now, on a synthetic batch (the run's first would pay the same), timing it,
    then the compiled model's rate; kept for the next run's decision (under the eager
    batch it was made at, `eager_batch`, by default the same)."""
    rate, compile_seconds = timed_rate(classifier, batch_size, MEASURE_SECONDS)
    return keep_compile_figures(classifier, eager_batch or batch_size, compile_seconds,
                                rate, eager_rate)


def keep_compile_figures(classifier: Classifier, eager_batch: int, compile_seconds: float,
                         compiled_rate: float | None, eager_rate: float | None) -> dict:
    """What this compile cost and gave against the eager model at its best batch, kept
    for the next run's decision."""
    figures = {"compile_seconds": round(compile_seconds, 1)}
    if compiled_rate and eager_rate:
        figures["speedup"] = round(compiled_rate / eager_rate, 2)
        cache.keep("compiles.json", _compile_key(classifier, eager_batch), figures)
    return figures
