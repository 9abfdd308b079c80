"""Files that crash the decoder: found by decoding again in a child process, kept as error rows."""

from __future__ import annotations

import json
import multiprocessing
import signal

from pipeline.loader import init_worker
from pipeline.plan import Plan
from pipeline.storage import Store
from pipeline.writer import write_json

QUARANTINE_FILE = "quarantine.json"


def load(store: Store) -> dict[int, str]:
    """Plan index -> the error row's text, for every file found crashing in this run directory."""
    text = store.read_text(QUARANTINE_FILE)
    if text is None:
        return {}
    return {entry["index"]: entry["error"] for entry in json.loads(text)["items"]}


def record(store: Store, plan: Plan, found: dict[int, str]) -> list[dict]:
    """Add `found` to the run directory's quarantine; returns the new entries, keys included."""
    text = store.read_text(QUARANTINE_FILE)
    entries = json.loads(text)["items"] if text is not None else []
    for index, error in sorted(found.items()):
        shard, offset = divmod(index, plan.shard_size)
        key = plan.read_shard(shard, columns=["key"])["key"][offset].as_py()
        entries.append({"index": index, "key": key, "error": error})
    write_json(store, QUARANTINE_FILE, {"items": entries})
    return entries[-len(found):]


def find_crashers(items, indices: list[int]) -> dict[int, str]:
    """Decode `indices` in order, one at a time, in a child process; the ones it died on.

    `items` is the loader's dataset, so each file is read and decoded exactly as a loader
    worker does. A child that dies is replaced and carries on after the file it died on.
    """
    context = multiprocessing.get_context("fork")  # as the loader's workers: no re-import
    found: dict[int, str] = {}
    remaining = list(indices)
    while remaining:
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_decode_each, args=(items, remaining, sender),
                                daemon=True)
        child.start()
        sender.close()  # the child's copy is the only one left: EOF when the child ends
        last = None
        while True:
            try:
                last = receiver.recv()
            except EOFError:
                break
        child.join()
        receiver.close()
        if child.exitcode >= 0 or last is None:
            # All decoded; or an exception of ours, or a death before any file: none of
            # these is a file's doing, and blaming the next one would only spread the blame.
            break
        killed_by = signal.Signals(-child.exitcode).name
        found[last] = f"the decoder crashed on this file ({killed_by})"
        remaining = remaining[remaining.index(last) + 1:]
    return found


def _decode_each(items, indices: list[int], sender) -> None:
    init_worker()
    for index in indices:
        sender.send(index)  # before decoding: if this file kills us, the parent knows which
        items[index]
