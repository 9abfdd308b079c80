"""`python -m pipeline.plan_probe MANIFEST RUN_DIR [SHARD_SIZE [ID_COLUMN]]`: planning timed
in a fresh process, so that its peak memory is its own. Prints rows, seconds and peak RSS as
JSON."""

from __future__ import annotations

import json
import sys
import time

from pipeline import plan, rundir, sources
from pipeline.storage import Store


def peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("VmHWM")).split()[1]) / 1024


def main(manifest: str, run_dir: str, shard_size: int = 1000,
         id_column: str | None = None) -> dict:
    started = time.perf_counter()
    source = sources.open_source(sources.SourceSpec(manifest, id_column=id_column))
    store = Store(run_dir)
    frozen = plan.freeze(sources.listing(source), store, shard_size, what=manifest)
    planned = time.perf_counter()
    # what a resume does: load the plan, find the committed shards, read one shard
    plan.load(store).read_shard(frozen.num_shards - 1)
    rundir.committed_shards(store)
    return {"rows": frozen.num_items, "shard_size": shard_size,
            "plan_seconds": planned - started,
            "resume_seconds": time.perf_counter() - planned, "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    shard_size = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    print(json.dumps(main(sys.argv[1], sys.argv[2], shard_size, *sys.argv[4:5])))
