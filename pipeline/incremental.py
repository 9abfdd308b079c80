"""Nightly incremental runs: label only what is new or changed since the last table, then
assemble the new table (the current source, exactly once) from old rows and new ones.

The table itself is the state: in incremental runs it carries `source_size` and
`source_version` (modification time in ns, or the object's ETag) for each row. Tonight's
listing is compared with it out of core (night_diff.py). New and changed images are
labelled as an ordinary resumable run in `increments/<digest>/`, so a kill in the middle of
a night resumes like any run; the new table is then written in one streamed pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import drift, engines, formats, keys, kinds, plan as planning, rundir, runner
from pipeline.commit import write_failure
from pipeline.config import RunConfig
from pipeline.errors import UsageError, notice
from pipeline.job import Job, prepare_run
from pipeline.night_diff import TONIGHT, NightDiff, items_to_label, local_file
from pipeline.progress import if_long
from pipeline.rundir import (REVIEWS_FILE, RunDirectory, increment_dir, output_name, recorded,
                             summary_of)
from pipeline.sources import VERSION_COLUMNS
from pipeline.summary import RunSummary
from pipeline.writer import merge_parts, output_schema

TABLE = output_name("parquet")  # the night's state, whatever format is asked for
NIGHT = b"label_images.night"  # the state's metadata: which night's commit it is


def run(config: RunConfig, *, progress: bool | None = None,
        started: float | None = None) -> RunSummary:
    """`run --incremental`: the same command every night on the same output directory."""
    if config.allow_duplicates:
        raise UsageError("--incremental needs unique keys: it cannot be combined with "
                         "--allow-duplicates")
    if config.num_slices is not None or config.slice_index is not None:
        raise UsageError("--incremental runs as one process; slices are not supported with it")
    kinds.check_options(config)  # each kind's options, typed, before any work
    engine = engines.get(config.engine)
    engine.check(config)  # its own refusals, before the listing
    job = prepare_run(config, engine, versions=True, started=started)  # every night lists
    try:
        with RunDirectory(config.out) as top:
            return _night(top, job, progress)
    except OSError as exc:
        raise write_failure(exc) from None


def _night(top: RunDirectory, job: Job, progress: bool | None) -> RunSummary:
    config, store = job.config, top.store
    fingerprint = job.fingerprint()
    fitted = None if config.overwrite else _a_head_fitted_on_the_table(top, job)
    if fitted is not None:  # the table's rows take the new head first, from their embeddings
        _relabel_state(top, job, fitted)
    before = top.check(fingerprint, config.overwrite, refusal=(
        "labels from a different {}; an incremental table never mixes two models: rerun "
        "with --overwrite to relabel everything, or choose another --out"))
    top.record(fingerprint, {"incremental": True, **_kept(before), **job.record()}, before)
    previous = _previous_state(top, job)
    if previous is not None:
        with store.open(TABLE) as fh:
            schema = pq.read_schema(fh)
        if VERSION_COLUMNS[1] not in schema.names:
            notice(f"{store.url(TABLE)} records no image versions (its source lists none: "
                   "a manifest); tonight labels every image once and records them, for the "
                   "nights after to compare")
    with if_long(f"comparing tonight's listing of {config.source} with the table",
                 not config.quiet):
        diff = NightDiff(store, job.items(), previous, config.source)
    with diff:
        return _label_and_assemble(top, job, diff, progress)


def _kept(record: dict | None) -> dict:
    """What a night's record carries over from the last: which backbone the table's
    embeddings come from, and which fit labels it."""
    return {k: record[k] for k in ("backbone", "fit") if record and k in record}


# What a head fitted on the table may change in the fingerprint: the weights, the classes
_A_NEW_HEAD = {"weights", "num_classes", "labels_sha256", "categories", "top_k"}


def _a_head_fitted_on_the_table(top: RunDirectory, job: Job) -> dict | None:
    """What `fit` recorded in tonight's --weights, when it is a head fitted on the backbone
    the nightly table's embeddings come from (and nothing else of the job changed): the
    night then relabels the table with it instead of refusing a new model. Else None: the
    fingerprint check says what differs."""
    previous, store = top.read_run(), top.store
    if previous is None or not job.config.embeddings or not store.exists(TABLE):
        return None
    before, now = previous.get("fingerprint") or {}, job.fingerprint()
    changed = {k for k in set(before) | set(now) if before.get(k) != now.get(k)}
    if not changed or not changed <= _A_NEW_HEAD:
        return None
    from pipeline.relabel import fit_record

    fitted = fit_record(job.config.weights)
    backbone = previous.get("backbone") or before.get("weights")
    if fitted is None or fitted.get("backbone") != backbone:
        return None
    with store.open(TABLE) as fh:
        if "embedding" not in pq.read_schema(fh).names:
            return None
    return {**fitted, "backbone": backbone}


def _relabel_state(top: RunDirectory, job: Job, fitted: dict) -> None:
    """The night's state relabelled with the fitted head from its stored embeddings (no
    image decoded), then the new model recorded: a kill in between relabels again, the
    same. The state loses its night's mark, so a table format takes it whole tonight."""
    from pipeline import relabel

    store, config = top.store, job.config
    head, names, _ = relabel.load_head(config.weights, fitted["backbone"])
    categories = np.array(names, dtype=object)
    with store.open(TABLE) as fh:
        schema = pq.read_schema(fh)
    meta = {k: v for k, v in (schema.metadata or {}).items() if k != NIGHT}
    meta.update({b"label_images.weights": job.spec.weights_id.encode(),
                 b"label_images.top_k": str(config.top_k).encode()})
    schema = schema.with_metadata(meta)
    rows, folder = 0, keys.spill_folder(store)
    try:  # read from a local file (the state itself, locally) while the new one is written
        source = pq.ParquetFile(local_file(store, TABLE, folder), pre_buffer=False,
                                buffer_size=1 << 20)
        with if_long(f"relabelling {store.url(TABLE)} with the fitted head", not config.quiet), \
                store.writing(TABLE) as sink, pq.ParquetWriter(sink, schema) as writer:
            for batch in source.iter_batches(batch_size=relabel.BATCH_ROWS):
                table = relabel.relabelled(pa.Table.from_batches([batch]), head, categories,
                                           config.top_k)
                writer.write_table(table.cast(schema))
                rows += batch.num_rows
        source.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    top.record(job.fingerprint(), {"incremental": True, "backbone": fitted["backbone"],
                                   "fit": fitted.get("fit"), **job.record()}, top.read_run())
    notice(f"the table's {rows} rows take the fitted head ({fitted.get('head')}, fitted on "
           f"{(fitted.get('fit') or {}).get('answers')} answers), relabelled from their "
           "embeddings; new and changed images are labelled with it")


