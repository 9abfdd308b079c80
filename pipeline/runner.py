"""The run loop: plan -> load -> predict -> write -> commit -> merge, with timings and progress."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version

import numpy as np
import pyarrow as pa
import torch
import torchvision
from tqdm import tqdm

import pipeline
from pipeline import plan as planning
from pipeline import quarantine, slices
from pipeline.config import RunConfig
from pipeline.errors import Interrupted, RunError, UsageError, notice
from pipeline.loader import (PREFETCH_BATCHES, SHARED_MEMORY, Batch, LoaderSize, PendingItems,
                             PlanItems, fit_shared_memory, free_shared_memory, make_loader,
                             more_shared_memory, size_for_shared_memory)
from pipeline.model import (Classifier, ModelSpec, default_batch_size, default_workers,
                            resolve_device, resolve_model, resolve_precision)
from pipeline.rundir import SUMMARY_FILE, RunDirectory
from pipeline.slices import Slice
from pipeline.sources import SourceSpec, read_source
from pipeline.storage import Store
from pipeline.writer import (ShardResult, count_rows, merge_parts, output_schema, part_table,
                             write_json, write_part)

# Part files waiting for the writer thread at most; beyond that the loop waits (bounded memory).
MAX_PENDING_PARTS = 2


@dataclass
class RunSummary:
    output: str  # path or URL of the final table
    run_dir: str = ""
    items: int = 0
    ok: int = 0
    errors: int = 0
    labelled_now: int = 0  # images labelled by this invocation (resume skips the rest)
    seconds: float = 0.0
    loop_seconds: float = 0.0  # the labelling loop alone: no start-up, no merge
    load_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    resumed: bool = False
    already_complete: bool = False
    slice_done: str = ""  # set when this process labelled one slice and did not merge
    missing: list[int] = field(default_factory=list)  # shards other slices still owe
    changes: dict = field(default_factory=dict)  # incremental runs: new/changed/unchanged/removed
    device: str = ""
    precision: str = ""

    @property
    def images_per_second(self) -> float:
        """Throughput of the labelling loop (start-up and merge are in `seconds`)."""
        return self.labelled_now / self.loop_seconds if self.loop_seconds > 0 else 0.0

    def line(self) -> str:
        changes = (", ".join(f"{v} {k}" for k, v in self.changes.items()) + "; "
                   if self.changes else "")
        if self.already_complete:
            return f"nothing to do: {changes}{self.output} is complete ({self.items} rows)"
        if not self.labelled_now:  # a merge
            return (f"{self.items} images: {self.ok} ok, {self.errors} errors -> "
                    f"{self.output}")
        if self.slice_done:
            waiting = (f"{len(self.missing)} shards still to come from other slices, then run "
                       f"`label-images merge {self.run_dir}`" if self.missing else
                       f"all shards are committed: run `label-images merge {self.run_dir}`")
            return (f"{self.slice_done} done: labelled {self.labelled_now} at "
                    f"{self.images_per_second:.1f} images/s; {waiting}")
        return (f"{self.items} images: {changes}{self.ok} ok, {self.errors} errors; labelled "
                f"{self.labelled_now} at {self.images_per_second:.1f} images/s; wall time "
                f"{self.seconds:.1f} s -> {self.output}")

    def to_dict(self) -> dict:
        return {
            "output": self.output, "items": self.items, "ok": self.ok,
            "errors": self.errors, "labelled_now": self.labelled_now, "resumed": self.resumed,
            "wall_seconds": round(self.seconds, 3),
            "loop_seconds": round(self.loop_seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "load_seconds": round(self.load_seconds, 3),
            "compute_seconds": round(self.compute_seconds, 3),
            "write_seconds": round(self.write_seconds, 3),
            "device": self.device, "precision": self.precision,
            **({"changes": self.changes} if self.changes else {}),
        }


def source_spec(config: RunConfig) -> SourceSpec:
    return SourceSpec(location=config.source, path_column=config.path_column,
                      id_column=config.id_column, root=config.root,
                      keep_columns=config.keep_columns, allow_duplicates=config.allow_duplicates)


def fingerprint(config: RunConfig, spec: ModelSpec, source: SourceSpec,
                items: pa.Table | None) -> dict:
    """What determines the labels; a run directory is only resumed with the same one.

    Without items, the part that must stay fixed across nights of an incremental table."""
    described = source.describe()
    if items is not None:
        described.update(items=len(items), items_sha256=planning.items_digest(items))
    return {**spec.describe(), "top_k": config.top_k, "embeddings": config.embeddings,
            "source": described}


class PartCommitter:
    """Writes and commits part files on a thread beside the compute loop, a bounded few at once."""

    def __init__(self, store: Store, plan: planning.Plan, schema: pa.Schema,
                 categories: list[str]):
        self.store, self.plan, self.schema, self.categories = store, plan, schema, categories
        self.seconds = 0.0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="part-writer")
        self._pending: deque[Future] = deque()

    def submit(self, shard: int, result: ShardResult) -> None:
        while len(self._pending) >= MAX_PENDING_PARTS:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._commit, shard, result))

    def _commit(self, shard: int, result: ShardResult) -> None:
        started = time.perf_counter()
        name = planning.part_name(shard)
        items = self.plan.read_shard(shard)
        try:
            write_part(self.store, name, part_table(items, result, self.categories, self.schema))
        except OSError as exc:
            raise os_failure(exc, self.store.url(name)) from None
        self.seconds += time.perf_counter() - started

    def drain(self) -> None:
        """Wait for every submitted part; re-raises the first failure."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


