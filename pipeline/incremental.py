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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import engines, formats
from pipeline.commit import write_failure
from pipeline.config import RunConfig
from pipeline.errors import UsageError
from pipeline.job import Job, prepare
from pipeline.rundir import RunDirectory, increment_dir, output_name
from pipeline.sources import VERSION_COLUMNS, read_items
from pipeline.summary import RunSummary
from pipeline.writer import merge_parts

TABLE = output_name("parquet")  # the night's state, whatever format is asked for
NIGHT = b"label_images.night"  # the state's metadata: which night's commit it is
CHUNK_ROWS = 65_536  # rows assembled (and written as one row group) at a time


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
    same = known
    for column in ("path", *VERSION_COLUMNS):
        same = pc.and_(same, pc.equal(items[column], before[column]))
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


def run(config: RunConfig, *, progress: bool | None = None,
        started: float | None = None) -> RunSummary:
    """`run --incremental`: the same command every night on the same output directory."""
    if config.allow_duplicates:
        raise UsageError("--incremental needs unique keys: it cannot be combined with "
                         "--allow-duplicates")
    if config.num_slices is not None or config.slice_index is not None:
        raise UsageError("--incremental runs as one process; slices are not supported with it")
    engines.engine(config)  # its own checks, before the listing
    job = prepare(config, versions=True, started=started)  # every night lists the source
    items = read_items(job.source, versions=True)
    try:
        with RunDirectory(config.out) as top:
            return _night(top, job, items, job.fingerprint(), progress)
    except OSError as exc:
        raise write_failure(exc) from None


class RowSource:
    """Rows of a Parquet table fetched by index, one row group at a time (bounded memory)."""

    def __init__(self, store, name: str):
        self._file = store.open(name)
        self._parquet = pq.ParquetFile(self._file)
        meta = self._parquet.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.schema = self._parquet.schema_arrow
        self._cached: tuple[int, pa.Table] | None = None

    def columns(self, names: list[str]) -> pa.Table:
        return self._parquet.read(columns=names)

    def _group(self, group: int) -> pa.Table:
        if self._cached is None or self._cached[0] != group:
            self._cached = (group, self._parquet.read_row_group(group))
        return self._cached[1]

    def take(self, indices: np.ndarray) -> pa.Table:
        """The rows at `indices`, in that order."""
        groups = np.searchsorted(self._starts, indices, side="right") - 1
        order = np.argsort(groups, kind="stable")
        indices, groups = indices[order], groups[order]  # once, not once per group
        pieces = [self._group(g).take(indices[groups == g] - self._starts[g])
                  for g in np.unique(groups)]
        table = pa.concat_tables(pieces) if pieces else self.schema.empty_table()
        return table.take(np.argsort(order, kind="stable"))

    def close(self) -> None:
        self._file.close()


def _night(top: RunDirectory, job: Job, items: pa.Table, fingerprint: dict,
           progress: bool | None) -> RunSummary:
    config, store = job.config, top.store
    before = top.check(fingerprint, config.overwrite, refusal=(
        "labels from a different {}; an incremental table never mixes two models: rerun "
        "with --overwrite to relabel everything, or choose another --out"))
    top.record(fingerprint, {"incremental": True, **job.record()}, before)
    previous = RowSource(store, TABLE) if store.exists(TABLE) else None
    try:
        return _label_and_assemble(top, job, items, previous, progress)
    finally:
        if previous is not None:
            previous.close()


