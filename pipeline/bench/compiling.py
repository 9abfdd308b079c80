"""Bench stage: what compiling costs the job, cold and warm, each in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from pipeline import runtimes, tuning
from pipeline.bench.sample import Sample


def measure(sample: Sample) -> None:
    chosen = sample.job.settings
    if chosen.compile:
        sample.found["compile"] = times(sample)
    else:
        weighing = chosen.measured.get("runtimes", {})  # auto's record, as the job chose
        sample.found["compile"] = {
            "chosen": False, "runtime": chosen.runtime,
            "expected": weighing.get("weighed", {}).get(runtimes.COMPILED),
            "not_weighed": weighing.get("not_weighed", {}).get(runtimes.COMPILED)}


def times(sample: Sample) -> dict:
    """Seconds to compile the job's model at its batch: cold, then warm (kernels kept)."""
    config, classifier = sample.config, sample.job.classifier
    args = {"model": config.model, "weights": config.weights, "labels": config.labels,
            "resize": config.resize, "crop": config.crop, "device": str(classifier.device),
            "dtype": str(classifier.dtype).removeprefix("torch."),
            "batch_size": sample.job.settings.batch_size, "threads": torch.get_num_threads()}
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(sample.workdir / "inductor"),
           "TORCHINDUCTOR_COMPILE_THREADS": str(tuning.usable_cores())}
    seconds = {}
    for kind in ("cold", "warm"):
        done = subprocess.run([sys.executable, "-m", "pipeline.bench.compile_probe",
                               json.dumps(args)], capture_output=True, text=True, check=True,
                              env=env)
        seconds[kind] = json.loads(done.stdout.splitlines()[-1])["seconds"]
    return {"cold_seconds": seconds["cold"], "warm_seconds": seconds["warm"]}
