"""Bench stage, with --plan-rows: planning a generated manifest, and a resume over it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.bench.sample import Sample


def measure(sample: Sample) -> None:
    if sample.plan_rows:
        sample.found["planning"] = measure_rows(sample.plan_rows, sample.workdir)


def measure_rows(rows: int, workdir: Path) -> dict:
    """Time planning a `rows`-row manifest (and a resume over it) in a fresh process."""
    manifest = workdir / "plan-probe.txt"
    with open(manifest, "w") as fh:
        for i in range(rows):
            fh.write(f"shard-{i // 10000:05d}/image-{i:09d}.jpg\n")
    done = subprocess.run([sys.executable, "-m", "pipeline.plan_probe", str(manifest),
                           str(workdir / "plan-probe")], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.splitlines()[-1])
