"""A finished run asked for again: answered from its run directory, before torch is imported.

The whole path (runner.run) loads the model and measures the machine before it finds the
table complete: seconds for a `nothing to do`. When the run directory's record shows the
same job, finished and tidy, this answers at once, saying whether the source has changed
since. Anything it is not sure of (a changed option, weights file or library, a run that
did not end cleanly) goes the whole way, which decides the same, slower. Writes nothing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os

from pipeline import formats, keys, launchers, plan as planning
from pipeline.config import DEFAULT_TOP_K, RunConfig
from pipeline.errors import UsageError
from pipeline.plan import Plan
from pipeline.progress import if_long
from pipeline.rundir import PARTS_DIR, Recorded, RunDirectory, ended_abruptly, recorded
from pipeline.sources import VERSION_COLUMNS, listing, open_source
from pipeline.storage import Store
from pipeline.summary import RunSummary

# The options the fingerprint stands for (the labels and the rows), and where the table is
SAME_JOB = ("model", "weights", "resize", "crop", "input_mode", "embeddings", "source",
            "path_column", "id_column", "root", "image_column", "keep_columns",
            "allow_duplicates", "format", "table", "catalog")


def answer(config: RunConfig) -> RunSummary | None:
    """The summary of the finished run `config` asks for again, or None: go the whole way."""
    if (config.overwrite or config.incremental or config.engine != "local" or config.labels
            or not config.model.isidentifier()):  # a labels file, a Keras file: the whole way
        return None
    part = launchers.from_environment(config.num_slices, config.slice_index)
    if not part.whole or part.distributed:
        return None
    store = Store(config.out)
    try:
        record = recorded(store)
        if not record or not _same_job(config, record):
            return None
        fmt = formats.of(config)
        run_dir = RunDirectory(config.out, part)  # not entered: no lock, nothing written
        if not (fmt.exists(store) and run_dir.has_summary() and run_dir.has_plan()) \
                or store.exists(PARTS_DIR) or ended_abruptly(store, part) is not None:
            return None
        plan = planning.load(store)
    except (OSError, UsageError, ValueError, KeyError, TypeError):
        return None  # anything unreadable: the whole way says what it is
    summary = RunSummary(output=run_dir.output(fmt), run_dir=store.url(), resumed=True,
                         already_complete=True, items=plan.num_items)
    summary.stale = stale(config, plan, store)
    return summary


def _same_job(config: RunConfig, record: Recorded) -> bool:
    asked, recorded_config = config.to_dict(), record.config
    fingerprint = record.fingerprint
    if any(asked.get(name) != recorded_config.get(name) for name in SAME_JOB):
        return False
    top_k = config.top_k or min(DEFAULT_TOP_K, int(fingerprint.get("num_classes", 0)))
    if top_k != recorded_config.get("top_k") or top_k != fingerprint.get("top_k"):
        return False
    if os.path.isfile(config.weights) and fingerprint.get("weights") != _sha256(config.weights):
        return False  # the same path, other weights
    # a library that builds the model or reads the pixels, upgraded since: the whole way
    for name, version in (record.get("versions") or {}).items():
        try:
            # torch records its build (2.14.1+cu130), its package metadata the release
            if importlib.metadata.version(name).split("+")[0] != str(version).split("+")[0]:
                return False
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def stale(config: RunConfig, plan: Plan, store: Store, items=None) -> str:
    """What a finished run's source gained and lost since its plan was frozen, and what to
    rerun with: a nightly job must not report success on yesterday's images without a word.
    Compared out of core: the listing and the plan are streamed, never held. `items`: the
    listing, if the caller has it (else the source is listed here)."""
    # what identifies an image besides its key, where the plan recorded it: its path and,
    # where the listing brings them, its size and version (a changed photo, same name)
    stamp = ["key", "path", *(c for c in VERSION_COLUMNS if c in plan.schema().names)]
    try:
        source = open_source(config.source_spec())
        if items is None:
            items = listing(source, source.lists_versions)
        items = (table.select([c for c in stamp if c in table.column_names]) for table in items)
        with if_long(f"listing {config.source} again to see what changed since this run",
                     not config.quiet):
            new, changed, removed = keys.changes(plan.batches(stamp), items, store)
    except UsageError as exc:  # e.g. no images there any more: the table stands as it is
        return f"but listing {config.source} again fails: {exc}"
    if not new and not changed and not removed:
        return ""
    return (f"but {config.source} has changed since this run was planned ({new} new, "
            f"{changed} changed, {removed} removed): rerun with --incremental to label only "
            "what is new or changed (this table is taken over, and --incremental keeps it up "
            "to date each night), or with --overwrite to relabel everything")