class ShardBuffer:
    """The results of one shard as its batches arrive; complete when every item is in."""

    def __init__(self, start: int, end: int, top_k: int, embedding_size: int | None):
        self.start = start
        self.result = ShardResult.empty(end - start, top_k, embedding_size)
        self.remaining = end - start


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(signum)


def _release_leaked_logging_lock() -> None:
    """Let go of logging's module lock if an exception from a signal handler left it held.

    Python 3.11 and 3.12's logging take that lock in one call and enter the try that releases
    it only after: an exception raised by a signal handler in between (Ctrl-C, our SIGTERM,
    torch's SIGCHLD handler reporting a dead loader worker) leaves this thread holding it
    (measured: 865 of 2,000 such exceptions landing in logging code did), and the next
    thread to log, s3fs's I/O thread say, waits for it forever. Only call this where this
    thread cannot be inside logging.
    """
    lock = getattr(logging, "_lock", None)
    owned = getattr(lock, "_is_owned", None)
    while owned is not None and owned():
        lock.release()


@dataclass
class Job:
    """A validated run, ready to go: everything checked before the run directory is touched."""

    config: RunConfig
    source: SourceSpec
    items: pa.Table
    classifier: Classifier
    batch_size: int
    workers: int
    record: dict
    started: float
    prefetch: int = PREFETCH_BATCHES  # batches each worker is asked for ahead


