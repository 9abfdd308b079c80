"""The engine seam: who labels a plan's shards, and where. One module each, one line here.

`local` is this process with the launchers' fixed shares (one process, torchrun ranks,
array-job slices); `ray` a queue that Ray actors take shards from as they free up; `spark`
a Spark job whose tasks are the shards (Ray and pyspark are optional extras: imported when
the engine is used). What the cluster engines share is engines/cluster.py. Every engine runs through one
sequence (runner.run_in); engines/base.py says what an engine decides.
"""

from __future__ import annotations

from pipeline.engines import local, ray, spark
from pipeline.engines.base import Engine
from pipeline.errors import UsageError

ENGINES: dict[str, Engine] = {e.name: e for e in (local.ENGINE, ray.ENGINE, spark.ENGINE)}
__all__ = ["ENGINES", "Engine", "get"]


def get(name: str) -> Engine:
    if name not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {name!r}")
    return ENGINES[name]
