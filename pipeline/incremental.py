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

from pipeline import (drift, engines, formats, keys, kinds, night_table, plan as planning, rundir,
                      runner)
from pipeline.commit import write_failure
from pipeline.config import RunConfig
from pipeline.errors import UsageError, notice
from pipeline.job import Job, prepare_run
from pipeline.night_diff import TONIGHT, NightDiff, items_to_label, local_file
from pipeline.night_rows import PartRows
from pipeline.progress import if_long
from pipeline.rundir import (REVIEWS_FILE, STAGING_DIR, RunDirectory, increment_dir, output_name,
                             recorded)
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
    night_table.finish_commit(store)  # a commit a kill interrupted, carried out first
    store.remove(STAGING_DIR)  # parts a killed night staged and never committed
    fitted = None if config.overwrite else _a_head_fitted_on_the_table(top, job)
    if fitted is not None:  # the table's rows take the new head first, from their embeddings
        _relabel_state(top, job, fitted)
    before = top.check(fingerprint, config.overwrite, refusal=(
        "labels from a different {}; an incremental table never mixes two models: rerun "
        "with --overwrite to relabel everything, or choose another --out"))
    top.record(fingerprint, {"incremental": True, **_kept(before), **job.record()}, before)
    previous = _previous_state(top, job)
    if previous is not None:
        if VERSION_COLUMNS[1] not in _state_schema(store, previous).names:
            notice(f"{store.url(TABLE)} records no image versions (its source lists none: "
                   "a manifest); tonight labels every image once and records them, for the "
                   "nights after to compare")
    with if_long(f"comparing tonight's listing of {config.source} with the table",
                 not config.quiet):
        diff = NightDiff(store, job.items(), previous, config.source, TABLE,
                         config.keep_columns)
    with diff:
        return _label_and_assemble(top, job, diff, progress)


def _state_schema(store, index: night_table.Index | None) -> pa.Schema | None:
    """The nightly table's schema (its first part's), or a one-file table's; None: none."""
    if index is not None and index.parts:
        name = night_table.part_path(TABLE, index.parts[0])
    elif store.exists(TABLE) and not store.is_folder(TABLE):
        name = TABLE
    else:
        return None
    with store.open(name) as fh:
        return pq.read_schema(fh)


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
    if previous is None or not job.config.embeddings:
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
    schema = _state_schema(store, night_table.load(store))
    if schema is None or "embedding" not in schema.names:
        return None
    return {**fitted, "backbone": backbone}


def _relabel_state(top: RunDirectory, job: Job, fitted: dict) -> None:
    """The nightly table relabelled with the fitted head from its stored embeddings (no
    image decoded), part by part in one commit, then the new model recorded: a kill in
    between relabels again, the same. The index loses its night, so a table format takes
    the table whole tonight."""
    from pipeline import relabel

    store, config = top.store, job.config
    index = _previous_state(top, job)
    head, names, _ = relabel.load_head(config.weights, fitted["backbone"])
    categories = np.array(names, dtype=object)
    schema = _state_schema(store, index)
    meta = dict(schema.metadata or {})
    meta.update({b"label_images.weights": job.spec.weights_id.encode(),
                 b"label_images.top_k": str(config.top_k).encode()})
    schema = schema.with_metadata(meta)
    relabelled, staged = night_table.Index([], None, index.next_part), {}
    with if_long(f"relabelling {store.url(TABLE)} with the fitted head", not config.quiet):
        for part in index.parts:
            staged[part.name] = night_table.staged_name(RELABEL, part.name)
            writer = night_table.PartWriter(store, staged[part.name], schema,
                                            config.keep_columns)
            with store.open(night_table.part_path(TABLE, part)) as fh:
                source = pq.ParquetFile(fh, pre_buffer=False, buffer_size=1 << 20)
                for batch in source.iter_batches(batch_size=relabel.BATCH_ROWS):
                    writer.write(relabel.relabelled(pa.Table.from_batches([batch]), head,
                                                    categories, config.top_k))
            relabelled.parts.append(writer.close(part.name, part.low, None))
    night_table.commit(store, TABLE, RELABEL, staged, [], relabelled)
    top.record(job.fingerprint(), {"incremental": True, "backbone": fitted["backbone"],
                                   "fit": fitted.get("fit"), **job.record()}, top.read_run())
    notice(f"the table's {relabelled.rows} rows take the fitted head ({fitted.get('head')}, "
           f"fitted on {(fitted.get('fit') or {}).get('answers')} answers), relabelled from "
           "their embeddings; new and changed images are labelled with it")


RELABEL = "relabel"  # the staging name of a table relabelled with a fitted head


