"""Measurements made in a fresh process for bench: a compile cold and warm, planning's peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from pipeline import tuning
from pipeline.config import RunConfig

# Planning is measured in a fresh process so that its peak memory is its own.
_PLAN_PROBE = """
import json, sys, time
from pathlib import Path
from pipeline import plan, rundir, sources
from pipeline.storage import Store
started = time.perf_counter()
items = sources.read_source(sources.SourceSpec(sys.argv[1]))
digest = plan.items_digest(items)
store = Store(sys.argv[2])
frozen = plan.freeze(items, store, 1000)
del items
planned = time.perf_counter()
# what a resume does: read the source again, compare, find the committed shards
items = sources.read_source(sources.SourceSpec(sys.argv[1]))
assert plan.items_digest(items) == digest
plan.load(store); rundir.committed_shards(store)
# VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(json.dumps({"rows": frozen.num_items, "plan_seconds": planned - started,
                  "resume_seconds": time.perf_counter() - planned,
                  "peak_rss_mb": int(hwm) / 1024}))
"""


# A compile is timed in a fresh process, twice on one inductor cache: first empty (cold,
# a first night's), then holding the first one's kernels (warm, every later night's).
_COMPILE_PROBE = """
import json, sys, time
import torch
from pipeline.backends import resolve_model
from pipeline.classifier import Classifier
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
spec = resolve_model(args["model"], args["weights"], args["labels"], args["resize"], args["crop"])
classifier = Classifier(spec, torch.device(args["device"]), getattr(torch, args["dtype"]), 1)
classifier.compile(fixed_batch=args["batch_size"])
images = torch.randint(0, 256, (args["batch_size"], 3, spec.preprocess.crop,
                                spec.preprocess.crop), dtype=torch.uint8)
started = time.perf_counter()
classifier.predict(images.contiguous(memory_format=torch.channels_last))
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def compile_times(config: RunConfig, job, workdir: Path) -> dict:
    """Seconds to compile the job's model at its batch: cold, then warm (kernels kept)."""
    classifier = job.classifier
    args = {"model": config.model, "weights": config.weights, "labels": config.labels,
            "resize": config.resize, "crop": config.crop, "device": str(classifier.device),
            "dtype": str(classifier.dtype).removeprefix("torch."),
            "batch_size": job.settings.batch_size, "threads": torch.get_num_threads()}
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor"),
           "TORCHINDUCTOR_COMPILE_THREADS": str(tuning.usable_cores())}
    seconds = {}
    for kind in ("cold", "warm"):
        done = subprocess.run([sys.executable, "-c", _COMPILE_PROBE, json.dumps(args)],
                              capture_output=True, text=True, check=True, env=env)
        seconds[kind] = json.loads(done.stdout.splitlines()[-1])["seconds"]
    return {"cold_seconds": seconds["cold"], "warm_seconds": seconds["warm"]}


def planning(rows: int, workdir: Path) -> dict:
    """Time planning a `rows`-row manifest (and a resume over it) in a fresh process."""
    manifest = workdir / "plan-probe.txt"
    with open(manifest, "w") as fh:
        for i in range(rows):
            fh.write(f"shard-{i // 10000:05d}/image-{i:09d}.jpg\n")
    done = subprocess.run([sys.executable, "-c", _PLAN_PROBE, str(manifest),
                           str(workdir / "plan-probe")], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)
