"""Memory and time at 10^6..10^8 images: planning a run, labelling one slice of it, and an
incremental night's diff over a previous table of that size (docs/benchmarks.md).

    .venv/bin/python -m benchmarks.scale [--sizes 1e6,1e7,1e8] [--work DIR] [--night 1e8]

For each size: a Parquet manifest of N rows (keys like
`photos/2026/12/06/cam07/IMG_0000001234.jpg`, paths cycling over 8 small JPEGs), then in a
process of its own each time, with its peak RSS (VmHWM, from wait4):
  plan   `python -m pipeline.plan_probe`: the listing streamed into the plan, the
         duplicate check, a resume's load;
  slice  `label-images run ... --num-slices SHARDS --slice-index 0` on that plan: one shard
         labelled (ResNet-18 at 64 px: the model is not what is measured);
  night  (--night N) a previous table of N rows and tonight's listing with 0.1% changed,
         new and removed: the out-of-core diff and the streamed assembly, no labelling.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROWS_PER_GROUP = 1_000_000
PHOTOS = 8


def keys(start: int, stop: int) -> pa.Array:
    numbers = pc.cast(pa.array(np.arange(start, stop)), pa.string())
    return pc.binary_join_element_wise("photos/2026/12/06/cam07/IMG_",
                                       pc.utf8_lpad(numbers, 10, "0"), ".jpg", "")


def make_manifest(path: Path, rows: int) -> None:
    """N rows, written a million at a time (the generator's memory is a row group)."""
    schema = pa.schema([("key", pa.string()), ("path", pa.string())])
    photos = pa.array([f"img/{i}.jpg" for i in range(PHOTOS)])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROWS_PER_GROUP):
            stop = min(rows, start + ROWS_PER_GROUP)
            writer.write_table(pa.table([keys(start, stop), photos.take(
                pa.array(np.arange(start, stop) % PHOTOS))], schema=schema))


_PHOTOS_AND_MODEL = """
import sys, torch, torchvision
from pathlib import Path
from tests.photos import photo
work = Path(sys.argv[1])
(work / "img").mkdir(parents=True, exist_ok=True)
for i in range(8):
    photo(96, 72, seed=i).save(work / "img" / f"{i}.jpg")
torch.manual_seed(0)
net = torchvision.models.resnet18(num_classes=4).eval()
torch.save({"state_dict": net.state_dict(), "categories": ["red", "green", "blue", "grey"]},
           work / "resnet18.pt")
"""


def make_photos_and_model(work: Path) -> Path:
    """8 small JPEGs beside the manifests, and a seeded ResNet-18 checkpoint: made in a
    process of its own, so that this one stays small (a child's peak RSS, as wait4 gives
    it, starts from its parent's at the fork)."""
    subprocess.run([sys.executable, "-c", _PHOTOS_AND_MODEL, str(work)], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    return work / "resnet18.pt"


def measured(command: list[str], env: dict | None = None) -> dict:
    """Run a command to its end: seconds, and its peak RSS in MB (the process alone)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    out, err = process.stdout.read().decode(), process.stderr.read().decode()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{err[-2000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "parent_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "stdout": out, "stderr": err}


def plan_and_slice(work: Path, rows: int, checkpoint: Path) -> dict:
    manifest = work / f"manifest-{rows}.parquet"
    if not manifest.exists():
        started = time.perf_counter()
        make_manifest(manifest, rows)
        print(f"  made {manifest.name} in {time.perf_counter() - started:.0f} s", flush=True)
    plan_dir, run_dir = work / f"plan-{rows}", work / f"run-{rows}"
    for folder in (plan_dir, run_dir):
        shutil.rmtree(folder, ignore_errors=True)
    probe = measured([sys.executable, "-m", "pipeline.plan_probe", str(manifest),
                      str(plan_dir), "1000", "key"])
    planned = json.loads(probe["stdout"])
    shutil.rmtree(plan_dir, ignore_errors=True)
    shards = -(-rows // 1000)
    run = measured([sys.executable, "-m", "pipeline", "run", str(manifest), "--out", str(run_dir),
                    "--id-column", "key", "--path-column", "path", "--model", "resnet18",
                    "--weights", str(checkpoint), "--resize", "72", "--crop", "64",
                    "--top-k", "2", "--batch-size", "16", "--workers", "0", "--runtime",
                    "torch", "--num-slices", str(shards), "--slice-index", "0", "-q"])
    summary = json.loads((run_dir / "summary.json").read_text()) if (
        run_dir / "summary.json").exists() else {}
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"rows": rows, "plan_seconds": round(planned["plan_seconds"], 1),
            "plan_peak_rss_mb": round(planned["peak_rss_mb"]),  # its own VmHWM
            "resume_seconds": round(planned["resume_seconds"], 2),
            "run_seconds": run["seconds"], "run_peak_rss_mb": run["peak_rss_mb"],
            "run_summary": run["stderr"].strip().splitlines()[-1:], **(
                {"slice_loop_seconds": summary.get("loop_seconds")} if summary else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8")
    parser.add_argument("--night", type=float, default=None,
                        help="also an incremental night's diff over a table of this many rows")
    parser.add_argument("--work", default="/tmp/label-images-scale")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_photos_and_model(work)
    results = []
    for rows in (int(float(n)) for n in args.sizes.split(",") if n):
        print(f"{rows:,} rows", flush=True)
        found = plan_and_slice(work, rows, checkpoint)
        print("  " + json.dumps(found), flush=True)
        results.append(found)
    if args.night:
        found = measured([sys.executable, "-m", "benchmarks.night", str(work),
                          str(int(float(args.night)))])
        print(found["stdout"], flush=True)
        results.append({"night": json.loads(found["stdout"].strip().splitlines()[-1]),
                        "peak_rss_mb": found["peak_rss_mb"]})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
