"""The run loop: plan -> load -> predict -> write -> commit -> merge, with timings and progress."""

from __future__ import annotations

import shutil
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import torch
import torchvision
from tqdm import tqdm

import pipeline
from pipeline import plan as planning
from pipeline.config import RunConfig
from pipeline.errors import Interrupted, RunError
from pipeline.loader import Batch, make_loader
from pipeline.model import (Classifier, ModelSpec, default_batch_size, default_workers,
                            resolve_device, resolve_model, resolve_precision)
from pipeline.rundir import SUMMARY_FILE, RunDirectory
from pipeline.sources import SourceSpec, read_source
from pipeline.writer import (ShardResult, count_rows, merge_parts, output_schema, part_table,
                             write_json, write_part)

# Part files waiting for the writer thread at most; beyond that the loop waits (bounded memory).
MAX_PENDING_PARTS = 2


@dataclass
class RunSummary:
    output: Path
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
    device: str = ""
    precision: str = ""
    timings: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        """Throughput of the labelling loop (start-up and merge are in `seconds`)."""
        return self.labelled_now / self.loop_seconds if self.loop_seconds > 0 else 0.0

    loop_images_per_second = images_per_second

    def line(self) -> str:
        if self.already_complete:
            return f"nothing to do: {self.output} is complete ({self.items} rows)"
        return (f"{self.items} images: {self.ok} ok, {self.errors} errors; labelled "
                f"{self.labelled_now} at {self.images_per_second:.1f} images/s; wall time "
                f"{self.seconds:.1f} s -> {self.output}")

    def to_dict(self) -> dict:
        return {
            "output": str(self.output), "items": self.items, "ok": self.ok,
            "errors": self.errors, "labelled_now": self.labelled_now, "resumed": self.resumed,
            "wall_seconds": round(self.seconds, 3),
            "loop_seconds": round(self.loop_seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "load_seconds": round(self.load_seconds, 3),
            "compute_seconds": round(self.compute_seconds, 3),
            "write_seconds": round(self.write_seconds, 3),
            "device": self.device, "precision": self.precision,
        }


def source_spec(config: RunConfig) -> SourceSpec:
    return SourceSpec(location=config.source, path_column=config.path_column,
                      id_column=config.id_column, root=config.root,
                      keep_columns=config.keep_columns, allow_duplicates=config.allow_duplicates)


def fingerprint(config: RunConfig, spec: ModelSpec, source: SourceSpec, items: pa.Table) -> dict:
    """What determines the labels; a run directory is only resumed with the same one."""
    return {
        **spec.describe(),
        "top_k": config.top_k,
        "source": {**source.describe(), "items": len(items),
                   "items_sha256": planning.items_digest(items)},
    }


class PartCommitter:
    """Writes and commits part files on a thread beside the compute loop, a bounded few at once."""

    def __init__(self, run_dir: Path, plan: planning.Plan, schema: pa.Schema,
                 categories: list[str]):
        self.run_dir, self.plan, self.schema, self.categories = run_dir, plan, schema, categories
        self.seconds = 0.0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="part-writer")
        self._pending: deque[Future] = deque()

    def submit(self, shard: int, result: ShardResult) -> None:
        while len(self._pending) >= MAX_PENDING_PARTS:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._commit, shard, result))

    def _commit(self, shard: int, result: ShardResult) -> None:
        started = time.perf_counter()
        path = planning.part_path(self.run_dir, shard)
        items = self.plan.read_shard(shard)
        try:
            write_part(path, part_table(items, result, self.categories, self.schema))
        except OSError as exc:
            raise RunError(f"cannot write {path}: {exc.strerror or exc}; the shards committed "
                           "so far are intact: fix that and run the same command to resume"
                           ) from None
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

    def __init__(self, start: int, end: int, top_k: int):
        self.start = start
        self.result = ShardResult.empty(end - start, top_k)
        self.remaining = end - start


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(signum)


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
    started: float = field(default_factory=time.perf_counter)


