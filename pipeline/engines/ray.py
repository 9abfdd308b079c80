"""The Ray engine (`--engine ray`): the driver freezes the plan, actors take shards as they free up.

The driver opens the run directory, takes its lock and freezes the plan exactly as a local
run does; each actor is a cluster.ShardWorker, handed one pending shard at a time from a
cluster.ShardQueue (deaths, retries and poison shards are the queue's). This module holds
Ray's calls: connecting, starting actors where there is room, seeing a death or a lost node
or cluster, and never waiting on a cluster that is gone. The driver merges at the end; if it
dies, the same command resumes from the committed parts.
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

from pipeline.config import RunConfig
import pipeline.engines.cluster as cluster
from pipeline.engines.base import Engine
from pipeline.engines.cluster import ShardQueue, ShardWorker, cause
from pipeline.errors import ProcessFailure, RunError, UsageError, notice
from pipeline.launchers import Slice
from pipeline.options import Option, declared
from pipeline.progress import progress_bar
from pipeline.rundir import committed_shards
from pipeline.summary import RunSummary, count

_CONNECT_TIMEOUT_S = 5
# Between waits of CHECK_SECONDS for a shard, the cluster is asked whether it is there; an
# answer that does not come within the bound (LABEL_IMAGES_RAY_TIMEOUT, seconds) ends the
# run in one line, resumable: a nightly job never hangs on a cluster that died under it.
CHECK_SECONDS = 5
RAY_TIMEOUT_SECONDS = 60
ROOM_SECONDS = 300  # waiting for room for an actor (LABEL_IMAGES_RAY_ROOM_TIMEOUT)
SAY_AFTER_SECONDS = 10  # a wait for room longer than this is said


class RayEngine(Engine):
    """Actors take the pending shards from a queue as they free up."""

    name = "ray"
    labels_here = False  # the actors label; the driver keeps no model on its GPU
    options = (
        Option("ray_address", str, "--engine ray: the cluster (auto, ray://host:10001, "
                                   "host:6379) (default: the running cluster, else a local "
                                   "Ray for the job)"),
        Option("actors", int, "--engine ray: labelling actors (default: one per GPU in the "
                              "cluster; on CPU nodes one per node, each with the node's "
                              "cores)", valid=lambda n: n >= 1, must="must be at least 1"))

    def check(self, config: RunConfig) -> None:
        """What --engine ray refuses before any work."""
        _import_ray()
        if config.num_slices is not None or config.slice_index is not None:
            raise UsageError("--engine ray hands the shards out itself: it cannot be "
                             "combined with --num-slices or --slice-index")

    @contextmanager
    def session(self, job, store):
        """Connected to the cluster, which must reach the run directory, before the plan."""
        ray = _import_ray()
        _connect(ray, declared(self, job.config.options).get("ray_address"))
        cluster.check_reachable(store, len(_alive_nodes(ray)), "Ray", "actor")
        yield None

    def label(self, run_dir, job, plan, shards, summary, progress) -> None:
        """The pending shards labelled by actors; a poison shard ends the run once the
        others are committed."""
        ray, config, store = _import_ray(), job.config, run_dir.store
        committed = committed_shards(store)
        pending = [s for s in shards if s not in committed]
        show = (not config.quiet) if progress is None else progress
        try:
            summary.cluster_workers, poison = _label_on_actors(
                ray, config, plan, pending, summary, lambda: progress_bar(
                    plan.num_items, plan.num_items - plan.items_in(pending), show, Slice()))
        except ClusterLost:
            # Ray's own shutdown at exit would wait for the cluster that is gone
            atexit.unregister(ray.shutdown)
            raise
        run_dir.record_engine(summary.engine_record(self.name))
        if poison:
            raise cluster.poison_error(plan, poison, "actor")


ENGINE = RayEngine()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'label-images[ray]'") from None
    return ray


def _connect(ray, address: str | None) -> None:
    """Join the cluster at `address` (or the running one, else start a local Ray). An
    address nobody answers at is one line at once: Ray itself waits for minutes."""
    if address not in (None, "auto", "local"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or address, int(port or 6379)),
                                     timeout=_CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as exc:
            raise UsageError(f"--ray-address {address}: no Ray cluster answers there "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
    if ray.is_initialized():  # a caller's own ray.init (a script, the tests): theirs
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    except ConnectionError as exc:
        raise UsageError(f"--ray-address {address}: {' '.join(str(exc).split())}") from None


def _label_on_actors(ray, config: RunConfig, plan, pending: list[int], summary: RunSummary,
                     make_bar) -> tuple[list[dict], list[int]]:
    """Hand the pending shards to actors one at a time as each frees up; a dead actor's
    shard goes back to the queue, to another (new) actor. Each actor's figures, and the
    poison shards.

    One clock for the rate: the bar and the summary's loop both start once the first
    actors are up (they start together), so every actor's labelling falls inside it."""
    labeller = ray.remote(RayShardWorker)
    resources = _actor_resources(ray, config)
    queue = ShardQueue(pending)
    stats: list[dict] = []

    def start(count: int = 1) -> list[tuple[object, dict]]:
        actors = [labeller.options(**resources).remote(replace(config, quiet=True))
                  for _ in range(count)]
        try:  # bounded, the cluster checked as it waits: an actor may never start
            described = [cluster.started(d) for d in _when_started(ray, actors, resources)]
        except ray.exceptions.RayActorError as exc:
            _check_cluster(ray)  # this node gone: said as such
            raise RunError(f"a labelling actor could not start ({cause(exc)}); the "
                           "committed shards are intact: run the same command again to "
                           "resume") from None
        stats.extend(described)
        return list(zip(actors, described))

    in_flight: dict = {}

    def feed(actor, described) -> None:
        shard = queue.take()
        if shard is not None:
            in_flight[actor.label.remote(shard)] = (actor, described, shard)

    asked = _actor_count(ray, config)
    if _actors_asked(config) and asked > len(pending):
        notice(f"--actors {asked}: {count(len(pending), 'shard')} to label, so "
               f"{count(len(pending), 'actor')} started")
    first = start(min(asked, len(pending)))
    bar, started = make_bar(), time.perf_counter()  # the loop: from when they are up
    try:
        for actor, described in first:
            feed(actor, described)
        while in_flight:
            done = _next_done(ray, in_flight)
            actor, described, shard = in_flight.pop(done)
            try:
                found = ray.get(done)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                if (isinstance(exc, ray.exceptions.RayTaskError)
                        and not isinstance(getattr(exc, "cause", None), ProcessFailure)):
                    raise RunError(cause(exc)) from None  # about the job: the store, a table
                # the actor's process (SIGKILL, OOM, a decode worker killed, its node lost):
                # the shard goes to a fresh actor elsewhere
                ray.kill(actor, no_restart=True)
                node_lost = not any(n.startswith(described["node"]) for n in _alive_nodes(ray))
                if node_lost:  # its whole node went: say which
                    described["node_lost"] = True
                    if described["node"] not in summary.lost_nodes:
                        summary.lost_nodes.append(described["node"])
                described["died"] = True
                queue.died(shard)
                # a fresh actor in its place (its resources come back), or where there is
                # room if its node is gone; else the living actors take the shard
                if queue and (not in_flight or not node_lost or _room_for(ray, resources)):
                    feed(*start()[0])
                continue
            queue.done(shard, found, described, summary)
            bar.advance(found["images"], found["errors"])
            feed(actor, described)
    finally:
        bar.close()
    summary.loop_seconds = time.perf_counter() - started
    return cluster.rates(stats), sorted(queue.poison)


