"""A first GPU session's run: the environment, the GPU tests, and the throughput figures.

    make gpu-smoke        # or: .venv/bin/python -m benchmarks.gpu_smoke [--images 5000]

Prints the machine (GPUs, driver, CUDA, torch, cores, memory), runs `pytest -m gpu`, then
labels --images JPEG photos (500x375, ImageNet's typical size, made with tests/photos.py)
with the default command, ResNet-50 in fp16 on the default device, and the same images
with `label-images bench`. The ResNet-50 is seeded, not torchvision's ImageNet weights (the
speed is the same; nothing is downloaded). Writes outputs/gpu-smoke/figures.json: images/s
end to end with JPEG decode, the labelling loop's seconds waiting for batches against
computing, and bench's stages. Offline; under 10 minutes on one GPU at the default size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

from benchmarks.loose_vs_tar import make_photos

REPO = Path(__file__).resolve().parents[1]


def environment() -> dict:
    gpus = [{"name": torch.cuda.get_device_name(i),
             "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())]
    driver = shutil.which("nvidia-smi")
    smi = (subprocess.run([driver, "--query-gpu=driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip() if driver else None)
    with open("/proc/meminfo") as fh:
        memory_kb = int(fh.readline().split()[1])
    return {"gpus": gpus, "driver": smi, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gb": round(memory_kb / 2**20, 1),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}


def label_images(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO,
                          capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu-smoke")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--anywhere", action="store_true",
                        help="run without a GPU too (to check this script on a CPU)")
    options = parser.parse_args()
    env = environment()
    print(json.dumps(env, indent=2))
    if not env["gpus"] and not options.anywhere:
        print("gpu-smoke: torch sees no CUDA GPU here (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 1
    figures: dict = {"environment": env, "date": time.strftime("%Y-%m-%d")}
    if not options.skip_tests:
        started = time.perf_counter()
        tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-p",
                                "no:cacheprovider", "-q"], cwd=REPO)
        figures["tests"] = {"exit_code": tests.returncode,
                            "seconds": round(time.perf_counter() - started, 1)}
    out = options.out
    photos = out / "photos"
    if not photos.is_dir() or len(os.listdir(photos)) < options.images:
        shutil.rmtree(photos, ignore_errors=True)
        make_photos(photos, options.images)
    weights = out / "resnet50-seeded.pth"
    if not weights.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet50().state_dict(), weights)
    run = label_images("run", str(photos), "--out", str(out / "run"), "--weights", str(weights),
                       "--overwrite", "-q")
    if run.returncode != 0:
        print(run.stderr, file=sys.stderr)
        return 1
    summary = json.loads((out / "run" / "summary.json").read_text())
    loop = summary["loop_seconds"]
    figures["run"] = {
        "images": summary["labelled_now"], "device": summary["device"],
        "precision": summary["precision"],
        "batch_size": summary["settings"]["batch_size"], "workers": summary["settings"]["workers"],
        "images_per_second_end_to_end": round(summary["labelled_now"] / loop, 1),
        "images_per_second_with_start_up": round(summary["labelled_now"] / summary["wall_seconds"], 1),
        "loop_seconds": round(loop, 2), "load_seconds": round(summary["load_seconds"], 2),
        "compute_seconds": round(summary["compute_seconds"], 2)}
    report = out / "bench.json"
    bench = label_images("bench", str(photos), "--images", str(min(options.images, 2000)),
                         "--weights", str(weights), "--json", str(report))
    figures["bench"] = (json.loads(report.read_text()) if bench.returncode == 0
                        else {"failed": bench.stderr[-2000:]})
    (out / "figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures["run"], indent=2))
    if bench.returncode == 0:
        for figure in figures["bench"]["figures"]:
            print(f"{figure['name']:<60} {figure.get('images_per_second', 0):>10.1f} images/s")
    print(f"written: {out / 'figures.json'}")
    return 0 if figures.get("tests", {}).get("exit_code", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
