"""The run, the same for every engine: open the run directory -> plan -> the engine labels
the pending shards -> merge -> summary; and `label-images merge`."""

from __future__ import annotations

import time

from pipeline import engines, formats, kinds, launchers, plan as planning
from pipeline.commit import write_failure
from pipeline.config import RunConfig
from pipeline.errors import RunError, UsageError, notice
from pipeline.progress import if_long
from pipeline.finished import stale
from pipeline.formats.base import Format
from pipeline.job import Job, prepare_run
from pipeline.plan import Plan
from pipeline.rundir import RunDirectory, committed_shards, part_name
from pipeline.summary import RunSummary
from pipeline.writer import count_rows, merge_parts




def run(config: RunConfig, *, progress: bool | None = None,
        started: float | None = None) -> RunSummary:
    """Label every item of config.source into config.out with the configured engine,
    resuming what a previous run began.

    Under torchrun every rank labels its share and rank 0 assembles the table; as one slice
    of an array job it labels its slice and leaves the assembly to `label-images merge`.
    `started`: when the command began (perf_counter), for the summary's whole elapsed time.
    """
    if config.incremental:
        raise ValueError("an incremental run goes through incremental.run")
    kinds.check_options(config)  # each kind's options, typed, before any work
    engine = engines.get(config.engine)
    engine.check(config)  # its own refusals, before anything is listed or loaded
    part = engine.part(config)
    job = prepare_run(config, engine, part, started=started)
    try:
        with RunDirectory(config.out, part) as run_dir:
            return run_in(run_dir, job, progress)
    except OSError as exc:  # disk full, permissions, a vanished mount: not a bug of ours
        raise write_failure(exc) from None


def run_in(run_dir: RunDirectory, job: Job, progress: bool | None = None) -> RunSummary:
    """The run in an open run directory: plan, hand the pending shards to the job's engine,
    merge, summarise (an incremental night runs its increment here too). Every engine goes
    through this sequence; an engine only decides where each shard is labelled."""
    config, part = job.config, job.part
    engine = engines.get(config.engine)
    with engine.session(job, run_dir.store) as group:
        plan, resumed, listed = open_plan(run_dir, job, group)
        if not engine.labels_here:
            job.classifier.release()
        fmt = formats.of(config)
        summary = RunSummary(output=run_dir.output(fmt),
                             run_dir=run_dir.store.url(), resumed=resumed,
                             device=str(job.settings.device),
                             precision=str(job.settings.dtype).removeprefix("torch."),
                             settings=job.settings.to_dict())
        if run_dir.is_finished(fmt, part.whole):
            if not listed and part.whole:  # a finished run, its source not listed since
                summary.stale = stale(config, plan, run_dir.store, job.items())
            return already_complete(run_dir, fmt, plan, summary)
        owned = [s for s in range(plan.num_shards) if part.owns(s)]
        if resumed and not config.quiet:
            _say_what_is_kept(run_dir, plan, owned)
        engine.label(run_dir, job, plan, owned, summary, progress)
        if group is not None:
            group.barrier()  # every rank's shards are committed
    if not part.merges:
        summary.slice_done = part.describe()
        summary.missing = [] if group is not None else missing_shards(run_dir, plan)
        return summary
    missing = missing_shards(run_dir, plan)
    if missing:  # a bug of ours or a part removed under the run: never assemble without it
        raise RunError(f"shards {missing[:10]} are not committed; run the same command again")
    assemble(run_dir, plan, fmt, summary, not config.quiet)
    summary.seconds = time.perf_counter() - job.started
    run_dir.write_summary(summary.to_dict())
    return summary


def _say_what_is_kept(run_dir: RunDirectory, plan: Plan, owned: list[int]) -> None:
    """A resume's first words: how much of the work before it was kept, and what is left."""
    done = committed_shards(run_dir.store)
    kept = plan.items_in([s for s in owned if s in done])
    notice(f"resuming: {kept:,} of {plan.items_in(owned):,} images were labelled and kept "
           f"before; {plan.items_in(owned) - kept:,} to label")


def open_plan(run_dir: RunDirectory, job: Job, group=None) -> tuple[Plan, bool, bool]:
    """Check the job against the run directory and freeze the plan as the items are listed
    (rank 0 only); then decide the settings on it and record them. (plan, resuming, whether
    this process listed the items)."""
    store = run_dir.store
    listed = False
    if group is None or job.part.index == 0:
        try:
            previous = run_dir.check(job.fingerprint(), job.config.overwrite)
            if previous and previous.get("incremental") and not job.config.incremental:
                # a plan of tonight's listing beside last night's table would say the
                # table is complete when it is not
                raise UsageError(f"{store.url()} holds a nightly table (written with "
                                 "--incremental): rerun with --incremental, or with "
                                 "--overwrite to replace it")
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
    with if_long(f"listing {config.source} into the run's plan", not config.quiet):
        return planning.freeze(job.items(), store, config.shard_size,
                               allow_duplicates=config.allow_duplicates, what=config.source,
                               noun=job.source.spec.key_noun)


def already_complete(run_dir: RunDirectory, fmt: Format, plan: Plan,
                      summary: RunSummary) -> RunSummary:
    store = run_dir.store
    if not fmt.exists(store):
        # A finished run asked for in another format: convert, do not relabel.
        counts = merge_parts(store, formats.get("parquet").files(store), fmt,
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


def assemble(run_dir: RunDirectory, plan: Plan, fmt: Format, summary: RunSummary,
             shown: bool = True) -> None:
    started = time.perf_counter()
    shards = range(plan.num_shards)
    with if_long(f"writing {run_dir.output(fmt)} from {plan.num_shards:,} shards", shown):
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
            fmt = formats.recorded(record["config"], fmt)
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