def _when_started(ray, actors: list, resources: dict) -> list[dict]:
    """The actors' descriptions once all are up. Between waits of CHECK_SECONDS the cluster
    is asked whether this node is still there (gone: ClusterLost, within seconds, not after
    the bound); a longer wait (room that an autoscaler may add in minutes) says what it
    waits for, and ends the run after room_timeout()."""
    asked = [actor.describe.remote() for actor in actors]
    started, said = time.monotonic(), False
    while True:
        ready, _ = ray.wait(asked, num_returns=len(asked), timeout=CHECK_SECONDS)
        if len(ready) == len(asked):
            return ray.get(asked)  # an actor that died on the way raises RayActorError
        _check_cluster(ray)
        waited = time.monotonic() - started
        if waited > room_timeout():
            raise RunError(f"no room in the Ray cluster for {count(len(actors), 'actor')} "
                           f"({resources}) within {room_timeout():.0f} s; the committed "
                           "shards are intact: run the same command again") from None
        if not said and waited >= SAY_AFTER_SECONDS:
            notice(f"waiting for {count(len(asked) - len(ready), 'labelling actor')} "
                   f"({resources} each) to start: building the model, or waiting for room "
                   f"in the Ray cluster; it is checked every {CHECK_SECONDS} s, and the run "
                   f"ends after {room_timeout():.0f} s")
            said = True


