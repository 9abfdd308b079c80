"""The cluster half of the engine seam: what any engine that hands shards to workers on other
machines shares, whichever cluster it runs on.

- `ShardQueue`: the pending shards, handed out one at a time. A worker that dies (SIGKILL,
  OOM, its node lost) puts its shard back for another; a shard that has taken down
  MAX_DEATHS workers is a poison shard: the rest finish, and the run ends naming it.
- `ShardWorker`: what runs in a worker process: the job built once (its own settings,
  measured on its machine and cached), then one shard labelled and committed per call,
  straight into the run directory through the usual commit protocol.
- `check_reachable`: a run directory on one machine's own disk is refused before any worker
  starts on a cluster of several nodes.

A cluster engine (engines/ray.py, engines/spark.py) says only where the workers run and how
a death is seen.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter, deque

from pipeline import plan as planning
from pipeline.config import RunConfig
from pipeline.errors import RunError, UsageError
from pipeline.launchers import Slice
from pipeline.rundir import RunDirectory
from pipeline.storage import Store
from pipeline.summary import RunSummary, count

MAX_DEATHS = 3  # workers a shard may take down before it is called a poison shard


class ShardQueue:
    """The pending shards, their workers' deaths, the poison ones and what was redone."""

    def __init__(self, pending: list[int]):
        self._queue = deque(pending)
        self.deaths: Counter[int] = Counter()
        self.poison: list[int] = []
        self._died_at: dict[int, float] = {}  # shard -> when its worker's death was seen

    def __bool__(self) -> bool:
        return bool(self._queue)

    def take(self) -> int | None:
        return self._queue.popleft() if self._queue else None

    def died(self, shard: int) -> None:
        """Its worker's process died: back in the queue, or poison after MAX_DEATHS."""
        self.deaths[shard] += 1
        self._died_at.setdefault(shard, time.perf_counter())
        if self.deaths[shard] >= MAX_DEATHS:
            self.poison.append(shard)
        else:
            self._queue.append(shard)

    def done(self, shard: int, found: dict, worker: dict, summary: RunSummary) -> None:
        """A shard committed by `worker`: its figures added to the worker's and the run's;
        one redone after a death noted with how long after it was committed again."""
        if shard in self._died_at:
            summary.redone.append({"shard": shard, "deaths": self.deaths[shard],
                                   "seconds": round(time.perf_counter()
                                                    - self._died_at.pop(shard), 2)})
        add_figures(found, worker, summary)


def add_figures(found: dict, worker: dict, summary: RunSummary) -> None:
    """One shard's figures (what ShardWorker.label returns) added to its worker's and the
    run's."""
    worker["shards"] += 1
    for name in ("images", "seconds", "loader_restarts"):
        worker[name] += found[name]
    summary.labelled_now += found["images"]
    summary.errors_now += found["errors"]
    summary.load_seconds += found["load_seconds"]
    summary.compute_seconds += found["compute_seconds"]
    summary.write_seconds += found["write_seconds"]


def started(described: dict) -> dict:
    """A worker's description, with its figures at zero."""
    return {**described, "shards": 0, "images": 0, "seconds": 0.0, "loader_restarts": 0}


def rates(workers: list[dict]) -> list[dict]:
    """Each worker's images per second, once the run is over."""
    for worker in workers:
        worker["images_per_second"] = round(
            worker["images"] / worker["seconds"], 1) if worker["seconds"] else 0.0
        worker["seconds"] = round(worker["seconds"], 3)
    return workers


def poison_error(plan, poison: list[int], worker: str) -> RunError:
    """The run's end when shards kept killing their workers: which, and what to do."""
    first = {s: plan.read_shard(s, ["key"])["key"][:3].to_pylist() for s in poison}
    named = "; ".join(f"shard {s} (first keys: {', '.join(map(str, keys))})"
                      for s, keys in first.items())
    return RunError(f"{count(len(poison), 'poison shard')}: {named} took down its {worker} "
                    f"{MAX_DEATHS} times; the other shards are committed: remove or fix those "
                    "images and run the same command again")


