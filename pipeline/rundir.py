"""The run directory, its one owner: every file name in it, its lock, its JSON records.

```
run.json          the resolved configuration, versions and the fingerprint of the job
plan.json         the frozen plan's commit: how many items, the shard size, its folder
plan/ID/          items-000000.parquet ...: the frozen items, 1,024 shards a file
parts/            part-000000.parquet ... one committed file per finished shard
increments/       an incremental night's labelling of new and changed images
parts.json        a nightly table's parts: their key ranges, rows and label counts
.night/NIGHT/     a night's parts before its commit (parts-commit.json: the commit's intent)
quarantine.json   files that crashed the decoder (error rows)
summary.json      counts and timings of the last invocation
labels.parquet    the final table (or labels.csv; a nightly run's: a folder of parts)
```
"""

from __future__ import annotations

import errno
import faulthandler
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

from pipeline import formats
from pipeline.formats.base import Commit, Format
from pipeline.errors import RunError, UsageError
from pipeline.launchers import Slice
from pipeline.storage import TMP_MARK, Store, remove_temporaries

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
PLAN_RECORD = "plan.json"
PLAN_DIR = "plan"
LEGACY_PLAN_FILE = "plan.parquet"  # the one-file plan of earlier versions, still read
# Local scratch of the out-of-core checks (keys spooled, DuckDB spilling): a killed run's is
# removed by the next one to take the directory.
SPILL_PREFIX = ".spill-"
PARTS_DIR = "parts"
INCREMENTS_DIR = "increments"
# A nightly table's parts (night_table.py): their index, a commit's intent, the staged parts
TABLE_INDEX = "parts.json"
TABLE_COMMIT = "parts-commit.json"
STAGING_DIR = ".night"
QUARANTINE_FILE = "quarantine.json"
REVIEWS_FILE = "reviews.parquet"  # people's answers (label-images reviews): key, label, who, when
AGREEMENT_FILE = "agreement.json"  # the model's agreement with them, night by night
AGREEMENT_KEPT = 400  # entries: a year of nights and then some
LOCK_FILE = ".lock"
_PART_NAME = re.compile(r"^part-(\d{6})\.parquet$")


def output_name(fmt: str) -> str:
    """The final table in `fmt`: labels.parquet, labels.csv, ... (its format names it)."""
    return formats.get(fmt).table_name()


def plan_file(folder: str, index: int) -> str:
    return f"{folder}/items-{index:06d}.parquet"


def part_name(shard: int) -> str:
    return f"{PARTS_DIR}/part-{shard:06d}.parquet"


def shard_of_part(name: str) -> int | None:
    """The shard a part file name (without its directory) belongs to; None for other names."""
    match = _PART_NAME.match(name)
    return int(match.group(1)) if match else None


def committed_shards(store: Store) -> set[int]:
    """Shards whose part file was committed; temporaries and aborted uploads do not count."""
    return {shard for shard in map(shard_of_part, store.list(PARTS_DIR)) if shard is not None}


def increment_dir(digest: str) -> str:
    return within(INCREMENTS_DIR, digest)


def within(folder: str, name: str) -> str:
    """A name inside a folder of the run directory (an increment's table, say)."""
    return f"{folder}/{name}"