def room_timeout() -> float:
    """How long to wait for room for an actor: an autoscaler adding a node takes minutes."""
    return max(ray_timeout(), float(os.environ.get("LABEL_IMAGES_RAY_ROOM_TIMEOUT",
                                                   ROOM_SECONDS)))


def _next_done(ray, in_flight: dict):
    """The next shard's result to be ready; between waits the cluster must answer."""
    while True:
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=CHECK_SECONDS)
        if ready:
            return ready[0]
        _check_cluster(ray)


def ray_timeout() -> float:
    return float(os.environ.get("LABEL_IMAGES_RAY_TIMEOUT", RAY_TIMEOUT_SECONDS))


def _check_cluster(ray) -> None:
    """The cluster answers within ray_timeout() and still has this node: else one line."""
    here = ray.get_runtime_context().get_node_id()
    if here not in _alive_nodes(ray):
        raise ClusterLost(f"this machine's Ray node ({here[:12]}) is gone (its raylet "
                          "died); the committed shards are intact: run the same command "
                          "again to resume")


def _alive_nodes(ray) -> set[str]:
    """The ids of the nodes alive, as the cluster says within ray_timeout(); ClusterLost if
    it says nothing by then."""
    answer: dict = {}

    def ask() -> None:
        try:
            answer["nodes"] = ray.nodes()
        except Exception as exc:  # noqa: BLE001 - whatever Ray raises, the cluster is gone
            answer["error"] = exc

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(ray_timeout())
    if "nodes" not in answer:
        raise ClusterLost(f"the Ray cluster did not answer within {ray_timeout():.0f} s (its "
                          "head node or GCS is gone); the committed shards are intact: run "
                          "the same command again to resume")
    return {n["NodeID"] for n in answer["nodes"] if n.get("Alive")}


class ClusterLost(RunError):
    """The cluster under the driver is gone: the run ends; Ray is not asked to shut down
    (it would wait for what is gone), and the process ends once the line is said, without
    the interpreter's teardown: Ray's native client, its node dead, crashed there (SIGSEGV,
    seen once in CI) instead of exiting 1."""

    exit_at_once = True


def _room_for(ray, resources: dict) -> bool:
    """Whether the cluster has what one more actor asks for, free now."""
    free = ray.available_resources()
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    return all(free.get(names[name], 0) >= amount for name, amount in resources.items())


def _actors_asked(config: RunConfig) -> int | None:
    return declared(ENGINE, config.options).get("actors")


def _actor_count(ray, config: RunConfig) -> int:
    """--actors, else one per GPU in the cluster, else one per alive node."""
    if _actors_asked(config):
        return _actors_asked(config)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return gpus or len([n for n in ray.nodes() if n.get("Alive")])


def _actor_resources(ray, config: RunConfig) -> dict:
    """A GPU each where the cluster has them; on CPUs, a node's cores shared among the
    actors it holds (a node's worth each by default)."""
    resources = ray.cluster_resources()
    if resources.get("GPU"):
        return {"num_gpus": 1}
    nodes = max(1, len([n for n in ray.nodes() if n.get("Alive")]))
    per_node = max(1, -(-_actor_count(ray, config) // nodes))
    return {"num_cpus": max(1, int(resources.get("CPU", 1)) // nodes // per_node)}


class RayShardWorker(ShardWorker):
    """An actor (wrapped by ray.remote): a ShardWorker sized as its share of its node."""

    def __init__(self, config: RunConfig):
        import ray

        context = ray.get_runtime_context()
        node = next((n["Resources"] for n in ray.nodes()
                     if n["NodeID"] == context.get_node_id()), {})
        super().__init__(config, cluster.per_node(context.get_assigned_resources(), node))

    def describe(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id()[:12], **super().describe()}