def cause(exc: BaseException) -> str:
    """The message of the error a worker raised, on one line, not the cluster's traceback."""
    found = getattr(exc, "cause", None) or exc
    if isinstance(found, (RunError, UsageError)):
        return str(found)
    lines = [line for line in str(found).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(found).__name__


# File systems that only the machine they are on can see: a run directory on one of them
# cannot be reached by workers on other nodes. Any other (nfs, lustre, gpfs, cephfs, fuse
# mounts of buckets...) is taken on trust, and a worker that cannot see the plan says so.
_LOCAL_FILE_SYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "tmpfs",
                       "ramfs", "overlay", "vfat", "exfat", "ntfs", "ntfs3"}


def _file_system(path: str) -> str | None:
    """The type of the file system `path` is on (/proc/mounts' longest mount point)."""
    try:
        with open("/proc/mounts") as fh:
            mounts = [line.split()[1:3] for line in fh]
    except OSError:
        return None
    real = os.path.realpath(path)
    found = [(point, kind) for point, kind in mounts
             if real == point or real.startswith(point.rstrip("/") + "/")]
    return max(found, key=lambda m: len(m[0]))[1] if found else None


def check_reachable(store: Store, nodes: int, cluster: str, worker: str = "worker") -> None:
    """A run directory on this machine's own disk, on a cluster of more than one node, is
    refused before any worker starts: workers elsewhere could not commit into it."""
    if store.remote:
        return
    kind = _file_system(store.url())
    if nodes > 1 and kind in _LOCAL_FILE_SYSTEMS:
        raise UsageError(f"the run directory {store.url()} is on this machine's own disk "
                         f"({kind}) and the {cluster} cluster has {nodes} nodes: every {worker} "
                         "must reach it; use a shared file system or object storage "
                         "(s3://...) for --out")


def per_node(assigned: dict, node: dict) -> int:
    """How many workers like this one its node holds: the node's GPUs (or cores) over this
    worker's. Each sizes its cores, decode workers, shared and pinned memory as that share,
    as torchrun's ranks on one node do."""
    for name in ("GPU", "CPU"):
        if assigned.get(name):
            return max(1, int(node.get(name, 0) // assigned[name]))
    return 1


class ShardWorker:
    """A worker process's labelling: the job built once, then one shard per call."""

    def __init__(self, config: RunConfig, share: int = 1):
        store = Store(config.out)
        if not planning.exists(store):
            raise RunError(f"the run directory {config.out} cannot be seen from "
                           f"{socket.gethostname()}: on a cluster, use a shared file system "
                           "or object storage (s3://...) for --out")
        # Its own settings, measured on this machine (and cached as for any run); the plan
        # is frozen, so the source is not listed again. Whether the last run died is the
        # driver's to know: it holds the run directory.
        from pipeline.job import prepare

        self.job = prepare(config, Slice(per_node=share))
        self.job.decide(store)
        self.run_dir = RunDirectory(config.out)
        self.plan = planning.load(store)

    def describe(self) -> dict:
        settings = self.job.settings
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "device": str(settings.device), "batch_size": settings.batch_size,
                "workers": settings.workers, "per_node": self.job.part.per_node}

    def label(self, shard: int) -> dict:
        """Label and commit one shard (a shard committed before is left as it is); its
        figures, for add_figures."""
        from pipeline import labeller

        summary = RunSummary(output="")
        labeller.label(self.run_dir, self.job, self.plan, summary, progress=False,
                       shards=[shard])
        return {"images": summary.labelled_now, "errors": summary.errors_now,
                "seconds": summary.loop_seconds, "load_seconds": summary.load_seconds,
                "compute_seconds": summary.compute_seconds,
                "write_seconds": summary.write_seconds,
                "loader_restarts": summary.loader_restarts}
