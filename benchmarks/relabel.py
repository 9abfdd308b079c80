"""`label-images relabel`'s rate over a fabricated run: `python -m benchmarks.relabel WORK ROWS`.

A run directory of ROWS rows with ResNet-50's 2048 pooled features per row (random, as
float32, in row groups of 65,536) and a run.json naming a backbone; a `fit` checkpoint of
that backbone with a Linear head, and one with the recipe's Dense 512 head, both over 10
classes (the backbone's own tensors are not needed by relabel, which reads only the head).
Prints rows per second for each head as JSON. A full run's rate on the same machine is
`label-images bench`'s end-to-end figure (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.fit import HIDDEN, make_head
from pipeline.relabel import relabel
from pipeline.rundir import RUN_FILE, write_json
from pipeline.storage import Store
from pipeline.writer import output_schema

FEATURES, CLASSES, TOP_K, GROUP = 2048, 10, 5, 65_536
BACKBONE = "sha256:" + "0" * 64


def fabricate(run: Path, rows: int) -> None:
    run.mkdir(parents=True)
    schema = output_schema(TOP_K, pa.schema([]), {}, embedding_size=FEATURES)
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(run / "labels.parquet", schema) as writer:
        for start in range(0, rows, GROUP):
            n = min(GROUP, rows - start)
            keys = [f"img_{i:09d}.jpg" for i in range(start, start + n)]
            offsets = pa.array(np.arange(0, n * TOP_K + 1, TOP_K, dtype=np.int32))
            vectors = rng.random((n, FEATURES), dtype=np.float32)
            writer.write_table(pa.table({
                "key": keys, "path": [f"/data/{k}" for k in keys], "status": ["ok"] * n,
                "error": pa.nulls(n, pa.string()), "width": pa.array([640] * n, pa.int32()),
                "height": pa.array([480] * n, pa.int32()), "top1_label": ["a"] * n,
                "top1_score": pa.array(np.full(n, 0.5, np.float32)),
                "labels": pa.ListArray.from_arrays(offsets, pa.array(["a"] * n * TOP_K)),
                "scores": pa.ListArray.from_arrays(offsets, pa.array(
                    np.full(n * TOP_K, 0.1, np.float32))),
                "class_ids": pa.ListArray.from_arrays(offsets, pa.array(
                    np.zeros(n * TOP_K, np.int32))),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors.ravel()), FEATURES)}, schema=schema))
    write_json(Store(str(run)), RUN_FILE, {"config": {"model": "resnet50", "format": "parquet"},
                                           "fingerprint": {"weights": BACKBONE,
                                                           "top_k": TOP_K}})


def checkpoint(path: Path, hidden: int | None) -> None:
    head = make_head(FEATURES, CLASSES, hidden)
    state = {f"fc.{k}": v for k, v in head.state_dict().items()}
    torch.save({"state_dict": state, "categories": [f"c{i}" for i in range(CLASSES)],
                "label_images": {"backbone": BACKBONE, "head": "fc", "model": "resnet50",
                                 "fit": {"answers": 0, "from": "benchmark"}}}, path)


def main(work: str, rows: int) -> None:
    root = Path(work)
    shutil.rmtree(root, ignore_errors=True)
    fabricate(root / "run", rows)
    figures = {"rows": rows}
    for name, hidden in (("linear", None), (f"dense{HIDDEN}", HIDDEN)):
        checkpoint(root / f"{name}.pt", hidden)
        done = relabel(str(root / "run"), str(root / f"{name}.pt"), str(root / name))
        figures[name] = {"seconds": done["seconds"], "rows_per_second": done["rows_per_second"]}
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1], int(float(sys.argv[2])))
