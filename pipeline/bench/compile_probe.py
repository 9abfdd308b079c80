"""`python -m pipeline.bench.compile_probe ARGS_JSON`: one compile timed in a fresh process.

bench runs it twice on one inductor cache: first empty (cold, a first night's), then holding
the first one's kernels (warm, every later night's). Prints {"seconds": ...} as its last line.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from pipeline import runtimes
from pipeline.backends import resolve_model
from pipeline.classifier import Classifier


def main(args: dict) -> dict:
    torch.set_num_threads(args["threads"])
    spec = resolve_model(args["model"], args["weights"], args["labels"], args["resize"],
                         args["crop"])
    classifier = Classifier(spec, torch.device(args["device"]), getattr(torch, args["dtype"]), 1)
    runtimes.get(runtimes.COMPILED).prepare(
        classifier, runtimes.Preparing(batch_size=args["batch_size"]))
    height, width = spec.preprocess.size
    images = torch.randint(0, 256, (args["batch_size"], 3, height, width), dtype=torch.uint8)
    started = time.perf_counter()
    classifier.predict(images.contiguous(memory_format=torch.channels_last))
    return {"seconds": time.perf_counter() - started}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
