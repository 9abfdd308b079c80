"""Batches into shard results, and the committer that writes each finished shard's part file."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np
import pyarrow as pa

from pipeline.errors import RunError
from pipeline.plan import Plan
from pipeline.rundir import part_name
from pipeline.storage import Store
from pipeline.prediction import Prediction
from pipeline.writer import ShardResult, part_table, write_part

# Part files waiting for the writer thread at most; beyond that the loop waits (bounded memory).
MAX_PENDING_PARTS = 2


class BatchRows(Protocol):
    """What the commit side reads of a batch (the loader's Batch has it): where its rows
    go in the plan and what became of each, never its pixels (no torch on this side)."""

    indices: list[int]  # plan positions
    decoded: list[int]  # positions in this batch whose image decoded (rows of the prediction)
    widths: list[int]
    heights: list[int]
    errors: list[str | None]


class ShardBuffers:
    """The results of the shards being labelled, filled as their batches arrive."""

    def __init__(self, plan: Plan, top_k: int, embedding_size: int | None):
        self.plan, self.top_k, self.embedding_size = plan, top_k, embedding_size
        self._open: dict[int, tuple[int, ShardResult, list[int]]] = {}  # start, result, left

    def fill(self, batch: BatchRows, prediction: Prediction | None):
        """Put a batch's rows into their shards; yield (shard, result) for each completed.

        A batch spans one shard, sometimes two: the rows are copied per shard, not per image.
        """
        indices = np.asarray(batch.indices)
        decoded = np.zeros(len(indices), bool)
        decoded[batch.decoded] = True
        rank = np.cumsum(decoded) - 1  # a decoded position's row in the prediction
        shards = indices // self.plan.shard_size
        for shard in np.unique(shards).tolist():
            if shard not in self._open:
                start, end = self.plan.shard_bounds(shard)
                self._open[shard] = (start, ShardResult.empty(end - start, self.top_k,
                                                              self.embedding_size), [end - start])
            start, result, left = self._open[shard]
            here = shards == shard
            good = here & decoded
            if good.any():
                rows, found = indices[good] - start, rank[good]
                result.ok[rows] = True
                result.class_ids[rows] = prediction.class_ids[found]
                result.scores[rows] = prediction.scores[found]
                if prediction.embeddings is not None:
                    result.embeddings[rows] = prediction.embeddings[found]
                result.width[rows] = np.asarray(batch.widths)[good]
                result.height[rows] = np.asarray(batch.heights)[good]
            for pos in np.nonzero(here & ~decoded)[0].tolist():
                result.errors[batch.indices[pos] - start] = batch.errors[pos]
            left[0] -= int(here.sum())
            if left[0] == 0:
                del self._open[shard]
                yield shard, result

    def check_all_complete(self) -> None:
        if self._open:
            raise RuntimeError(f"shards {sorted(self._open)} did not receive all their items")


class PartCommitter:
    """Writes and commits part files on a thread beside the compute loop, a bounded few at once."""

    def __init__(self, store: Store, plan: Plan, schema: pa.Schema, categories: list[str]):
        self.store, self.plan, self.schema, self.categories = store, plan, schema, categories
        self.seconds = 0.0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="part-writer")
        self._pending: deque[Future] = deque()

    def submit(self, shard: int, result: ShardResult) -> None:
        while len(self._pending) >= MAX_PENDING_PARTS:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._commit, shard, result))

    def _commit(self, shard: int, result: ShardResult) -> None:
        started = time.perf_counter()
        name = part_name(shard)
        items = self.plan.read_shard(shard)
        try:
            write_part(self.store, name, part_table(items, result, self.categories, self.schema))
        except OSError as exc:
            raise write_failure(exc, self.store.url(name)) from None
        self.seconds += time.perf_counter() - started

    def drain(self) -> None:
        """Wait for every submitted part; re-raises the first failure."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


def write_failure(exc: OSError, where: str | None = None) -> RunError:
    """Disk full, permissions, a vanished mount: one line, and how to carry on."""
    where = where or exc.filename
    prefix = f"cannot write {where}: " if where else ""
    return RunError(f"{prefix}{exc.strerror or exc}; the shards committed so far are intact: "
                    "fix that and run the same command to resume")