def _previous_state(top: RunDirectory, job: Job) -> str | None:
    """The night's state (TABLE): last night's, or a plain run's table taken over. A
    Parquet table is its own state; a plain run's CSV, Delta or Iceberg table is read back
    into one, so a finished run becomes nightly without labelling anything again."""
    store, config = top.store, job.config
    fmt = formats.of(config)
    if store.exists(TABLE) or config.format == "parquet" or not fmt.exists(store):
        return TABLE if store.exists(TABLE) else None
    planned = planning.load(store).schema() if planning.exists(store) else pa.schema([])
    kept = pa.schema([planned.field(name) for name in (*config.keep_columns, *VERSION_COLUMNS)
                      if name in planned.names])
    schema = output_schema(config.top_k, kept, {}, embedding_size=job.classifier.embedding_size)
    with store.writing(TABLE) as sink, pq.ParquetWriter(sink, schema) as writer:
        for table in fmt.batches(store, schema.names):
            writer.write_table(table.select(schema.names).cast(schema))
    return TABLE


def _label_and_assemble(top: RunDirectory, job: Job, diff: NightDiff,
                        progress) -> RunSummary:
    config, store = job.config, top.store
    changes = diff.changes()
    fmt = formats.of(config)
    # what tonight's table holds (the model and the source as listed now): a table format
    # finds its commit again by it, and the next night knows which night its state is
    night = top.commit().properties["label_images.fingerprint"] + diff.digest
    night = hashlib.sha256(night.encode()).hexdigest()[:32]
    base = None
    if diff.previous is not None:
        base = (pq.read_schema(diff.previous).metadata or {}).get(NIGHT, b"").decode()
    summary = RunSummary(output=top.output(fmt), run_dir=store.url())
    summary.changes = dataclasses.asdict(changes)
    labelled = None
    if changes.new or changes.changed:
        spooled, digest = diff.to_label()
        increment = increment_dir(digest)
        keep = tuple(config.keep_columns) + VERSION_COLUMNS
        sub_job = dataclasses.replace(
            job, items=lambda: items_to_label(spooled),
            config=dataclasses.replace(config, out=store.url(increment), format="parquet",
                                       keep_columns=keep, overwrite=False))
        with RunDirectory(store.url(increment)) as sub:
            done = runner.run_in(sub, sub_job, progress=progress)
        # what the night resolved is what labelled its increment
        run = top.read_run()
        top.record(job.fingerprint(), {"incremental": True, **_kept(run), **sub_job.record(),
                                       "config": config.to_dict()}, run)
        summary.device, summary.precision = done.device, done.precision
        summary.settings = done.settings
        labelled = rundir.within(increment, TABLE)
        summary.labelled_now, summary.loop_seconds = done.labelled_now, done.loop_seconds
        summary.load_seconds, summary.compute_seconds = done.load_seconds, done.compute_seconds
        summary.write_seconds = done.write_seconds
    elif changes.removed == 0 and fmt.holds(store, night):
        top.remove_increments()
        summary.already_complete = True
        summary.items = diff.items
        _keep_agreement(top)
        return summary
    started = time.perf_counter()
    # the removed keys before the new table replaces the previous one that names them
    removed = diff.removed() if diff.previous is not None else None
    before = _last_nights_stats(top, diff, base) if diff.previous is not None else None
    with if_long(f"writing {top.output(fmt)}", not config.quiet):
        summary.ok, upserts, tonight = assemble(top, diff, labelled, config.keep_columns, night)
        if config.format != "parquet":
            merge_parts(store, [TABLE], fmt, commit=top.commit(
                night, base=base or None, upserts=upserts, removed=removed))
    top.remove_increments()  # only once the new table is committed
    summary.write_seconds += time.perf_counter() - started
    if before is not None:
        summary.drift = drift.compare(before, tonight, diff.relabelled, diff.top1_changed,
                                      config.drift_threshold)
        if summary.drift["drift"]:
            notice(drift.line(summary.drift))
    summary.drift["night"], summary.drift["label_stats"] = night, tonight.to_dict()
    summary.items = diff.items
    summary.errors = summary.items - summary.ok
    summary.seconds = time.perf_counter() - job.started
    top.write_summary(summary.to_dict())
    _keep_agreement(top)
    return summary


