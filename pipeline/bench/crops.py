"""Bench stage: our crops against the reference transform's, on the decode sample."""

from __future__ import annotations

from pipeline import fidelity
from pipeline.bench.decoding import IMAGES
from pipeline.bench.sample import Sample, fetched


def measure(sample: Sample) -> None:
    preprocess, max_pixels = sample.job.spec.preprocess, sample.config.max_pixels
    found = fidelity.compare(fetched(sample.job.source, sample.paths[:IMAGES], max_pixels),
                             preprocess, max_pixels)
    sample.found["fidelity"] = found.to_dict()
    sample.found["fidelity_text"] = fidelity.render(found, preprocess)
