"""The Spark engine (`--engine spark`): for teams whose cluster is Spark; a shard is a task.

The driver freezes the plan as a local run does, then runs one Spark job whose tasks are the
pending shards (one partition each). A task's Python worker builds the job once
(cluster.ShardWorker, kept for the worker's later tasks: Spark reuses its Python workers)
and labels and commits its shard straight into the run directory. Spark's own retries take
a task whose executor or Python worker died elsewhere; a retry or a speculative copy of a
shard already committed finds it committed and writes nothing, and a shard's part is
written whole under one name, so no shard is ever in the table twice. A shard that fails
every retry (spark.task.maxFailures) is a poison shard: the others are run again without
it, and the run ends naming it. The driver merges at the end; if it dies, the same command
resumes from the committed parts.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import pipeline.engines.cluster as cluster
from pipeline.config import RunConfig
from pipeline.engines.base import Engine
from pipeline.errors import RunError, UsageError, notice
from pipeline.launchers import Slice
from pipeline.options import Option, declared
from pipeline.progress import if_long, progress_bar
from pipeline.rundir import committed_shards
from pipeline.summary import count

POLL_SECONDS = 2  # how often the driver looks at the committed shards (the bar) and executors
# A job with no executor for this long (LABEL_IMAGES_SPARK_TIMEOUT, seconds) is cancelled:
# workers that all died, a cluster with no room: a nightly job never waits on nothing.
NO_EXECUTOR_SECONDS = 300
_FAILED_TASK = re.compile(r"Task (\d+) in stage [\d.]+ failed (\d+) times")
# what a task's own Python error says when it is the job's (the store, the table), not a death
_OUR_ERRORS = re.compile(r"pipeline\.errors\.(?:RunError|UsageError)|(?:RunError|UsageError): ")


class SparkEngine(Engine):
    """Spark's scheduler hands the pending shards, a task each, to its executors."""

    name = "spark"
    labels_here = False  # the executors label; the driver keeps no model on its GPU
    options = (
        Option("spark_master", str, "--engine spark: the master (spark://HOST:7077, "
               "local[N]) (default: spark-submit's, else local[*])"),
    )

    def check(self, config: RunConfig) -> None:
        _import_pyspark()
        if config.num_slices is not None or config.slice_index is not None:
            raise UsageError("--engine spark hands the shards out itself: it cannot be "
                             "combined with --num-slices or --slice-index")

    @contextmanager
    def session(self, job, store):
        """A Spark session (the application) for the run, stopped at its end."""
        master = declared(self, job.config.options).get("spark_master")
        with if_long(f"starting a Spark application on {master or 'the default master'}",
                     not job.config.quiet):
            spark = _session(master)
        try:
            # the driver's machine counts: it freezes the plan and merges in the run directory
            cluster.check_reachable(store, len(set(_hosts(spark))), "Spark", "executor")
            yield None
        finally:
            spark.stop()

    def label(self, run_dir, job, plan, shards, summary, progress) -> None:
        """The pending shards as the tasks of Spark jobs; a poison shard ends the run once
        the others are committed."""
        from pyspark.sql import SparkSession

        spark, store = SparkSession.getActiveSession(), run_dir.store
        config = replace(job.config, quiet=True)
        committed = committed_shards(store)
        pending = [s for s in shards if s not in committed]
        show = (not job.config.quiet) if progress is None else progress
        bar = progress_bar(plan.num_items, plan.num_items - plan.items_in(pending), show,
                           Slice())
        workers: dict[tuple, dict] = {}
        poison: list[int] = []
        started = time.perf_counter()
        try:
            while pending:
                found, failed = _run_job(spark, config, pending, store, plan, bar)
                for figures in found:
                    worker = workers.setdefault((figures["host"], figures["pid"]),
                                                cluster.started(figures["worker"]))
                    cluster.add_figures(figures, worker, summary)
                if failed is not None:
                    poison.append(failed)
                committed = committed_shards(store)
                left = [s for s in pending if s not in committed and s not in poison]
                if failed is None and left:  # every task returned, yet shards are missing
                    raise RunError(f"{count(len(left), 'shard')} reported done by Spark's "
                                   f"tasks are not committed in {store.url()} (e.g. shard "
                                   f"{left[0]}): is --out the same directory for the "
                                   "executors? Run the same command again to resume")
                pending = left
        finally:
            bar.close()
        summary.loop_seconds = time.perf_counter() - started
        summary.cluster_workers = cluster.rates(list(workers.values()))
        summary.worker = "Spark worker"  # an executor's Python worker
        run_dir.record_engine(summary.engine_record(self.name))
        if poison:
            raise cluster.poison_error(plan, sorted(poison), "executor's task")


