"""What every bench stage measures on: the job as the run builds it, its first images, a plan."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from torchvision import transforms as T

from pipeline.config import RunConfig
from pipeline.job import Job
from pipeline.loader import MAX_BYTES_PER_PIXEL
from pipeline.plan import Plan


@dataclass
class Figure:
    name: str
    images_per_second: float
    note: str = ""


@dataclass
class Sample:
    """The job, its first images and a frozen plan of them; stages add what they found."""

    config: RunConfig
    job: Job
    items: pa.Table
    paths: list[str]  # absolute, as a manifest of them lists them
    manifest: Path
    plan: Plan
    workdir: Path
    reference_images: int = 64  # for the tutorials' (slow) loop
    plan_rows: int | None = None  # rows of a generated manifest to time planning on
    figures: list[Figure] = field(default_factory=list)
    rates: dict[str, float] = field(default_factory=dict)  # for the ratios between stages
    found: dict = field(default_factory=dict)  # what goes into the result beside the figures

    def to_dict(self) -> dict:
        return {"figures": [dataclasses.asdict(f) for f in self.figures], **self.found}


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def reference_transform(preprocess) -> T.Compose:
    """The tutorials' per-image transform on a PIL image, with the weights' settings."""
    return T.Compose([
        T.Resize(preprocess.resize, interpolation=T.InterpolationMode(preprocess.interpolation)),
        T.CenterCrop(preprocess.crop), T.ToTensor(), T.Normalize(preprocess.mean, preprocess.std)])


def fetched(source, paths: list[str], max_pixels: int, chunk: int = 16):
    """(path, bytes or why not) for each path, read as the run's loader reads them, a few at
    a time: what works for every kind of source, tar members and Parquet rows included."""
    for start in range(0, len(paths), chunk):
        part = paths[start:start + chunk]
        yield from zip(part, source.fetch(part, MAX_BYTES_PER_PIXEL * max_pixels))
