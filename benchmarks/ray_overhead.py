"""The Ray engine against the one-process job on the same images, and how soon a dead
actor's shard is redone: docs/benchmarks.md's Ray figures.

    .venv/bin/python -m benchmarks.ray_overhead [--images 1000] [--rounds 2]

Makes the photos (tests/photos.py, 500x375 JPEGs) and a seeded ResNet-50 checkpoint (no
weights download); each run is `label-images run` in a fresh process with the same batch
size and workers, the engines in turn, each keeping its best. Then one run with 2 actors
whose first actor is SIGKILLed once 3 parts are committed: the time from its death being
seen to its shard being committed again is the run's `redone` record.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from benchmarks.loose_vs_tar import make_photos


def label(folder: Path, out: Path, checkpoint: Path, *extra: str) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "run", str(folder), "--out", str(out),
                    "--model", "resnet50", "--weights", str(checkpoint), "--overwrite", "-q",
                    "--shard-size", "100", "--batch-size", "32", *extra],
                   check=True, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    return {"command_seconds": time.perf_counter() - started,
            "loop_images_per_second": summary["images_per_second"]}


def killed_actor(folder: Path, out: Path, checkpoint: Path) -> dict:
    command = [sys.executable, "-m", "pipeline", "run", str(folder), "--out", str(out),
               "--model", "resnet50", "--weights", str(checkpoint), "--overwrite", "-q",
               "--shard-size", "100", "--batch-size", "32", "--engine", "ray", "--actors", "2"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while len(list((out / "parts").glob("part-*.parquet"))) < 3:
        time.sleep(0.05)
    subprocess.run(["pkill", "-9", "-o", "-f", "ray::ShardLabeller"], check=False)
    _, errors = driver.communicate()
    if driver.returncode:
        raise SystemExit(errors.decode())
    return json.loads((out / "summary.json").read_text())["redone"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        work = Path(tmp)
        make_photos(work / "photos", options.images)
        torch.manual_seed(0)
        checkpoint = work / "resnet50.pt"
        torch.save(torchvision.models.resnet50().state_dict(), checkpoint)
        label(work / "photos", work / "warm", checkpoint)  # measures and caches the settings
        best: dict[str, dict] = {}
        for _ in range(options.rounds):
            for engine in ("local", "ray"):
                found = label(work / "photos", work / engine, checkpoint, "--engine", engine)
                if engine not in best or found["command_seconds"] < best[engine][
                        "command_seconds"]:
                    best[engine] = found
        result = {"images": options.images, **best,
                  "ray_vs_local_command": best["ray"]["command_seconds"]
                  / best["local"]["command_seconds"],
                  "ray_vs_local_loop": best["ray"]["loop_images_per_second"]
                  / best["local"]["loop_images_per_second"],
                  "redone": killed_actor(work / "photos", work / "killed", checkpoint)}
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