def _keep_agreement(top: RunDirectory) -> None:
    """Tonight's table against people's answers so far, kept night by night (the report's
    'agreement with people'); nothing where nobody has reviewed."""
    if top.store.exists(REVIEWS_FILE):
        from pipeline.review.reviews import keep_agreement

        keep_agreement(top.store.url(), "night", recorded(top.store).labelled_with)


def _last_nights_stats(top: RunDirectory, diff: NightDiff, base: str) -> drift.LabelStats:
    """Last night's label statistics: kept in its summary.json when that night wrote the
    table tonight starts from, else read from the table (a first night, a takeover)."""
    kept = summary_of(top.store).get("drift") or {}
    if base and kept.get("night") == base and "label_stats" in kept:
        return drift.LabelStats.from_dict(kept["label_stats"])
    return drift.stats_of(diff.previous)


def assemble(top: RunDirectory, diff: NightDiff, labelled: str | None, keep_columns,
             night: str) -> tuple[int, list[pa.Table], drift.LabelStats]:
    """Write the new table in source order, a batch at a time: labels of unchanged items
    from the previous table, the rest from tonight's; keys, paths, kept columns and versions
    always from tonight's listing. How many rows are ok, tonight's rows (the changes a
    table format commits: as many as were labelled tonight), and the new table's label
    statistics. `labelled`: the name of tonight's labels in the run directory, if any."""
    store = top.store
    local = None
    if labelled is not None:  # tonight's labels, a local file for DuckDB
        with store.open(labelled) as fh:
            template = pq.read_schema(fh)
        local = local_file(store, labelled, diff.folder)
    else:
        template = pq.read_schema(diff.previous)
    template = template.with_metadata({**(template.metadata or {}), NIGHT: night.encode()})
    items = ["key", "path", *keep_columns, *VERSION_COLUMNS]
    ok, upserts, stats = 0, [], drift.LabelStats()
    with store.writing(TABLE) as sink, pq.ParquetWriter(sink, template) as writer:
        for rows in diff.rows(template, local, items):
            tonight = rows[TONIGHT]
            table = rows.select(template.names).cast(template)
            writer.write_table(table)
            stats.add(table)
            ok += int(pc.sum(pc.equal(table["status"], "ok")).as_py() or 0)
            if pc.any(tonight).as_py():
                upserts.append(table.filter(tonight))
    return ok, upserts, stats
