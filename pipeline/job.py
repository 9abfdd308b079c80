"""A job, validated before the run directory is touched: source, model, settings, fingerprint."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version

import pyarrow as pa
import torch
import torchvision

import pipeline
from pipeline import formats, plan as planning, rundir, runtimes
from pipeline import settings as machine
from pipeline.backends import Backend, ModelSpec, backend_for, resolve_model
from pipeline.classifier import Classifier
from pipeline.config import DEFAULT_TOP_K, RunConfig
from pipeline.errors import UsageError, notice
from pipeline.launchers import Slice
from pipeline.rundir import RunDirectory, committed_shards
from pipeline.settings import Settings
from pipeline.sources import Source, listing, open_source
from pipeline.storage import Store
from pipeline.tuning import DECODE_SAMPLE
from pipeline.writer import check_kept_columns


@dataclass
class Job:
    """Everything a run needs, checked. What it lists (`items`: the source, or an
    incremental night's new and changed images) is planned under the run directory's lock;
    the settings are decided on the plan (`decide`), before the first image."""

    config: RunConfig
    part: Slice
    source: Source
    spec: ModelSpec
    classifier: Classifier
    items: Callable[[], Iterable[pa.Table]]
    crashed_in: str | None = None  # where the last run crashed (decode in a worker now)
    runtime_kept: str | None = None  # auto's runtime, kept from the run's start
    settings: Settings | None = None
    started: float = field(default_factory=time.perf_counter)  # when the command began
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(
        timespec="seconds"))

    def decide(self, store: Store) -> Settings:
        """The settings, measured and chosen on this plan's first images and this
        process's pending share (once), and given to the classifier."""
        if self.settings is None:
            config = self.config
            size = DECODE_SAMPLE
            if config.runtime in runtimes.RUNTIMES:  # e.g. INT8: calibrated on the first
                size = max(size, runtimes.get(config.runtime).sample_size(config.precision))
            sample, pending = _sample_and_pending(store, self.part, size)
            chosen = machine.resolve(config, self.part, self.classifier, self.source, sample,
                                     pending, ended_abruptly=self.crashed_in)
            if self.runtime_kept:
                chosen.measured["runtime_kept"] = (f"{self.runtime_kept}: the runtime this "
                                                   "run began with")
            machine.apply(self.classifier, chosen)
            self.settings = chosen
        return self.settings

    @property
    def backend(self) -> Backend:
        return backend_for(self.config.model)[0]

    def fingerprint(self) -> dict:
        """What determines the labels: a run directory is only resumed with the same one.

        The items are not in it: a plan, once frozen, is what every later process labels
        (a resume, a slice that starts later); what arrived since waits for the next run.
        """
        return {**self.spec.describe(), "top_k": self.config.top_k,
                "embeddings": self.config.embeddings, "source": self.source.describe()}

    def record(self) -> dict:
        """run.json beside the fingerprint: the configuration and what was decided from it."""
        return {
            "config": self.config.to_dict(),
            "resolved": {**(self.settings.to_dict() if self.settings else {}),
                         "preprocess": self.spec.preprocess.to_dict(),
                         "slices": self.part.count},
            # The model's library, and the decoders: they decide the pixels the model sees
            # (torchvision resizes them, whatever the backend).
            "backend": {"library": self.backend.library,
                        "version": version(self.backend.library)},
            "versions": {"label-images": pipeline.__version__, "torch": torch.__version__,
                         self.backend.library: version(self.backend.library),
                         "torchvision": torchvision.__version__, "pillow": version("pillow"),
                         "simplejpeg": version("simplejpeg"), "pi-heif": version("pi-heif")},
            "started_at": self.started_at,
        }


def prepare_run(config: RunConfig, engine, part: Slice = Slice(), versions: bool = False,
                started: float | None = None) -> Job:
    """The job of the process that holds the run directory (not an engine's worker, whose
    driver checked all this; the options its kinds declare are checked before it:
    kinds.check_options): its kept columns, the table it will write (its catalog answers, it is ours), whether the last run there crashed."""
    check_kept_columns(config.keep_columns)
    job = prepare(config, part, versions, started)
    store = Store(job.config.out)
    if part.merges:  # before the listing and the labelling, not after
        formats.of(job.config).check(store)
    job.crashed_in = _ended_abruptly(job.config, store, part)
    return job


def prepare(config: RunConfig, part: Slice = Slice(), versions: bool = False,
            started: float | None = None) -> Job:
    """Validate the whole configuration: source, model, weights, device. Writes nothing,
    lists nothing: the listing streams into the plan under the run directory's lock.

    `versions`: list the images' sizes and change stamps too (incremental nights); a
    source whose listing brings them records them in every run (Source.lists_versions).
    """
    if config.embeddings and not formats.get(config.format).embeddings:
        carriers = [name for name, f in formats.FORMATS.items() if f.embeddings]
        raise UsageError(f"--embeddings cannot be written to {config.format}: use --format "
                         f"{' or '.join(carriers)}")
    source = open_source(config.source_spec())  # what kind it is: no listing yet
    # The model, its weights and the device before the listing: a typo in --model on a
    # bucket of millions is said at once, not after the whole listing.
    spec = resolve_model(config.model, config.weights, config.labels, config.resize, config.crop,
                         config.input_mode, config.options)
    if config.top_k is None:  # only a --top-k asked for is held to the model's classes
        config = dataclasses.replace(config, top_k=min(DEFAULT_TOP_K, spec.num_classes))
    device, dtype = machine.device_and_precision(config, part, spec.precision)
    classifier = Classifier(spec, device, dtype, config.top_k, embeddings=config.embeddings)
    store = Store(config.out)
    config, kept = _runtime_of_the_run(config, store, device)
    if config.runtime in runtimes.RUNTIMES:  # its extra, its device: before the listing
        runtimes.get(config.runtime).check(device, config.precision)
    return Job(config, part, source, spec, classifier,
               items=lambda: listing(source, versions or source.lists_versions),
               runtime_kept=kept,
               started=time.perf_counter() if started is None else started)


def _runtime_of_the_run(config: RunConfig, store: Store,
                        device: torch.device) -> tuple[RunConfig, str | None]:
    """auto, in a run directory whose run chose already (a resume, a slice starting later,
    an engine's actor): that runtime, so that one table is labelled by one runtime (they
    agree within a tolerance, not bit for bit), where it chose for the same kind of device.
    A night, or --overwrite, chooses afresh."""
    if config.runtime != "auto" or config.overwrite or config.incremental:
        return config, None
    try:
        resolved = rundir.recorded(store).resolved
    except (OSError, UsageError):  # no run directory to read: said where it is opened
        return config, None
    chosen, where = resolved.get("runtime"), str(resolved.get("device")).split(":")[0]
    if chosen not in runtimes.RUNTIMES or where != device.type:
        return config, None  # chosen for another kind of device (a CPU driver, GPU actors)
    try:
        runtimes.get(chosen).check(device)
    except UsageError:  # not installed on this machine: auto among what is
        return config, None
    return dataclasses.replace(config, runtime=chosen), chosen


def _ended_abruptly(config: RunConfig, store: Store, part: Slice) -> str | None:
    """Where the last run died holding the run directory, if a fatal signal (a file that
    crashes the decoder) took it down and this run is to go on from it: settings then decodes
    in a worker. A kill is said as what it is, and changes nothing (a finished table is not
    relabelled; an incremental night always labels)."""
    how = rundir.ended_abruptly(store, part)
    if how is None:
        return None
    finished = RunDirectory(config.out, part).is_finished(formats.of(config), part.whole)
    if not (config.overwrite or config.incremental or not finished):
        return None
    if how == "killed":
        if not config.overwrite:
            notice(f"the last run in {store.url()} did not finish (it was stopped without "
                   "warning, e.g. killed or out of memory); resuming it")
        return None
    return store.url()


def _sample_and_pending(store: Store, part: Slice, size: int) -> tuple[list[str], int]:
    """The plan's first images, to measure decoding on, and how many this process labels
    (what is left of its share)."""
    plan = planning.load(store)
    done = committed_shards(store)
    pending = plan.items_in([s for s in range(plan.num_shards)
                             if part.owns(s) and s not in done])
    first = [plan.read_shard(s, ["path"])["path"] for s in range(min(
        plan.num_shards, -(-size // plan.shard_size)))]
    return [path for shard in first for path in shard.to_pylist()][:size], pending