def prepare(config: RunConfig, part: Slice = Slice(), versions: bool = False) -> Job:
    """Validate the whole configuration: source, model, weights, device. Writes nothing."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    if part.distributed and device.type == "cuda" and config.device in ("auto", "cuda"):
        device = torch.device("cuda", part.local_rank)  # one GPU per torchrun process
    dtype = resolve_precision(config.precision, device)
    source = source_spec(config)
    items = read_source(source, versions=versions)
    spec = resolve_model(config.model, config.weights, config.labels, config.resize, config.crop)
    if config.embeddings and config.format == "csv":
        raise UsageError("--embeddings are written to Parquet only: use --format parquet")
    classifier = Classifier(spec, device, dtype, config.top_k, compile=config.compile,
                            embeddings=config.embeddings)
    wanted = LoaderSize(
        workers=config.workers if config.workers is not None else default_workers(device),
        batch_size=config.batch_size or default_batch_size(device), prefetch=PREFETCH_BATCHES)
    size = size_for_shared_memory(
        wanted, spec.preprocess.crop_bytes, fixed_workers=config.workers is not None,
        fixed_batch=config.batch_size is not None,
        # torchrun's processes on one node share it
        sharing=int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if part.distributed else 1)
    batch_size, workers = size.batch_size, size.workers
    record = {
        "config": config.to_dict(),
        "resolved": {"device": str(device), "precision": str(dtype).removeprefix("torch."),
                     "batch_size": batch_size, "workers": workers,
                     "preprocess": spec.preprocess.to_dict(), "slices": part.count},
        # The decoders too: they decide the pixels the model sees.
        "versions": {"label-images": pipeline.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "pillow": version("pillow"),
                     "simplejpeg": version("simplejpeg"), "pi-heif": version("pi-heif")},
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return Job(config, source, items, classifier, batch_size, workers, record, started,
               size.prefetch)


def os_failure(exc: OSError, where: str | None = None) -> RunError:
    """Disk full, permissions, a vanished mount: one line, and how to carry on."""
    where = where or exc.filename
    prefix = f"cannot write {where}: " if where else ""
    return RunError(f"{prefix}{exc.strerror or exc}; the shards committed so far are intact: "
                    "fix that and run the same command to resume")


def run(config: RunConfig, *, progress: bool | None = None) -> RunSummary:
    """Label every item of config.source into config.out, resuming what a previous run began.

    Under torchrun every rank labels its share and rank 0 assembles the table; as one slice
    of an array job it labels its slice and leaves the assembly to `label-images merge`.
    """
    if config.incremental:
        from pipeline import incremental

        return incremental.run(config, progress=progress)
    part = slices.from_environment(config.num_shards, config.shard_index)
    if config.overwrite and not part.whole and not part.distributed:
        raise UsageError("--overwrite would let each slice wipe the others' work: clear the "
                         "run directory once before starting the array job instead")
    job = prepare(config, part)
    group = slices.ProcessGroup(part, backend="gloo") if part.distributed else None
    try:
        with RunDirectory(config.out, part) as run_dir:
            return _run_in(run_dir, job, part, group, progress)
    except OSError as exc:  # disk full, permissions, a vanished mount: not a bug of ours
        raise os_failure(exc) from None
    finally:
        if group is not None:
            group.close()


def _open_plan(run_dir: RunDirectory, job: Job, part: Slice, group) -> tuple[bool, planning.Plan]:
    """Check or record the job in the run directory and freeze the plan (rank 0 only)."""
    config = job.config
    if group is None or part.index == 0:
        try:
            fingerprint_now = fingerprint(config, job.classifier.spec, job.source, job.items)
            resumed = run_dir.prepare(fingerprint_now, job.record, config.overwrite)
            if not run_dir.store.exists(planning.PLAN_FILE):
                planning.freeze(job.items, run_dir.store, config.shard_size)
            verdict = None
        except UsageError as exc:
            verdict = str(exc)
        if group is not None:
            group.share((verdict, resumed if verdict is None else False))
    else:  # the other ranks wait for rank 0's verdict, then read what it wrote
        verdict, resumed = group.share(None)
    if verdict is not None:
        raise UsageError(verdict)
    return resumed, planning.load(run_dir.store)


def _run_in(run_dir: RunDirectory, job: Job, part: Slice, group,
            progress: bool | None) -> RunSummary:
    config, spec = job.config, job.classifier.spec
    store = run_dir.store
    output = run_dir.output_name(config.format)
    summary = RunSummary(output=store.url(output), run_dir=store.url(),
                         device=job.record["resolved"]["device"],
                         precision=job.record["resolved"]["precision"])

    def finished() -> bool:
        return store.exists(output) or (store.exists(run_dir.output_name("parquet"))
                                        and part.whole)

    if (run_dir.ended_abruptly and job.workers == 0 and config.workers is None
            and (config.overwrite or not finished())):
        # Killed, or a file crashed the decoder in this very process: decode in a worker this
        # time, so that such a file is found and becomes an error row instead of ending the
        # run again at the same place. (Killed after its final rename: nothing to decode.)
        worker = fit_shared_memory(LoaderSize(1, job.batch_size, PREFETCH_BATCHES),
                                   spec.preprocess.crop_bytes, free_shared_memory(),
                                   fixed_workers=True, fixed_batch=True)
        if worker is not None:
            job.workers = job.record["resolved"]["workers"] = 1
            job.prefetch = worker.prefetch
            notice(f"the last run in {store.url()} ended abruptly: decoding in a worker "
                   "process this time, so that a file that crashes the decoder cannot end it "
                   "again")
    summary.resumed, plan = _open_plan(run_dir, job, part, group)
    if finished():
        return _already_complete(run_dir, job, summary)
    extra = job.items.select(list(config.keep_columns)).schema
    job.items = None  # from here on, memory is bounded by shards, not by the dataset
    schema = output_schema(config.top_k, extra, {
        "label_images.model": spec.model, "label_images.weights": spec.weights_id},
        embedding_size=job.classifier.embedding_size)
    quarantined = quarantine.load(store)
    show = (not config.quiet) if progress is None else progress
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    loop_started = time.perf_counter()
    try:
        while True:
            committed = planning.committed_shards(store)
            owned = [s for s in range(plan.num_shards) if part.owns(s)]
            pending = [s for s in owned if s not in committed]
            total = _items_in(plan, owned)
            try:
                bar = progress_bar(total, total - _items_in(plan, pending), show, part)
                _label_pending(plan, pending, job, schema, store, summary, bar, quarantined)
                break
            except _WorkerDied as died:
                _quarantine_crashers(died, plan, job, store, quarantined)
        summary.loop_seconds = time.perf_counter() - loop_started
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        done = len(planning.committed_shards(store))
        raise Interrupted(signum, done, plan.num_shards) from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if group is not None:
        group.barrier()  # every rank's shards are committed
        if part.index != 0:
            summary.slice_done = part.describe()
            return summary
    elif not part.whole:
        summary.slice_done = part.describe()
        summary.missing = _missing(store, plan)
        return summary
    missing = _missing(store, plan)
    if missing:  # a bug of ours or a part removed under the run: never assemble without it
        raise RunError(f"shards {missing[:10]} are not committed; run the same command again")
    _assemble(store, plan, output, config.format, summary)
    summary.seconds = time.perf_counter() - job.started
    write_json(store, SUMMARY_FILE, summary.to_dict())
    return summary


def _already_complete(run_dir: RunDirectory, job: Job, summary: RunSummary) -> RunSummary:
    store, output = run_dir.store, run_dir.output_name(job.config.format)
    if not store.exists(output):
        # A finished run asked for in another format: convert, do not relabel.
        counts = merge_parts(store, [run_dir.output_name("parquet")], output, job.config.format)
        summary.items, summary.ok, summary.errors = counts.rows, counts.ok, counts.errors
        return summary
    # Killed after the final rename but before the parts were removed: finish that.
    store.remove(planning.PARTS_DIR)
    summary.already_complete = True
    summary.items = job.items.num_rows
    if not store.exists(SUMMARY_FILE):
        counts = count_rows(store, output)
        summary.items, summary.ok, summary.errors = counts.rows, counts.ok, counts.errors
        write_json(store, SUMMARY_FILE, summary.to_dict())
    return summary


def _assemble(store: Store, plan: planning.Plan, output: str, fmt: str,
              summary: RunSummary) -> None:
    started = time.perf_counter()
    counts = _merge(store, plan, output, fmt)
    summary.write_seconds += time.perf_counter() - started
    summary.items, summary.ok, summary.errors = counts.rows, counts.ok, counts.errors


def _missing(store: Store, plan: planning.Plan) -> list[int]:
    committed = planning.committed_shards(store)
    return [s for s in range(plan.num_shards) if s not in committed]


def merge(out: str, fmt: str | None = None) -> RunSummary:
    """`label-images merge`: assemble the table once every slice has committed its shards."""
    try:
        with RunDirectory(out) as run_dir:
            store = run_dir.store
            record = run_dir.read_run()
            if record is None or not store.exists(planning.PLAN_FILE):
                raise UsageError(f"{out} holds no label-images run (no run.json or plan)")
            fmt = fmt or record["config"]["format"]
            plan = planning.load(store)
            output = run_dir.output_name(fmt)
            summary = RunSummary(output=store.url(output), run_dir=store.url(), resumed=True)
            if store.exists(output):
                summary.already_complete = True
                summary.items = plan.num_items
                return summary
            missing = _missing(store, plan)
            if missing:
                slice_count = record.get("resolved", {}).get("slices", 1)
                owners = sorted({s % slice_count for s in missing})
                raise RunError(
                    f"{len(missing)} of {plan.num_shards} shards are not committed yet "
                    f"({slices.shard_ranges(missing)[:300]}), owned by slice(s) "
                    f"{', '.join(map(str, owners))} of {slice_count}; run those, then merge again")
            started = time.perf_counter()
            _assemble(store, plan, output, fmt, summary)
            summary.seconds = time.perf_counter() - started
            write_json(store, SUMMARY_FILE, summary.to_dict())
            return summary
    except OSError as exc:
        raise os_failure(exc) from None


class _WorkerDied(Exception):
    """A loader worker died; `in_flight` holds the items it and the others may have been on."""

    def __init__(self, message: str, in_flight: list[int]):
        super().__init__(message)
        self.in_flight = in_flight


def _quarantine_crashers(died: _WorkerDied, plan: planning.Plan, job: Job, store: Store,
                         quarantined: dict[int, str]) -> None:
    """Find the files a dead worker was on that kill a decoder; record them, or give up."""
    items = PlanItems(plan, job.classifier.spec.preprocess, job.config.max_pixels, quarantined)
    found = quarantine.find_crashers(items, died.in_flight)
    if not found:  # killed from outside (the OOM killer, an operator): not a file's doing
        raise RunError(f"{died}; committed shards are intact: run the same command to "
                       "resume") from None
    entries = quarantine.record(store, plan, found)
    quarantined.update(found)
    notice(f"{len(found)} file(s) crashed the decoder, first {entries[0]['key']}: they are "
           f"error rows (listed in {store.url(quarantine.QUARANTINE_FILE)}); carrying on")


# On a terminal the bar redraws in place. In a log (cron, a scheduler's capture) each redraw
# would stay, up to ten a second: tens of MB a night. There it is one plain line a minute
# (none for a job shorter than that: its summary line says it all).
LOG_PROGRESS_SECONDS = 60


def progress_bar(total: int, done: int, show: bool, part: Slice) -> tqdm:
    """Items of this slice (all of them, unless an array job or torchrun split the work)."""
    which = None if part.whole else part.describe()
    if sys.stderr.isatty():
        return tqdm(total=total, initial=done, unit="img", disable=not show, file=sys.stderr,
                    dynamic_ncols=True, smoothing=0.1, desc=which)
    prefix = f"label-images: {which}: " if which else "label-images: "
    return tqdm(total=total, initial=done, unit="img", disable=not show,
                file=_LogLines(sys.stderr), mininterval=LOG_PROGRESS_SECONDS,
                maxinterval=LOG_PROGRESS_SECONDS, delay=LOG_PROGRESS_SECONDS, smoothing=0,
                bar_format=prefix + "{n} of {total} images ({percentage:.0f}%), {rate_fmt}, "
                                    "{elapsed} elapsed, about {remaining} to go")


def _items_in(plan: planning.Plan, shards: list[int]) -> int:
    return sum(end - start for start, end in map(plan.shard_bounds, shards))


class _LogLines:
    """A stream for tqdm that keeps each of its redraws as a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.strip()  # tqdm's carriage return, padding and final newline
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _label_pending(plan: planning.Plan, pending: list[int], job: Job, schema: pa.Schema,
                   store: Store, summary: RunSummary, bar: tqdm,
                   quarantined: dict[int, str]) -> None:
    config, classifier = job.config, job.classifier
    if not pending:
        bar.close()
        return
    loader = make_loader(plan, pending, classifier.spec.preprocess, batch_size=job.batch_size,
                         workers=job.workers, max_pixels=config.max_pixels,
                         pin_memory=classifier.on_cuda, quarantined=quarantined,
                         prefetch=job.prefetch)
    batches = iter(loader)  # starts the workers before any thread of ours exists (fork-safe)
    committer = PartCommitter(store, plan, schema, list(classifier.spec.categories))
    buffers: dict[int, ShardBuffer] = {}
    labelled_before = summary.labelled_now  # what came out of this loader is the difference
    try:
        try:
            while True:
                waited = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                computing = time.perf_counter()
                summary.load_seconds += computing - waited
                prediction = classifier.predict(batch.images) if batch.decoded else None
                summary.compute_seconds += time.perf_counter() - computing
                for shard, buffer in _fill(batch, prediction, plan, buffers, config.top_k,
                                           classifier.embedding_size):
                    committer.submit(shard, buffer.result)
                summary.labelled_now += len(batch.indices)
                bar.update(len(batch.indices))
        finally:
            _release_leaked_logging_lock()  # before waiting on the writer thread, which may log
            bar.close()
            try:
                _stop_workers(batches)  # (and may report a dead one)
                del batches, loader
            finally:
                committer.drain()  # whatever happened, finished shards get committed
                summary.write_seconds += committer.seconds
    except (RuntimeError, ConnectionError, EOFError) as exc:
        if _out_of_shared_memory(exc):
            # Something else filled it since the start: not a file's fault, nothing to probe.
            held = LoaderSize(job.workers, job.batch_size, job.prefetch).shared_bytes(
                classifier.spec.preprocess.crop_bytes)
            raise RunError(f"the loader ran out of shared memory in {SHARED_MEMORY}; the "
                           f"shards committed so far are intact: {more_shared_memory(held)}, "
                           "or lower --workers or --batch-size, and run the same command to "
                           "resume") from None
        if not _worker_died(exc):
            raise
        # Every worker has at most job.prefetch batches asked of it beyond those received.
        window = (job.prefetch * job.workers + 1) * job.batch_size
        received = summary.labelled_now - labelled_before
        in_flight = list(itertools.islice(PendingItems(plan, pending), received,
                                          received + window))
        raise _WorkerDied(f"a loader worker died ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})", in_flight) from None
    if buffers:
        raise RuntimeError(f"shards {sorted(buffers)} did not receive all their items")


