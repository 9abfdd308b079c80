"""Held-out accuracy of `fit` after N answers, the answers chosen by the review list (`export
--rows spread`) or at random: `python -m benchmarks.learning_curve WORK [PER_CLASS]`.

The team's four classes are not the model's: warm or cool tint, ellipses or rectangles,
drawn over the synthetic photos of tests/photos.py (this machine has no real photo
collection and no pretrained weights: the backbone is a seeded, untrained ResNet-18). A pool
run and a test run are made with `label-images run --embeddings`; for each N the answers
for the chosen pool images go into the pool run (reviews.parquet, as `label-images reviews`
writes it), `fit` trains a head on them as a user's would, and `relabel` labels the test
run with it: its top-1 against the test images' classes is the held-out accuracy. Random
choices are averaged over three seeds. Prints the table as JSON and Markdown.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torchvision
from PIL import Image, ImageDraw

from pipeline import fit as fitting
from pipeline.errors import UsageError
from pipeline.relabel import relabel
from pipeline.review.base import REVIEW_SCHEMA
from pipeline.review.reviews import record
from pipeline.review.selection import Selection, chosen
from pipeline.tuning import machine_name
from tests.photos import photo

CLASSES = {"warm-round": ((60, 0, -60), "ellipse"), "warm-square": ((60, 0, -60), "rectangle"),
           "cool-round": ((-60, 0, 60), "ellipse"), "cool-square": ((-60, 0, 60), "rectangle")}
SIZES = (20, 50, 100, 200)
SEEDS = 3
SIDE = 96  # pixels; the runs crop 64


def draw(kind: str, seed: int) -> Image.Image:
    """One photo of a class: a tinted synthetic photo with a few shapes of the class's kind."""
    tint, shape = CLASSES[kind]
    rng = np.random.default_rng(seed)
    pixels = np.asarray(photo(SIDE, SIDE, seed), np.int16) + np.array(tint, np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    canvas = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(10, SIDE - 10, 2))
        r = int(rng.integers(8, 20))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        getattr(canvas, shape)([x - r, y - r, x + r, y + r], fill=colour)
    return image


def photos(folder: Path, per_class: int, first_seed: int) -> dict[str, str]:
    truth = {}
    for number, kind in enumerate(CLASSES):
        (folder / kind).mkdir(parents=True)
        for i in range(per_class):
            key = f"{kind}/{i:04d}.png"
            draw(kind, first_seed + 10_000 * number + i).save(folder / key)
            truth[key] = kind
    return truth


def label(folder: Path, out: Path, weights: Path) -> None:
    subprocess.run([sys.executable, "-m", "pipeline", "run", str(folder), "--out", str(out),
                    "--model", "resnet18", "--weights", str(weights), "--embeddings",
                    "--resize", "72", "--crop", "64", "--runtime", "torch", "--quiet"],
                   check=True)


def answer(out: Path, truth: dict[str, str], keys: list[str]) -> None:
    """People's answers for `keys` as the run's only reviews."""
    (out / "reviews.parquet").unlink(missing_ok=True)
    n = len(keys)
    record(str(out), [pa.table({
        "key": keys, "label": [truth[k] for k in keys], "reviewer": ["bench"] * n,
        "reviewed_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
        "tool": ["label-studio"] * n, "path": pa.nulls(n, pa.string())}, schema=REVIEW_SCHEMA)])


def accuracy(work: Path, pool: Path, test: Path, truth: dict[str, str], keys: list[str],
             tag: str) -> dict:
    answer(pool, truth, keys)
    head = work / f"head-{tag}.pt"
    try:
        figures = fitting.fit(str(pool), "reviews", str(head))
    except UsageError as refused:  # too few answers for some class: said, not scored
        return {"accuracy": None, "head": None, "refused": str(refused)}
    if figures.get("refused"):
        return {"accuracy": None, "head": figures["head"]}
    new = work / f"relabelled-{tag}"
    shutil.rmtree(new, ignore_errors=True)
    relabel(str(test), str(head), str(new))
    rows = pa.parquet.read_table(new / "labels.parquet", columns=["key", "top1_label"])
    found = dict(zip(rows["key"].to_pylist(), rows["top1_label"].to_pylist()))
    right = sum(label == key.split("/")[0] for key, label in found.items())  # its class
    return {"accuracy": round(right / len(found), 3), "head": figures["head"]}


def curve(work: Path, per_class: int = 150, sizes: tuple[int, ...] = SIZES,
          seeds: int = SEEDS) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weights = work / "untrained-resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    truth = photos(work / "pool", per_class, first_seed=1)
    photos(work / "test", max(10, per_class // 2), first_seed=500_000)
    started = time.perf_counter()
    label(work / "pool", work / "pool-run", weights)
    label(work / "test", work / "test-run", weights)
    runs_seconds = time.perf_counter() - started
    pool, test = work / "pool-run", work / "test-run"
    table = []
    for n in sizes:
        with chosen(str(pool), Selection(rows="spread", limit=n)) as (rows, _, _):
            spread = [k for t in rows for k in t["key"].to_pylist()]
        by_list = accuracy(work, pool, test, truth, spread, f"spread-{n}")
        randoms = []
        for seed in range(seeds):
            picked = list(np.random.default_rng(seed).choice(sorted(truth), n, replace=False))
            randoms.append(accuracy(work, pool, test, truth, picked, f"random-{n}-{seed}"))
        scores = [r["accuracy"] for r in randoms if r["accuracy"] is not None]
        table.append({"answers": n, "review_list": by_list["accuracy"],
                      "review_list_head": by_list["head"],
                      "random_mean": round(float(np.mean(scores)), 3) if scores else None,
                      "random_each": [r["accuracy"] for r in randoms]})
    return {"machine": machine_name(torch.device("cpu")), "seeds": seeds,
            "pool_images": len(truth), "test_images": 4 * max(10, per_class // 2),
            "runs_seconds": round(runs_seconds, 1), "curve": table}


def markdown(result: dict) -> str:
    lines = [f"| answers | review list (spread) | at random (mean of {result['seeds']}) |",
             "| ---: | ---: | ---: |"]
    def share(value):
        return "fit refused" if value is None else f"{value:.1%}"

    lines += [f"| {row['answers']} | {share(row['review_list'])} | {share(row['random_mean'])} |"
              for row in result["curve"]]
    return "\n".join(lines)


if __name__ == "__main__":
    found = curve(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 150)
    print(json.dumps(found, indent=2))
    print(markdown(found))
