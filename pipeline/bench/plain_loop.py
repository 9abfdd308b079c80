"""Bench stage: the tutorials' loop (PIL, Resize, CenterCrop, Normalize, fp32, one image)."""

from __future__ import annotations

import time

import torch
from PIL import Image

from pipeline.bench.sample import Figure, Sample, rate, reference_transform
from pipeline.decode import DECODE_ERRORS
from pipeline.storage import open_input


def measure(sample: Sample) -> None:
    found = loop(sample.paths[:sample.reference_images], sample.job)
    sample.figures.append(Figure("plain loop (tutorials, fp32, 1 image)", found))
    sample.rates["plain"] = found


def loop(paths: list[str], job) -> float:
    spec, device = job.spec, job.classifier.device
    net = spec.build().to(device)
    transform = reference_transform(spec.preprocess)
    count = 0
    started = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            try:
                with open_input(path) as fh:
                    x = transform(Image.open(fh).convert("RGB")).unsqueeze(0).to(device)
            except DECODE_ERRORS:
                continue
            net(x).softmax(dim=1).topk(job.config.top_k)
            count += 1
    return rate(count, time.perf_counter() - started)
