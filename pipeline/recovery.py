"""Recovery: signals, dead loader workers, files that crash the decoder, shared memory."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.errors import Interrupted, ProcessFailure, RunError, notice
from pipeline.loader import PendingItems, PlanItems, init_worker
from pipeline.memory import SHARED_MEMORY, LoaderSize, more_shared_memory
from pipeline.plan import Plan
from pipeline.rundir import QUARANTINE_FILE, add_quarantine, committed_shards, read_quarantine
from pipeline.storage import Store


class WorkerDied(Exception):
    """A loader worker died; `in_flight` holds the items it and the others may have been on."""

    def __init__(self, message: str, in_flight: list[int]):
        super().__init__(message)
        self.in_flight = in_flight


@contextmanager
def stopped_by_signals(store: Store, plan: Plan) -> Iterator[None]:
    """SIGTERM and Ctrl-C end the run as Interrupted, with what is committed by then."""
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        raise Interrupted(signum, len(committed_shards(store)), plan.num_shards) from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(signum)


def release_leaked_logging_lock() -> None:
    """Let go of logging's module lock if an exception from a signal handler left it held.

    Python 3.11 and 3.12's logging take that lock in one call and enter the try that releases
    it only after: an exception raised by a signal handler in between (Ctrl-C, our SIGTERM,
    torch's SIGCHLD handler reporting a dead loader worker) leaves this thread holding it
    (measured: 865 of 2,000 such exceptions landing in logging code did), and the next
    thread to log, s3fs's I/O thread say, waits for it forever. Only call this where this
    thread cannot be inside logging.
    """
    lock = getattr(logging, "_lock", None)
    owned = getattr(lock, "_is_owned", None)
    while owned is not None and owned():
        lock.release()


def loader_failure(exc: BaseException, plan: Plan, pending: list[int], received: int,
                   size: LoaderSize, crop_bytes: int) -> Exception | None:
    """What a loader's exception means: out of shared memory (RunError), a dead worker
    (WorkerDied, with the items that may have been in flight), or None: not ours to read."""
    if _out_of_shared_memory(exc):
        # Something else filled it since the start: not a file's fault, nothing to probe.
        held = size.shared_bytes(crop_bytes)
        return RunError(f"the loader ran out of shared memory in {SHARED_MEMORY}; the "
                        f"shards committed so far are intact: {more_shared_memory(held)}, "
                        "or lower --workers or --batch-size, and run the same command to "
                        "resume")
    if not _worker_died(exc):
        return None
    # Every worker has at most `prefetch` batches asked of it beyond those received.
    window = (size.prefetch * size.workers + 1) * size.batch_size
    in_flight = list(itertools.islice(PendingItems(plan, pending), received, received + window))
    return WorkerDied(f"a loader worker died ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''})", in_flight)


def quarantine_crashers(died: WorkerDied, items: PlanItems, store: Store) -> None:
    """Find the files a dead worker was on that kill a decoder; record them, or give up."""
    found = find_crashers(items, died.in_flight)
    if not found:  # killed from outside (the OOM killer, an operator): not a file's doing
        raise ProcessFailure(f"{died}; committed shards are intact: run the same command to "
                             "resume") from None
    plan = items.plan
    entries = []
    for index, error in sorted(found.items()):
        shard, offset = divmod(index, plan.shard_size)
        key = plan.read_shard(shard, columns=["key"])["key"][offset].as_py()
        entries.append({"index": index, "key": key, "error": error})
    add_quarantine(store, entries)
    items.quarantined.update(found)
    notice(f"{len(found)} file(s) crashed the decoder, first {entries[0]['key']}: they are "
           f"error rows (listed in {store.url(QUARANTINE_FILE)}); carrying on")


def quarantined(store: Store) -> dict[int, str]:
    """Plan index -> the error row's text, for every file found crashing in this run directory."""
    return {entry["index"]: entry["error"] for entry in read_quarantine(store)}


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


def stop_workers(batches) -> None:
    """Stop the loader's workers now, not when the last reference to the iterator goes.

    After a worker dies, the exception's traceback keeps the iterator alive (checked), and
    with it the surviving workers and torch's record of them for its SIGCHLD handler, while
    the decoder probe forks and the next loader starts. torch's own __del__ calls this.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # none without workers
    if shutdown is not None:
        shutdown()


def _out_of_shared_memory(exc: BaseException) -> bool:
    # torch's words: a worker's allocation refused, or a worker killed by SIGBUS touching
    # shared memory that tmpfs could not back.
    text = str(exc)
    return (isinstance(exc, RuntimeError) and "shared memory" in text
            and ("No space left" in text or "Bus error" in text))


def _worker_died(exc: BaseException) -> bool:
    """torch reports a dead worker from its SIGCHLD handler wherever the loop was, or the
    pipe to it breaks mid-batch first; a worker that raised is reported differently."""
    if isinstance(exc, RuntimeError):
        return "DataLoader worker (pid" in str(exc)
    return True  # ConnectionError/EOFError: only the worker pipes are read in this loop