def _stop_workers(batches) -> None:
    """Stop the loader's workers now, not when the last reference to the iterator goes.

    After a worker dies, the exception's traceback keeps the iterator alive (checked), and
    with it the surviving workers and torch's record of them for its SIGCHLD handler, while
    the decoder probe forks and the next loader starts. torch's own __del__ calls this.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # none without workers
    if shutdown is not None:
        shutdown()


def _out_of_shared_memory(exc: BaseException) -> bool:
    # torch's words: a worker's allocation refused, or a worker killed by SIGBUS touching
    # shared memory that tmpfs could not back.
    text = str(exc)
    return (isinstance(exc, RuntimeError) and "shared memory" in text
            and ("No space left" in text or "Bus error" in text))


def _worker_died(exc: BaseException) -> bool:
    """torch reports a dead worker from its SIGCHLD handler wherever the loop was, or the
    pipe to it breaks mid-batch first; a worker that raised is reported differently."""
    if isinstance(exc, RuntimeError):
        return "DataLoader worker (pid" in str(exc)
    return True  # ConnectionError/EOFError: only the worker pipes are read in this loop


def _fill(batch: Batch, prediction, plan, buffers: dict[int, ShardBuffer], top_k: int,
          embedding_size: int | None):
    """Put a batch's rows into their shards' buffers; yield the shards that became complete.

    A batch spans one shard, sometimes two: the rows are copied per shard, not per image.
    """
    indices = np.asarray(batch.indices)
    decoded = np.zeros(len(indices), bool)
    decoded[batch.decoded] = True
    rank = np.cumsum(decoded) - 1  # a decoded position's row in the prediction
    shards = indices // plan.shard_size
    for shard in np.unique(shards).tolist():
        buffer = buffers.get(shard)
        if buffer is None:
            buffer = buffers[shard] = ShardBuffer(*plan.shard_bounds(shard), top_k,
                                                  embedding_size)
        result, here = buffer.result, shards == shard
        good = here & decoded
        if good.any():
            rows, found = indices[good] - buffer.start, rank[good]
            result.ok[rows] = True
            result.class_ids[rows] = prediction.class_ids[found]
            result.scores[rows] = prediction.scores[found]
            if prediction.embeddings is not None:
                result.embeddings[rows] = prediction.embeddings[found]
            result.width[rows] = np.asarray(batch.widths)[good]
            result.height[rows] = np.asarray(batch.heights)[good]
        for pos in np.nonzero(here & ~decoded)[0].tolist():
            result.errors[batch.indices[pos] - buffer.start] = batch.errors[pos]
        buffer.remaining -= int(here.sum())
        if buffer.remaining == 0:
            yield shard, buffers.pop(shard)


def _merge(store: Store, plan: planning.Plan, output: str, fmt: str):
    """The table from every shard's part; callers have checked that all are committed."""
    parts = [planning.part_name(s) for s in range(plan.num_shards)]
    sizes = [end - start for start, end in map(plan.shard_bounds, range(plan.num_shards))]
    counts = merge_parts(store, parts, output, fmt, expected_rows=sizes)
    store.remove(planning.PARTS_DIR)  # only once the whole table is committed
    return counts