def _label_and_assemble(top: RunDirectory, job: Job, items: pa.Table,
                        previous: RowSource | None, progress) -> RunSummary:
    config, store = job.config, top.store
    known = None
    if previous is not None:
        missing = [c for c in VERSION_COLUMNS if c not in previous.schema.names]
        if missing:
            raise UsageError(f"{store.url(TABLE)} was not written by an incremental run (no "
                             f"{', '.join(missing)}); rerun with --overwrite")
        known = previous.columns(["key", "path", *VERSION_COLUMNS])
    todo_mask, changes = classify(items, known)
    todo = items.filter(todo_mask)
    fmt = formats.of(config)
    # what tonight's table holds (the model and the source as listed now): a table format
    # finds its commit again by it, and the next night knows which night its state is
    night = top.commit().properties["label_images.fingerprint"] + _digest(items)
    night = hashlib.sha256(night.encode()).hexdigest()[:32]
    base = None if previous is None else (previous.schema.metadata or {}).get(NIGHT, b"").decode()
    summary = RunSummary(output=top.output(fmt), run_dir=store.url())
    summary.changes = dataclasses.asdict(changes)
    labelled = None
    if todo.num_rows:
        increment = increment_dir(_digest(todo))
        keep = tuple(config.keep_columns) + VERSION_COLUMNS
        sub_job = dataclasses.replace(
            job, items=lambda: [todo],
            config=dataclasses.replace(config, out=store.url(increment), format="parquet",
                                       keep_columns=keep, overwrite=False))
        with RunDirectory(store.url(increment)) as sub:
            done = engines.run_in(sub, sub_job, progress=progress)
        # what the night resolved is what labelled its increment
        top.record(job.fingerprint(), {"incremental": True, **sub_job.record(),
                                 "config": config.to_dict()}, top.read_run())
        summary.device, summary.precision = done.device, done.precision
        summary.settings = done.settings
        labelled = RowSource(store, f"{increment}/{TABLE}")
        summary.labelled_now, summary.loop_seconds = done.labelled_now, done.loop_seconds
        summary.load_seconds, summary.compute_seconds = done.load_seconds, done.compute_seconds
        summary.write_seconds = done.write_seconds
    elif changes.removed == 0 and fmt.holds(store, night):
        top.remove_increments()
        summary.already_complete = True
        summary.items = items.num_rows
        return summary
    started = time.perf_counter()
    try:
        with store.writing(TABLE) as sink:
            summary.ok, upserts = assemble(sink, items, todo_mask, previous, labelled,
                                           config.keep_columns, night)
        removed = None
        if known is not None:
            removed = known["key"].filter(pc.invert(pc.is_in(
                known["key"], value_set=items["key"].combine_chunks()))).combine_chunks()
    finally:
        if labelled is not None:
            labelled.close()
    if config.format != "parquet":
        merge_parts(store, [TABLE], fmt, commit=top.commit(
            night, base=base or None, upserts=upserts, removed=removed))
    top.remove_increments()  # only once the new table is committed
    summary.write_seconds += time.perf_counter() - started
    summary.items = items.num_rows
    summary.errors = summary.items - summary.ok
    summary.seconds = time.perf_counter() - job.started
    top.write_summary(summary.to_dict())
    return summary


def assemble(sink, items: pa.Table, todo: pa.Array, previous: RowSource | None,
             labelled: RowSource | None, keep_columns, night: str) -> tuple[int, list[pa.Table]]:
    """Write the rows in source order, a chunk at a time: labels of unchanged items from the
    previous table, the rest from tonight's; keys, paths, kept columns and versions always
    from tonight's source. Returns how many rows are ok, and tonight's rows (the changes a
    table format commits)."""
    todo = np.asarray(todo, dtype=bool)
    template = (labelled or previous).schema
    template = template.with_metadata({**(template.metadata or {}), NIGHT: night.encode()})
    upserts = []
    where = {}
    for name, source in (("previous", previous), ("labelled", labelled)):
        if source is not None:
            found = pc.index_in(items["key"], value_set=source.columns(["key"])["key"]
                                .combine_chunks())
            where[name] = np.asarray(pc.fill_null(found, -1), dtype=np.int64)
    ok = 0
    with pq.ParquetWriter(sink, template) as writer:
        for start in range(0, items.num_rows, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, items.num_rows)
            pieces, positions = [], []
            for name, source, mask in (("previous", previous, ~todo[start:stop]),
                                       ("labelled", labelled, todo[start:stop])):
                chosen = np.nonzero(mask)[0]
                if source is None or not len(chosen):
                    continue
                pieces.append(source.take(where[name][start:stop][chosen]).select(
                    template.names).cast(template))
                positions.append(chosen)
            chunk = pa.concat_tables(pieces).take(np.argsort(np.concatenate(positions)))
            current = items.slice(start, stop - start)
            for name in ("key", "path", *keep_columns, *VERSION_COLUMNS):
                chunk = chunk.set_column(chunk.schema.get_field_index(name), template.field(name),
                                         current[name].cast(template.field(name).type))
            writer.write_table(chunk)
            ok += int(pc.sum(pc.equal(chunk["status"], "ok")).as_py() or 0)
            if todo[start:stop].any():
                upserts.append(chunk.filter(pa.array(todo[start:stop])))
    return ok, upserts
