"""Nightly incremental runs: label only what is new or changed since the last table, then
assemble the new table (the current source, exactly once) from old rows and new ones.

The table itself is the state: in incremental runs it carries `source_size` and
`source_version` (modification time in ns, or the object's ETag) for each row. New and
changed images are labelled as an ordinary resumable run in `increments/<digest>/`, so a
kill in the middle of a night resumes like any run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import runner
from pipeline.config import RunConfig
from pipeline.errors import UsageError
from pipeline.rundir import INCREMENTS_DIR, SUMMARY_FILE, RunDirectory
from pipeline.slices import Slice
from pipeline.writer import merge_parts, write_json

VERSION_COLUMNS = ("source_size", "source_version")
TABLE = "labels.parquet"


def stable_fingerprint(fingerprint: dict) -> dict:
    """What may not change between nights: all but the list of items itself."""
    source = {k: v for k, v in fingerprint["source"].items()
              if k not in ("items", "items_sha256")}
    return {**fingerprint, "source": source}


@dataclasses.dataclass
class Changes:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0


def classify(items: pa.Table, previous: pa.Table | None) -> tuple[pa.Array, Changes]:
    """A mask of the items to label (new or changed), and the counts of each kind."""
    if previous is None:
        return pa.array([True] * items.num_rows), Changes(new=items.num_rows)
    where = pc.index_in(items["key"], value_set=previous["key"].combine_chunks())
    known = pc.is_valid(where)
    before = previous.take(pc.fill_null(where, 0))
    same = pc.and_(known, pc.and_(
        pc.equal(items["path"], before["path"]),
        pc.and_(pc.equal(items["source_size"], before["source_size"]),
                pc.equal(items["source_version"], before["source_version"]))))
    same = pc.fill_null(same, False)
    todo = pc.invert(same)
    counts = Changes(
        new=int(pc.sum(pc.invert(known)).as_py() or 0),
        unchanged=int(pc.sum(same).as_py() or 0),
        removed=previous.num_rows - int(pc.sum(pc.is_in(
            previous["key"], value_set=items["key"].combine_chunks())).as_py() or 0))
    counts.changed = items.num_rows - counts.new - counts.unchanged
    return todo.combine_chunks() if isinstance(todo, pa.ChunkedArray) else todo, counts


def _digest(todo: pa.Table) -> str:
    digest = hashlib.sha256()
    for name in ("key", "path", "source_version"):
        digest.update("\x1e".join(todo[name].to_pylist()).encode())
    return digest.hexdigest()[:16]


def run(config: RunConfig, *, progress: bool | None = None) -> runner.RunSummary:
    """`run --incremental`: the same command every night on the same output directory."""
    if config.allow_duplicates:
        raise UsageError("--incremental needs unique keys: it cannot be combined with "
                         "--allow-duplicates")
    if config.num_shards is not None or config.shard_index is not None:
        raise UsageError("--incremental runs as one process; slices are not supported with it")
    job = runner.prepare(config, versions=True)
    items = job.items
    fingerprint = stable_fingerprint(runner.fingerprint(config, job.classifier.spec,
                                                        job.source, items))
    try:
        with RunDirectory(config.out) as top:
            return _night(top, job, items, fingerprint, progress)
    except OSError as exc:
        raise runner.os_failure(exc) from None


def _night(top: RunDirectory, job: runner.Job, items: pa.Table, fingerprint: dict,
           progress: bool | None) -> runner.RunSummary:
    config, store = job.config, top.store
    top.prepare(fingerprint, {"incremental": True, **job.record}, config.overwrite, refusal=(
        "labels from a different {}; an incremental table never mixes two models: rerun "
        "with --overwrite to relabel everything, or choose another --out"))
    previous = None
    if store.exists(TABLE):
        with store.open(TABLE) as fh:
            previous = pq.read_table(fh)
        missing = [c for c in VERSION_COLUMNS if c not in previous.column_names]
        if missing:
            raise UsageError(f"{store.url(TABLE)} was not written by an incremental run (no "
                             f"{', '.join(missing)}); rerun with --overwrite")
    todo_mask, changes = classify(items, previous)
    todo = items.filter(todo_mask)
    summary = runner.RunSummary(output=store.url(top.output_name(config.format)),
                                run_dir=store.url(), device=job.record["resolved"]["device"],
                                precision=job.record["resolved"]["precision"])
    summary.changes = dataclasses.asdict(changes)
    labelled = None
    if todo.num_rows:
        increment = f"{INCREMENTS_DIR}/{_digest(todo)}"
        keep = tuple(config.keep_columns) + VERSION_COLUMNS
        sub_job = dataclasses.replace(
            job, items=todo,
            config=dataclasses.replace(config, out=store.url(increment), format="parquet",
                                       keep_columns=keep, overwrite=False))
        with RunDirectory(store.url(increment)) as sub:
            done = runner._run_in(sub, sub_job, Slice(), None, progress)
            with sub.store.open(TABLE) as fh:
                labelled = pq.read_table(fh)
        summary.labelled_now, summary.loop_seconds = done.labelled_now, done.loop_seconds
        summary.load_seconds, summary.compute_seconds = done.load_seconds, done.compute_seconds
        summary.write_seconds = done.write_seconds
    elif changes.removed == 0 and store.exists(top.output_name(config.format)):
        store.remove(INCREMENTS_DIR)
        summary.already_complete = True
        summary.items = items.num_rows
        return summary
    started = time.perf_counter()
    table = assemble(items, todo_mask, previous, labelled, config.keep_columns)
    with store.writing(TABLE) as sink:
        pq.write_table(table, sink)
    if config.format != "parquet":
        merge_parts(store, [TABLE], top.output_name(config.format), config.format)
    store.remove(INCREMENTS_DIR)  # only once the new table is committed
    summary.write_seconds += time.perf_counter() - started
    summary.items = table.num_rows
    summary.ok = int(pc.sum(pc.equal(table["status"], "ok")).as_py() or 0)
    summary.errors = summary.items - summary.ok
    summary.seconds = time.perf_counter() - job.started
    write_json(store, SUMMARY_FILE, summary.to_dict())
    return summary


def assemble(items: pa.Table, todo: pa.Array, previous: pa.Table | None,
             labelled: pa.Table | None, keep_columns) -> pa.Table:
    """Rows in source order: labels of unchanged items from the previous table, the rest
    from tonight's; keys, paths, kept columns and versions always from tonight's source."""
    order = pa.array(range(items.num_rows), pa.int64())
    pieces, positions = [], []
    for source, mask in ((previous, pc.invert(todo)), (labelled, todo)):
        if source is None:
            continue
        keys = items["key"].filter(mask)
        if len(keys) == 0:
            continue
        pieces.append(source.take(pc.index_in(keys, value_set=source["key"].combine_chunks())))
        positions.append(order.filter(mask))
    template = labelled if labelled is not None else previous
    combined = pa.concat_tables([p.select(template.column_names).cast(template.schema)
                                 for p in pieces])
    combined = combined.take(pc.sort_indices(pa.chunked_array(positions)))
    for name in ("key", "path", *keep_columns, *VERSION_COLUMNS):
        combined = combined.set_column(combined.column_names.index(name), name,
                                       items[name].cast(combined.schema.field(name).type))
    return combined