def _previous_state(top: RunDirectory, job: Job) -> night_table.Index | None:
    """The nightly table's index: last night's, or a table taken over into parts (a plain
    run's in any format, or a night's of an earlier version, one file), so a finished run
    becomes nightly without labelling anything again. None: a first night."""
    store, config = top.store, job.config
    index = night_table.load(store)
    if index is not None:
        return index
    fmt = formats.of(config)
    if store.exists(TABLE) and not store.is_folder(TABLE):  # one Parquet file
        schema = _state_schema(store, None)
        schema = schema.with_metadata({k: v for k, v in (schema.metadata or {}).items()
                                       if k != NIGHT})

        def tables(columns):
            with store.open(TABLE) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(columns=columns):
                    yield pa.Table.from_batches([batch])
    elif config.format != "parquet" and fmt.exists(store):
        planned = planning.load(store).schema() if planning.exists(store) else pa.schema([])
        kept = pa.schema([planned.field(name) for name in (*config.keep_columns,
                                                           *VERSION_COLUMNS)
                          if name in planned.names])
        schema = output_schema(config.top_k, kept, {},
                               embedding_size=job.classifier.embedding_size)

        def tables(columns):
            yield from fmt.batches(store, columns or schema.names)
    else:
        return None
    folder = keys.spill_folder(store)
    try:
        with if_long(f"cutting {top.output(fmt)} into parts by key", not config.quiet):
            return night_table.take_over(store, TABLE, tables, schema, folder,
                                         config.keep_columns)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _label_and_assemble(top: RunDirectory, job: Job, diff: NightDiff,
                        progress) -> RunSummary:
    config, store = job.config, top.store
    changes = diff.changes()
    fmt = formats.of(config)
    # what tonight's table holds (the model and the source as listed now): a table format
    # finds its commit again by it, and the next night knows which night its table is
    night = top.commit().properties["label_images.fingerprint"] + diff.digest
    night = hashlib.sha256(night.encode()).hexdigest()[:32]
    base = diff.previous.night if diff.previous is not None else None
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
    elif not any(rng.touched for rng in diff.ranges) and fmt.holds(store, night):
        top.remove_increments()
        summary.already_complete = True
        summary.items = diff.items
        summary.ok = sum(part.ok for part in diff.previous.parts)
        _keep_agreement(top)
        return summary
    started = time.perf_counter()
    removed = diff.removed() if diff.previous is not None else None
    with if_long(f"writing {top.output(fmt)}", not config.quiet):
        index, upserts, written, (relabelled, top1_changed) = assemble(
            top, diff, labelled, config.keep_columns, night)
        if config.format != "parquet":
            # the table format takes tonight's changes (upserts, removed); the parts are
            # read only if it replaces the table whole (a first night, or one moved on)
            merge_parts(store, [night_table.part_path(TABLE, p) for p in index.parts], fmt,
                        commit=top.commit(night, base=base or None, upserts=upserts,
                                          removed=removed), count=False)
    top.remove_increments()  # only once the new table is committed
    summary.write_seconds += time.perf_counter() - started
    summary.ok = sum(part.ok for part in index.parts)
    summary.table_parts = {"total": len(index.parts), "written": written,
                     "rows_written": sum(p.rows for p in index.parts if p.night == night)}
    tonight = index.stats()
    if diff.previous is not None:
        summary.drift = drift.compare(diff.previous.stats(), tonight, relabelled,
                                      top1_changed, config.drift_threshold)
        if summary.drift["drift"]:
            notice(drift.line(summary.drift))
    summary.drift["night"] = night
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


def assemble(top: RunDirectory, diff: NightDiff, labelled: str | None, keep_columns,
             night: str) -> tuple[night_table.Index, list[pa.Table], int, tuple[int, int]]:
    """Tonight's parts written where their keys changed, and committed with the new index
    in one commit; the parts nothing changed in are left as they are. The new index,
    tonight's rows (the changes a table format commits: as many as were labelled tonight),
    how many parts were written, and how many changed images were labelled again and how
    many of them changed their top-1. `labelled`: the name of tonight's labels in the run
    directory, if any."""
    store, previous = top.store, diff.previous
    local = None
    if labelled is not None:  # tonight's labels, a local file
        with store.open(labelled) as fh:
            template = pq.read_schema(fh)
        local = local_file(store, labelled, diff.folder)
    else:
        template = _state_schema(store, previous)
    template = template.with_metadata({k: v for k, v in (template.metadata or {}).items()
                                       if k != NIGHT})
    items = ["key", "path", *keep_columns, *VERSION_COLUMNS]
    index = night_table.Index([], night, previous.next_part if previous else 0)
    names, claimed = {}, set()
    for number, rng in enumerate(diff.ranges):
        if not rng.rows:  # no image of tonight's in its range: no part
            continue
        if rng.old is not None and rng.old not in claimed:
            names[number] = previous.parts[rng.old].name  # replaced under its own name
            claimed.add(rng.old)
        else:
            names[number] = index.new_name()
    dropped = [part.name for number, part in enumerate(previous.parts if previous else [])
               if number not in claimed]
    staged, written, upserts = {}, {}, []
    writer, current = None, None
    try:
        rows = PartRows(diff, template, local, items)
        for number, table in rows:
            if number != current:
                if writer is not None:
                    written[current] = writer.close(names[current], diff.ranges[current].low,
                                                    night)
                current = number
                staged[names[number]] = night_table.staged_name(night, names[number])
                writer = night_table.PartWriter(store, staged[names[number]], template,
                                                keep_columns)
            writer.write(table)
            if pc.any(table[TONIGHT]).as_py():
                upserts.append(table.filter(table[TONIGHT]).select(template.names)
                               .cast(template))
        if writer is not None:
            written[current] = writer.close(names[current], diff.ranges[current].low, night)
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    for number in sorted(names):
        rng = diff.ranges[number]
        if number in written:
            index.parts.append(written[number])
        else:  # untouched: last night's part, as it is
            kept = dataclasses.replace(previous.parts[rng.old], low=rng.low)
            index.parts.append(kept)
    index.parts[0].low = ""
    night_table.commit(store, TABLE, night, staged, dropped, index)
    return index, upserts, len(written), (rows.relabelled, rows.top1_changed)