ENGINE = SparkEngine()


def _import_pyspark():
    try:
        import pyspark
    except ImportError:
        raise UsageError("--engine spark needs pyspark: pip install 'label-images[spark]'"
                         ) from None
    return pyspark


def _session(master: str | None):
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("label-images").config("spark.ui.showConsoleProgress",
                                                                   "false")
    if master or not SparkConf().contains("spark.master"):  # spark-submit's, else ours
        builder = builder.master(master or "local[*]")
    # the executors' Python is the driver's: the same packages, the pipeline importable
    builder = builder.config("spark.pyspark.python", os.environ.get("PYSPARK_PYTHON",
                                                                    sys.executable))
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - the JVM's many ways to say no master answers
        where = master or "the default master"
        raise UsageError(f"cannot start a Spark application on {where}: "
                         f"{cluster.cause(exc)}") from None
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _hosts(spark) -> list[str]:
    """The host of each JVM of the application: the driver's and each executor's."""
    return [info.host() for info in
            spark.sparkContext._jsc.sc().statusTracker().getExecutorInfos()]


def _has_executors(spark) -> bool:
    """Whether an executor is registered (Spark's tracker lists the driver too; in local
    mode the driver is the executor)."""
    return spark.sparkContext.master.startswith("local") or len(_hosts(spark)) > 1


def no_executor_timeout() -> float:
    return float(os.environ.get("LABEL_IMAGES_SPARK_TIMEOUT", NO_EXECUTOR_SECONDS))


def _run_job(spark, config: RunConfig, pending: list[int], store, plan, bar
             ) -> tuple[list[dict], int | None]:
    """One Spark job over `pending`, a task a shard: each task's figures, and the shard
    whose task failed every retry (None if all were committed). Bounded: a job left with
    no executor for no_executor_timeout() is cancelled, and the run ends in one line."""
    sc = spark.sparkContext
    group = f"label-images-{os.getpid()}-{time.monotonic_ns()}"
    outcome: dict = {}

    def run() -> None:
        sc.setJobGroup(group, "label-images shards", interruptOnCancel=True)
        try:
            outcome["found"] = (sc.parallelize(pending, len(pending))
                                .map(lambda shard: label_shard(config, shard)).collect())
        except Exception as exc:  # noqa: BLE001 - pyspark's Py4JJavaError and its kin
            outcome["error"] = exc

    job = threading.Thread(target=run, daemon=True)
    job.start()
    seen = set(committed_shards(store))
    alone_since = None
    while job.is_alive():
        job.join(POLL_SECONDS)
        now = set(committed_shards(store))
        new = now - seen
        if new:
            bar.advance(plan.items_in(sorted(new)))
            seen = now
        if _has_executors(spark):
            alone_since = None
        elif alone_since is None:
            alone_since = time.monotonic()
        elif time.monotonic() - alone_since > no_executor_timeout():
            sc.cancelJobGroup(group)
            job.join(60)
            raise RunError(f"the Spark application has had no executor for "
                           f"{no_executor_timeout():.0f} s (its workers gone, or no room); "
                           "the committed shards are intact: run the same command again "
                           "to resume")
    if "error" not in outcome:
        return outcome["found"], None
    message = str(outcome["error"])
    ours = [line for line in message.splitlines() if _OUR_ERRORS.search(line)]
    if ours:  # the job's own error (the store, a table), said by a task: not a death
        raise RunError(ours[-1].split(": ", 1)[-1].strip())
    failed = _FAILED_TASK.search(message)
    if failed is None:
        raise RunError(f"the Spark job failed: {cluster.cause(outcome['error'])}")
    shard = pending[int(failed.group(1))]
    notice(f"shard {shard}'s task failed {failed.group(2)} times on Spark's executors; the "
           f"other {count(len(pending) - 1, 'shard')} run again without it")
    return [], shard


# One ShardWorker per Python worker process and job: built by the first task, kept for the
# next ones (Spark reuses its Python workers, spark.python.worker.reuse).
_WORKERS: dict[str, cluster.ShardWorker] = {}


def label_shard(config: RunConfig, shard: int) -> dict:
    """A task: label and commit one shard in this Python worker; its figures."""
    from pyspark import TaskContext

    key = repr(config)
    worker = _WORKERS.get(key)
    if worker is None:
        cpus = TaskContext.get().cpus() if TaskContext.get() else 1
        share = cluster.per_node({"CPU": cpus}, {"CPU": os.cpu_count() or 1})
        _WORKERS.clear()  # another run's: its model released
        worker = _WORKERS[key] = cluster.ShardWorker(config, share)
    described = worker.describe()
    return {**worker.label(shard), "host": described["host"], "pid": described["pid"],
            "worker": described}
