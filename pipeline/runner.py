"""The run: open the run directory -> plan -> label the pending shards -> commit -> merge."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pyarrow as pa
import torch

from pipeline import formats, keys, launchers, plan as planning, recovery
from pipeline.classifier import Labelling
from pipeline.commit import PartCommitter, ShardBuffers, write_failure
from pipeline.config import RunConfig
from pipeline.errors import ProcessFailure, RunError, UsageError, notice
from pipeline.formats.base import Format
from pipeline.job import Job, prepare
from pipeline.launchers import ProcessGroup
from pipeline.loader import Batch, PlanItems, make_loader
from pipeline.memory import LoaderSize
from pipeline.plan import Plan
from pipeline.progress import progress_bar
from pipeline.rundir import RunDirectory, committed_shards, part_name
from pipeline.summary import RunSummary
from pipeline.writer import count_rows, merge_parts, output_schema


# A decode worker killed from outside (the OOM killer's first pick is often the worker that
# holds a batch) restarts the loader this many times in one run before the run gives up.
LOADER_RESTARTS = 3


def run(config: RunConfig, *, progress: bool | None = None,
        started: float | None = None) -> RunSummary:
    """Label every item of config.source into config.out, resuming what a previous run began.

    Under torchrun every rank labels its share and rank 0 assembles the table; as one slice
    of an array job it labels its slice and leaves the assembly to `label-images merge`.
    `started`: when the command began (perf_counter), for the summary's whole elapsed time.
    """
    if config.incremental:
        raise ValueError("an incremental run goes through incremental.run")
    part = launchers.from_environment(config.num_slices, config.slice_index)
    if config.overwrite and not part.whole and not part.distributed:
        raise UsageError("--overwrite would let each slice wipe the others' work: clear the "
                         "run directory once before starting the array job instead")
    job = prepare(config, part, started=started)
    group = ProcessGroup(part, backend="gloo") if part.distributed else None
    try:
        with RunDirectory(config.out, part) as run_dir:
            return run_in(run_dir, job, group, progress)
    except OSError as exc:  # disk full, permissions, a vanished mount: not a bug of ours
        raise write_failure(exc) from None
    finally:
        if group is not None:
            group.close()


def run_in(run_dir: RunDirectory, job: Job, group: ProcessGroup | None = None,
           progress: bool | None = None) -> RunSummary:
    """The run in an open run directory (an incremental night runs its increment here too)."""
    config, part = job.config, job.part
    plan, resumed, listed = open_plan(run_dir, job, group)
    fmt = formats.of(config)
    summary = RunSummary(output=run_dir.output(fmt),
                         run_dir=run_dir.store.url(), resumed=resumed,
                         device=str(job.settings.device),
                         precision=str(job.settings.dtype).removeprefix("torch."),
                         settings=job.settings.to_dict())
    if run_dir.is_finished(fmt, part.whole):
        if not listed and part.whole:  # a finished run, its source not listed since
            summary.stale = _stale(job, plan, run_dir.store)
        return already_complete(run_dir, fmt, plan, summary)
    label(run_dir, job, plan, summary, progress)
    if group is not None:
        group.barrier()  # every rank's shards are committed
    if not part.merges:
        summary.slice_done = part.describe()
        summary.missing = [] if group is not None else missing_shards(run_dir, plan)
        return summary
    missing = missing_shards(run_dir, plan)
    if missing:  # a bug of ours or a part removed under the run: never assemble without it
        raise RunError(f"shards {missing[:10]} are not committed; run the same command again")
    assemble(run_dir, plan, fmt, summary)
    summary.seconds = time.perf_counter() - job.started
    run_dir.write_summary(summary.to_dict())
    return summary


def open_plan(run_dir: RunDirectory, job: Job, group=None) -> tuple[Plan, bool, bool]:
    """Check the job against the run directory and freeze the plan as the items are listed
    (rank 0 only); then decide the settings on it and record them. (plan, resuming, whether
    this process listed the items)."""
    store = run_dir.store
    listed = False
    if group is None or job.part.index == 0:
        try:
            previous = run_dir.check(job.fingerprint(), job.config.overwrite)
            # the fingerprint first: a plan here is only ever this job's
            run_dir.record(job.fingerprint(), job.record(), previous)
            if not run_dir.has_plan():
                freeze(job, store)
                listed = True
            verdict, resumed = None, previous is not None
        except UsageError as exc:
            verdict, resumed = str(exc), False
        if group is not None:
            group.share((verdict, resumed))
    else:  # the other ranks wait for rank 0's verdict, then read what it wrote
        verdict, resumed = group.share(None)
    if verdict is not None:
        raise UsageError(verdict)
    job.decide(store)
    if group is None or job.part.index == 0:
        run_dir.record(job.fingerprint(), job.record(), run_dir.read_run())
    return planning.load(store), resumed, listed


def freeze(job: Job, store) -> Plan:
    """The job's items, streamed into the plan as they are listed; empty or repeated keys
    refused there, before anything is labelled."""
    config = job.config
    return planning.freeze(job.items(), store, config.shard_size,
                           allow_duplicates=config.allow_duplicates, what=config.source,
                           noun=job.source.spec.key_noun)


def label(run_dir: RunDirectory, job: Job, plan: Plan, summary: RunSummary,
          progress: bool | None, shards: list[int] | None = None) -> None:
    """Label this process's pending shards of the plan, committing each as it completes.

    `shards`: these, not the launcher's share (an engine hands them out one at a time).
    """
    config, store = job.config, run_dir.store
    kept = pa.schema([plan.schema().field(name) for name in config.keep_columns])
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
            owned = shards if shards is not None else [
                s for s in range(plan.num_shards) if job.part.owns(s)]
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


def _stale(job: Job, plan: Plan, store) -> str:
    """What a finished run's source gained and lost since its plan was frozen, and what to
    rerun with: a nightly job must not report success on yesterday's images without a word.
    Compared out of core: the listing and the plan are streamed, never held."""
    try:
        new, removed = keys.changes(plan.batches(["key"]), job.items(), store)
    except UsageError as exc:  # e.g. no images there any more: the table stands as it is
        return f"but listing {job.config.source} again fails: {exc}"
    if not new and not removed:
        return ""
    return (f"but {job.config.source} has changed since this run was planned ({new} new, "
            f"{removed} removed): rerun with --incremental --overwrite once to relabel it as "
            "an incremental table that --incremental then updates each night, or with "
            "--overwrite to relabel everything")


def already_complete(run_dir: RunDirectory, fmt: Format, plan: Plan,
                      summary: RunSummary) -> RunSummary:
    store = run_dir.store
    if not fmt.exists(store):
        # A finished run asked for in another format: convert, do not relabel.
        counts = merge_parts(store, [formats.get("parquet").table_name()], fmt,
                             commit=run_dir.commit())
        summary.items, summary.ok, summary.errors = counts.rows, counts.ok, counts.errors
        return summary
    run_dir.remove_parts()  # killed after the final rename, before the parts went: finish
    summary.already_complete = True
    summary.items = plan.num_items
    if not run_dir.has_summary():
        counts = count_rows(store, fmt)
        summary.items, summary.ok, summary.errors = counts.rows, counts.ok, counts.errors
        run_dir.write_summary(summary.to_dict())
    return summary


def assemble(run_dir: RunDirectory, plan: Plan, fmt: Format, summary: RunSummary) -> None:
    started = time.perf_counter()
    shards = range(plan.num_shards)
    counts = merge_parts(run_dir.store, [part_name(s) for s in shards], fmt,
                         expected_rows=[e - s for s, e in map(plan.shard_bounds, shards)],
                         commit=run_dir.commit())
    run_dir.remove_parts()  # only once the whole table is committed
    summary.write_seconds += time.perf_counter() - started
    summary.items, summary.ok, summary.errors = counts.rows, counts.ok, counts.errors


def missing_shards(run_dir: RunDirectory, plan: Plan) -> list[int]:
    committed = committed_shards(run_dir.store)
    return [s for s in range(plan.num_shards) if s not in committed]


def merge(out: str, fmt: str | None = None) -> RunSummary:
    """`label-images merge`: assemble the table once every slice has committed its shards."""
    try:
        with RunDirectory(out) as run_dir:
            record = run_dir.read_run()
            if record is None or not run_dir.has_plan():
                raise UsageError(f"{out} holds no label-images run (no run.json or plan)")
            options = record["config"]
            fmt = formats.get(fmt or options["format"]).configured(
                {"table": options.get("table"), "catalog": options.get("catalog")}
                if (fmt or options["format"]) == options["format"] else {})
            fmt.check(run_dir.store)
            plan = planning.load(run_dir.store)
            summary = RunSummary(output=run_dir.output(fmt),
                                 run_dir=run_dir.store.url(), resumed=True)
            if fmt.exists(run_dir.store):
                summary.already_complete = True
                summary.items = plan.num_items
                return summary
            missing = missing_shards(run_dir, plan)
            if missing:
                count = record.get("resolved", {}).get("slices", 1)
                owners = sorted({s % count for s in missing})
                raise RunError(
                    f"{len(missing)} of {plan.num_shards} shards are not committed yet "
                    f"({launchers.shard_ranges(missing)[:300]}), owned by slice(s) "
                    f"{', '.join(map(str, owners))} of {count}; run those, then merge again")
            started = time.perf_counter()
            assemble(run_dir, plan, fmt, summary)
            summary.seconds = time.perf_counter() - started
            run_dir.write_summary(summary.to_dict())
            return summary
    except OSError as exc:
        raise write_failure(exc) from None