def write_json(store: Store, name: str, data: dict) -> None:
    store.write_text(name, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(store: Store, name: str) -> dict | None:
    text = store.read_text(name)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise UsageError(f"{store.url(name)} is damaged; rerun with --overwrite to start "
                         "afresh") from None


class Recorded(dict):
    """A run directory's run.json, as every later command reads it (export, reviews, report,
    fit, relabel, a resume): the one place its keys are named. Empty where there is none."""

    @property
    def config(self) -> dict:
        return self.get("config") or {}

    @property
    def fingerprint(self) -> dict:
        return self.get("fingerprint") or {}

    @property
    def resolved(self) -> dict:
        return self.get("resolved") or {}

    @property
    def started_at(self) -> str:
        return self.get("started_at", "")

    @property
    def labelled_with(self) -> str:
        """What labelled the table, in a few words: a fitted head, or model and weights."""
        fit = self.get("fit")
        if fit:
            return f"head fitted on {fit.get('answers')} answers"
        weights = str(self.config.get("weights", ""))
        return f"{self.config.get('model', '')} {os.path.basename(weights)}".strip()

    @property
    def backbone(self) -> str:
        """The weights the table's embeddings came from: kept through fitted heads."""
        return self.get("backbone") or self.fingerprint.get("weights", "")


def recorded(store: Store) -> Recorded:
    """The run's record (empty if the directory holds none)."""
    return Recorded(read_json(store, RUN_FILE) or {})


def finished_run(out: str) -> Recorded:
    """The record of the run a finished table in OUT came from; a one-line refusal where
    OUT holds no run."""
    found = recorded(Store(out))
    if not found.config:
        raise UsageError(f"{out} holds no label-images run (no run.json)")
    return found


def finished_table(out: str) -> tuple[Store, formats.Format]:
    """Where the finished table is, in whichever format the run wrote it."""
    store = Store(out)
    config = recorded(store).config
    asked = []  # the run's own format first, where its options put the table
    if config.get("format") in formats.FORMATS:
        asked.append(formats.recorded(config))
    for fmt in [*asked, *formats.FORMATS.values()]:
        if fmt.exists(store):
            return store, fmt
    names = ", ".join(f.table_name() for f in formats.FORMATS.values())
    raise UsageError(f"no finished table in {out} ({names}); "
                     "run `label-images run` to the end first")


def agreement_history(store: Store) -> list[dict]:
    """The model's agreement with people's answers as each night (or reading of answers)
    measured it, oldest first."""
    return (read_json(store, AGREEMENT_FILE) or {}).get("entries", [])


def add_agreement(store: Store, entry: dict) -> None:
    """One more measurement of the agreement, kept with the last AGREEMENT_KEPT."""
    entries = [*agreement_history(store), entry][-AGREEMENT_KEPT:]
    write_json(store, AGREEMENT_FILE, {"entries": entries})


def summary_of(store: Store) -> dict:
    """The last run's summary.json (empty if none)."""
    return read_json(store, SUMMARY_FILE) or {}


def read_quarantine(store: Store) -> list[dict]:
    """Entries {index, key, error} of the files found crashing the decoder here."""
    record = read_json(store, QUARANTINE_FILE)
    return record["items"] if record else []


def add_quarantine(store: Store, entries: list[dict]) -> None:
    write_json(store, QUARANTINE_FILE, {"items": read_quarantine(store) + entries})


def lock_name(part: Slice) -> str:
    # Slices of one job run side by side, each with a lock of its own.
    return LOCK_FILE if part.whole else f"{LOCK_FILE}-{part.index}-of-{part.count}"


def ended_abruptly(store: Store, part: Slice = Slice()) -> str | None:
    """How the last run here died holding the directory, if it did: "crashed" when a fatal
    signal (a decoder's segfault) left Python's fault trace after its pid in the lock file,
    "killed" when only the pid is there (SIGKILL, the OOM killer, a lost machine): a run
    ending any other way empties it. Read-only, before the run takes the lock; object-store
    prefixes have no lock to tell."""
    if store.remote:
        return None
    try:
        with open(Path(store.root) / lock_name(part), "rb") as fh:
            held = fh.read(1 << 16)
    except OSError:
        return None
    if not held.strip():
        return None
    return "crashed" if b"Fatal Python error" in held else "killed"


class RunDirectory:
    """An output directory held by one run at a time; a killed run's lock goes with it.

    Local directories are locked (a POSIX lock); object-store prefixes cannot be, so two runs
    on one s3:// prefix at once are not detected there.
    """

    def __init__(self, location: str, part: Slice = Slice()):
        self.store = Store(str(location))
        self.part = part
        self._lock_fd: int | None = None

    def __enter__(self) -> RunDirectory:
        self._created = not self.store.remote and not os.path.isdir(self.store.root)
        try:
            self.store.makedirs()
        except OSError as exc:
            raise RunError(f"cannot create output directory {self.store.url()}: "
                           f"{exc.strerror or exc}") from None
        if not self.store.remote:
            self._lock(Path(self.store.root))
        return self

    def _lock(self, path: Path) -> None:
        fd = os.open(path / lock_name(self.part), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # A POSIX record lock, not flock: forked loader workers do not inherit it, so a
            # killed run's orphaned workers cannot keep the next run out; the kernel drops
            # it when the process dies, so a lock is never left behind.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            which = "" if self.part.whole else f" ({self.part.describe()})"
            raise RunError(f"another label-images run{which} (pid {holder}) is using "
                           f"{path}; wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.lseek(fd, 0, os.SEEK_END)
        # A fatal signal writes Python's trace after the pid: how the next run tells a
        # crash (a file that kills the decoder) from a kill, which leaves only the pid.
        self._faults_were_shown = faulthandler.is_enabled()
        faulthandler.enable(file=fd, all_threads=True)
        self._lock_fd = fd
        # Only temporaries nobody else can be writing: this slice's own parts, and the
        # top-level files when no other slice can be running.
        if self.part.whole:
            remove_temporaries(path)
            for entry in os.scandir(path):
                if entry.name.startswith(SPILL_PREFIX) and entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
            self._remove_unplanned(path)
        remove_temporaries(path / PARTS_DIR, owned=self._owns_temporary)

    def _remove_unplanned(self, path: Path) -> None:
        """Files of a listing killed before its plan.json: no plan names them."""
        try:
            planned = (read_json(self.store, PLAN_RECORD) or {}).get("folder")
        except UsageError:  # a damaged plan.json is said where the plan is loaded
            return
        folders = path / PLAN_DIR
        if folders.is_dir():
            for entry in os.scandir(folders):
                if f"{PLAN_DIR}/{entry.name}" != planned and entry.is_dir():
                    shutil.rmtree(entry.path, ignore_errors=True)

    def _owns_temporary(self, name: str) -> bool:
        # atomic_path's naming: "." + the committed name + TMP_MARK + a unique tag
        shard = shard_of_part(name.removeprefix(".").partition(TMP_MARK)[0])
        return shard is not None and self.part.owns(shard)

    def __exit__(self, kind, *exc_info) -> None:
        self._unlock()
        if kind is not None and issubclass(kind, UsageError) and self._created:
            # refused (a source with no images, a key twice) in a directory made for this
            # run: nothing of it is left, as when a refusal comes before the directory
            shutil.rmtree(self.store.root, ignore_errors=True)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            faulthandler.disable()
            if self._faults_were_shown:  # as before the run (pytest's, python -X faulthandler)
                faulthandler.enable(file=sys.__stderr__, all_threads=True)
            os.ftruncate(self._lock_fd, 0)  # ended, not abruptly
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def output(self, fmt: Format) -> str:
        """Where readers find the table: a file here, or a table format's table."""
        return fmt.location(self.store)

    def read_run(self) -> dict | None:
        return read_json(self.store, RUN_FILE)

    def record_engine(self, engine: dict) -> None:
        """run.json gains what the engine did (who labelled what, where)."""
        record = self.read_run() or {}
        write_json(self.store, RUN_FILE, {**record, **engine})

    def write_summary(self, summary: dict) -> None:
        write_json(self.store, SUMMARY_FILE, summary)

    def has_summary(self) -> bool:
        return self.store.exists(SUMMARY_FILE)

    def has_plan(self) -> bool:
        return self.store.exists(PLAN_RECORD) or self.store.exists(LEGACY_PLAN_FILE)

    def is_finished(self, fmt: Format, whole: bool = True) -> bool:
        """The table is committed in `fmt`, or (for one process) in Parquet, to convert from."""
        return fmt.exists(self.store) or (whole and formats.get("parquet").exists(self.store))

    def commit(self, commit_id: str | None = None, **night) -> Commit:
        """What the table's commit records: the run's id (or a night's), the fingerprint's
        digest, model and weights; `night`: an incremental night's changes (Commit)."""
        record = self.read_run() or {}
        fingerprint = record.get("fingerprint", {})
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        properties = {"label_images.run_id": str(record.get("run_id")),
                      "label_images.fingerprint": digest,
                      "label_images.model": str(fingerprint.get("model")),
                      "label_images.weights": str(fingerprint.get("weights")),
                      "label_images.run_dir": self.store.url()}
        return Commit(id=commit_id or str(record.get("run_id")), properties=properties, **night)

    def remove_parts(self) -> None:
        self.store.remove(PARTS_DIR)  # only once the whole table is committed

    def remove_increments(self) -> None:
        self.store.remove(INCREMENTS_DIR)  # only once the new table is committed

    def clear(self) -> None:
        """Forget a previous run: only the files this tool writes are removed."""
        # a table format's table stays (its history is its own): only its note of the run goes
        owned = [name for f in formats.FORMATS.values() for name in f.run_files()]
        for name in (RUN_FILE, SUMMARY_FILE, PLAN_RECORD, PLAN_DIR, LEGACY_PLAN_FILE, *owned,
                     PARTS_DIR, INCREMENTS_DIR, QUARANTINE_FILE, TABLE_INDEX, TABLE_COMMIT,
                     STAGING_DIR):
            self.store.remove(name)

    def check(self, fingerprint: dict, overwrite: bool,
              refusal: str = "a run with a different {}; rerun with --overwrite to start "
                             "afresh, or choose another --out") -> dict | None:
        """A previous run here is the same job (or is forgotten, with overwrite); its
        record, None if there is none. Writes nothing but what overwrite removes."""
        if overwrite:
            self.clear()
        previous = self.read_run()
        if previous is not None:
            before = previous.get("fingerprint", {})
            # Runs before the plan was frozen for good fingerprinted the listed items too.
            for legacy in ("items", "items_sha256"):
                before.get("source", {}).pop(legacy, None)
            differences = describe_differences(before, fingerprint)
            if differences:
                raise UsageError(
                    f"{self.store.url()} holds {refusal.format('; '.join(differences))}")
        return previous

    def record(self, fingerprint: dict, record: dict, previous: dict | None) -> None:
        """run.json: the fingerprint, the run's id (kept through resumes: a table format's
        commit is found again by it) and what was resolved."""
        run_id = (previous or {}).get("run_id") or uuid.uuid4().hex
        write_json(self.store, RUN_FILE, {"fingerprint": fingerprint, "run_id": run_id,
                                          **record})


def describe_differences(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Human-readable 'what changed' between two fingerprints, e.g. 'top_k (5 -> 3)'."""
    differences = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        name = f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            differences += describe_differences(old, new, prefix=f"{name}.")
        elif isinstance(old, str) and len(old) > 40 or isinstance(new, str) and len(new) > 40:
            differences.append(f"{name} (changed)")
        else:
            differences.append(f"{name} ({old} -> {new})")
    return differences
