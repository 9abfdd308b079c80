"""Labelling shards in this process: the loader's batches -> the classifier -> each finished
shard's part committed (commit.py). The local engine runs it on its share; a Ray actor on
the shard it is handed."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pyarrow as pa
import torch

from pipeline import recovery
from pipeline.classifier import Labelling
from pipeline.commit import PartCommitter, ShardBuffers
from pipeline.errors import ProcessFailure, notice
from pipeline.job import Job
from pipeline.loader import Batch, PlanItems, make_loader
from pipeline.memory import LoaderSize
from pipeline.plan import Plan
from pipeline.progress import progress_bar
from pipeline.rundir import RunDirectory, committed_shards
from pipeline.sources import VERSION_COLUMNS
from pipeline.summary import RunSummary
from pipeline.writer import output_schema

# A decode worker killed from outside (the OOM killer's first pick is often the worker that
# holds a batch) restarts the loader this many times in one run before the run gives up.
LOADER_RESTARTS = 3


def label(run_dir: RunDirectory, job: Job, plan: Plan, summary: RunSummary,
          progress: bool | None, shards: list[int]) -> None:
    """Label those of `shards` not committed yet, committing each as it completes; a
    decode worker killed from outside restarts the loader (LOADER_RESTARTS times)."""
    config, store = job.config, run_dir.store
    planned = plan.schema()
    # the versions a listing brought are kept in every run's table: what a night compares
    kept = pa.schema([planned.field(name) for name in config.keep_columns] + [
        planned.field(name) for name in VERSION_COLUMNS
        if name in planned.names and name not in config.keep_columns])
    schema = output_schema(config.top_k, kept, {
        "label_images.model": job.spec.model, "label_images.weights": job.spec.weights_id},
        embedding_size=job.classifier.embedding_size)
    items = PlanItems(plan, job.source, job.spec.preprocess, config.max_pixels,
                      recovery.quarantined(store))
    show = (not config.quiet) if progress is None else progress
    started = time.perf_counter()
    restarts = 0
    with recovery.stopped_by_signals(store, plan), _torch_threads(job.settings.threads):
        while True:
            owned = shards
            committed = committed_shards(store)  # one listing of parts/, not one a shard
            pending = [s for s in owned if s not in committed]
            bar = progress_bar(plan.items_in(owned), plan.items_in(owned) - plan.items_in(
                pending), show, job.part)
            try:
                _label_pending(items, pending, job, schema, store, summary, bar)
                break
            except recovery.WorkerDied as died:
                try:
                    recovery.quarantine_crashers(died, items, store)  # then the rest, again
                except ProcessFailure as killed:  # from outside: not a file's doing
                    restarts += 1
                    if restarts > LOADER_RESTARTS:
                        raise
                    summary.loader_restarts = restarts
                    notice(f"{str(killed).split(';')[0]}: restarting the loader ({restarts} "
                           f"of {LOADER_RESTARTS}); the shards in flight are redone")
    summary.loop_seconds = time.perf_counter() - started


@contextmanager
def _torch_threads(threads: int | None):
    """The model's threads while labelling (settings decides them), given back after: a
    bench goes on measuring in this process."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _label_pending(items: PlanItems, pending: list[int], job: Job, schema, store, summary,
                   bar) -> None:
    """The loop: batches in plan order -> the model -> shard buffers -> committed parts."""
    classifier, chosen, plan = job.classifier, job.settings, items.plan
    if not pending:
        bar.close()
        return
    loader = make_loader(plan, pending, job.source, job.spec.preprocess,
                         batch_size=chosen.batch_size, workers=chosen.workers,
                         max_pixels=job.config.max_pixels, pin_memory=classifier.on_cuda,
                         quarantined=items.quarantined, prefetch=chosen.prefetch)
    batches = iter(loader)  # starts the workers before any thread of ours exists (fork-safe)
    committer = PartCommitter(store, plan, schema, list(job.spec.categories))
    shards = ShardBuffers(plan, job.config.top_k, classifier.embedding_size)
    received = labelled = 0  # items out of the loader (where a dead worker was), done

    def finish(batch: Batch, labelling: Labelling | None) -> None:
        nonlocal labelled
        computing = time.perf_counter()
        prediction = labelling.result() if labelling else None
        summary.compute_seconds += time.perf_counter() - computing
        for shard, result in shards.fill(batch, prediction):
            committer.submit(shard, result)
        labelled += len(batch.indices)
        errors = len(batch.indices) - len(batch.decoded)
        summary.errors_now += errors
        bar.advance(len(batch.indices), errors)

    try:
        try:
            # One batch in flight: on CUDA the next is read and sent while it computes.
            in_flight = None
            for batch in _timed(batches, summary):
                received += len(batch.indices)
                computing = time.perf_counter()
                labelling = classifier.submit(batch.images) if batch.decoded else None
                summary.compute_seconds += time.perf_counter() - computing
                if in_flight:
                    finish(*in_flight)
                in_flight = (batch, labelling)
            if in_flight:
                finish(*in_flight)
        finally:
            recovery.release_leaked_logging_lock()  # before the writer thread may log
            bar.close()
            try:
                recovery.stop_workers(batches)  # (and may report a dead one)
                del batches, loader
            finally:
                committer.drain()  # whatever happened, finished shards get committed
                summary.write_seconds += committer.seconds
                summary.labelled_now += labelled
    except (RuntimeError, ConnectionError, EOFError) as exc:
        size = LoaderSize(chosen.workers, chosen.batch_size, chosen.prefetch)
        failure = recovery.loader_failure(exc, plan, pending, received, size,
                                          job.spec.preprocess.crop_bytes)
        if failure is None:
            raise
        raise failure from None
    shards.check_all_complete()


def _timed(batches, summary: RunSummary):
    """The loader's batches, counting the time spent waiting for each."""
    while True:
        waited = time.perf_counter()
        batch = next(batches, None)
        summary.load_seconds += time.perf_counter() - waited
        if batch is None:
            return
        yield batch
