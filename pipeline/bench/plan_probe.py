"""`python -m pipeline.bench.plan_probe MANIFEST RUN_DIR`: planning timed in a fresh process,
so that its peak memory is its own. Prints rows, seconds and peak RSS as JSON."""

from __future__ import annotations

import json
import sys
import time

from pipeline import plan, rundir, sources
from pipeline.storage import Store


def main(manifest: str, run_dir: str) -> dict:
    started = time.perf_counter()
    items = sources.read_source(sources.SourceSpec(manifest))
    digest = plan.items_digest(items)
    store = Store(run_dir)
    frozen = plan.freeze(items, store, 1000)
    del items
    planned = time.perf_counter()
    # what a resume does: read the source again, compare, find the committed shards
    items = sources.read_source(sources.SourceSpec(manifest))
    assert plan.items_digest(items) == digest
    plan.load(store)
    rundir.committed_shards(store)
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
    with open("/proc/self/status") as fh:
        hwm = next(line for line in fh if line.startswith("VmHWM")).split()[1]
    return {"rows": frozen.num_items, "plan_seconds": planned - started,
            "resume_seconds": time.perf_counter() - planned, "peak_rss_mb": int(hwm) / 1024}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