def prepare(config: RunConfig) -> Job:
    """Validate the whole configuration: source, model, weights, device. Writes nothing."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    source = source_spec(config)
    items = read_source(source)
    spec = resolve_model(config.model, config.weights, config.labels, config.resize, config.crop)
    classifier = Classifier(spec, device, dtype, config.top_k, compile=config.compile)
    batch_size = config.batch_size or default_batch_size(device)
    workers = config.workers if config.workers is not None else default_workers(device)
    record = {
        "config": config.to_dict(),
        "resolved": {"device": str(device), "precision": str(dtype).removeprefix("torch."),
                     "batch_size": batch_size, "workers": workers,
                     "preprocess": spec.preprocess.to_dict()},
        "versions": {"label-images": pipeline.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__},
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return Job(config, source, items, classifier, batch_size, workers, record, started)


def run(config: RunConfig, *, progress: bool | None = None) -> RunSummary:
    """Label every item of config.source into config.out, resuming what a previous run began."""
    job = prepare(config)
    try:
        with RunDirectory(config.out) as run_dir:
            summary = _run_in(run_dir, job, progress)
    except OSError as exc:  # disk full, permissions, a vanished mount: not a bug of ours
        where = f"{exc.filename}: " if exc.filename else ""
        raise RunError(f"{where}{exc.strerror or exc}; the shards committed so far are "
                       "intact: fix that and run the same command to resume") from None
    return summary


def _run_in(run_dir: RunDirectory, job: Job, progress: bool | None) -> RunSummary:
    config, spec = job.config, job.classifier.spec
    fingerprint_now = fingerprint(config, spec, job.source, job.items)
    resumed = run_dir.prepare(fingerprint_now, job.record, config.overwrite)
    output = run_dir.output_path(config.format)
    summary = RunSummary(output=output, resumed=resumed, device=job.record["resolved"]["device"],
                         precision=job.record["resolved"]["precision"])
    finished = run_dir.output_path("parquet")
    if output.exists():
        # Killed after the final rename but before the parts were removed: finish that.
        shutil.rmtree(run_dir.path / planning.PARTS_DIR, ignore_errors=True)
        summary.already_complete = True
        summary.items = job.items.num_rows
        if not (run_dir.path / SUMMARY_FILE).exists():
            counts = count_rows(output)
            summary.items, summary.ok, summary.errors = counts.rows, counts.ok, counts.errors
            write_json(run_dir.path / SUMMARY_FILE, summary.to_dict())
        return summary
    if finished.exists():
        # A finished run asked for in another format: convert, do not relabel.
        counts = merge_parts([finished], output, config.format)
        summary.items, summary.ok, summary.errors = counts.rows, counts.ok, counts.errors
        return summary
    plan_file = run_dir.path / planning.PLAN_FILE
    plan = (planning.load(run_dir.path) if plan_file.exists()
            else planning.freeze(job.items, run_dir.path, config.shard_size))
    extra = job.items.select(list(config.keep_columns)).schema
    job.items = None  # from here on, memory is bounded by shards, not by the dataset
    schema = output_schema(config.top_k, extra, {
        "label_images.model": spec.model, "label_images.weights": spec.weights_id})
    committed = planning.committed_shards(run_dir.path)
    pending = [s for s in range(plan.num_shards) if s not in committed]
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    loop_started = time.perf_counter()
    try:
        _label_pending(plan, pending, job, schema, run_dir.path, summary, progress)
        summary.loop_seconds = time.perf_counter() - loop_started
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        done = len(planning.committed_shards(run_dir.path))
        raise Interrupted(signum, done, plan.num_shards) from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    merge_started = time.perf_counter()
    counts = _merge(run_dir.path, plan, output, config.format)
    summary.write_seconds += time.perf_counter() - merge_started
    summary.items, summary.ok, summary.errors = counts.rows, counts.ok, counts.errors
    summary.seconds = time.perf_counter() - job.started
    write_json(run_dir.path / SUMMARY_FILE, summary.to_dict())
    return summary


def _label_pending(plan: planning.Plan, pending: list[int], job: Job, schema: pa.Schema,
                   run_path: Path, summary: RunSummary, progress: bool | None) -> None:
    config, classifier = job.config, job.classifier
    done_items = plan.num_items - sum(end - start for start, end in map(plan.shard_bounds, pending))
    show = (not config.quiet) if progress is None else progress
    bar = tqdm(total=plan.num_items, initial=done_items, unit="img", disable=not show,
               file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    if not pending:
        bar.close()
        return
    loader = make_loader(plan, pending, classifier.spec.preprocess, batch_size=job.batch_size,
                         workers=job.workers, max_pixels=config.max_pixels,
                         pin_memory=classifier.on_cuda)
    batches = iter(loader)  # starts the workers before any thread of ours exists (fork-safe)
    committer = PartCommitter(run_path, plan, schema, list(classifier.spec.categories))
    buffers: dict[int, ShardBuffer] = {}
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
            for shard, buffer in _fill(batch, prediction, plan, buffers, config.top_k):
                committer.submit(shard, buffer.result)
            summary.labelled_now += len(batch.indices)
            bar.update(len(batch.indices))
    except RuntimeError as exc:
        # torch reports a dead worker from its SIGCHLD handler, wherever the loop was.
        if "DataLoader worker" not in str(exc):
            raise
        raise RunError(f"a loader worker died ({str(exc).splitlines()[0]}); committed shards "
                       "are intact: run the same command to resume") from None
    finally:
        bar.close()
        del batches, loader  # stops the workers
        committer.drain()
        summary.write_seconds += committer.seconds
    if buffers:
        raise RuntimeError(f"shards {sorted(buffers)} did not receive all their items")


def _fill(batch: Batch, prediction, plan, buffers: dict[int, ShardBuffer], top_k: int):
    """Put a batch's rows into their shards' buffers; yield the shards that became complete."""
    rank = {pos: j for j, pos in enumerate(batch.decoded)}
    for pos, index in enumerate(batch.indices):
        shard = index // plan.shard_size
        buffer = buffers.get(shard)
        if buffer is None:
            buffer = buffers[shard] = ShardBuffer(*plan.shard_bounds(shard), top_k)
        row, result = index - buffer.start, buffer.result
        if pos in rank:
            result.ok[row] = True
            result.class_ids[row] = prediction.class_ids[rank[pos]]
            result.scores[row] = prediction.scores[rank[pos]]
            result.width[row], result.height[row] = batch.widths[pos], batch.heights[pos]
        else:
            result.errors[row] = batch.errors[pos]
        buffer.remaining -= 1
        if buffer.remaining == 0:
            yield shard, buffers.pop(shard)


def _merge(run_path: Path, plan: planning.Plan, output: Path, fmt: str):
    committed = planning.committed_shards(run_path)
    missing = [s for s in range(plan.num_shards) if s not in committed]
    if missing:
        raise RunError(f"shards {missing[:10]} are not committed; run the same command again")
    parts = [planning.part_path(run_path, s) for s in range(plan.num_shards)]
    counts = merge_parts(parts, output, fmt)
    if counts.rows != plan.num_items:  # the exactly-once check, before anything is removed
        raise RunError(f"merged {counts.rows} rows for {plan.num_items} planned items; "
                       f"parts kept in {run_path / planning.PARTS_DIR}")
    for part in parts:
        part.unlink()
    (run_path / planning.PARTS_DIR).rmdir()
    return counts
