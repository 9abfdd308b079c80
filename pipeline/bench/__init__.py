"""`label-images bench`: each measured stage one module, run in turn on the job the run builds.

A stage is a module with `measure(sample)`, which appends its figures to the sample (and
what it found beside them); STAGES is the order they run and print in. A new stage (a
runtime, say) is one module and one line here.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from pipeline import fidelity, tuning
from pipeline import plan as planning
from pipeline.backends import resolve_preprocess
from pipeline.bench import compiling, crops, decoding, loading, model, plain_loop, runtimes
from pipeline.bench import plan_timing
from pipeline.bench.sample import Sample, fetched
from pipeline.config import RunConfig
from pipeline.errors import UsageError
from pipeline.job import prepare
from pipeline.memory import MIN_BATCH_SIZE, PREFETCH_BATCHES, LoaderSize
from pipeline.sources import first_items, open_source
from pipeline.storage import Store, is_remote

STAGES = (decoding, crops, loading, plain_loop, model, runtimes, compiling, plan_timing)


def bench(config: RunConfig, images: int, reference_images: int,
          plan_rows: int | None) -> dict:
    """Measure every stage with the job's own settings, in one process; the figures."""
    if not open_source(config.source_spec()).holds_files:
        # Its stages open each image's file, and the end-to-end run reads a manifest of them
        raise UsageError(f"bench measures a sample of image files (a folder or a manifest); "
                         f"{config.source} holds its images inside other files: "
                         "--loader-only and --fidelity measure it")
    with tempfile.TemporaryDirectory(prefix="label-images-bench-") as tmp:
        workdir = Path(tmp)
        job = prepare(dataclasses.replace(config, out=str(workdir / "unused")))
        items = first_items(job.source, images)
        paths = [p if is_remote(p) else os.path.abspath(p) for p in items["path"].to_pylist()]
        manifest = workdir / "sample.txt"
        manifest.write_text("".join(p + "\n" for p in paths))
        plan = planning.freeze(items, Store(str(workdir)), config.shard_size)
        job.decide(plan.store)  # the job's settings, measured on the sample's first images
        sample = Sample(config, job, items, paths, manifest, plan, workdir,
                        reference_images=reference_images, plan_rows=plan_rows)
        for stage in STAGES:
            stage.measure(sample)
        return {"source": config.source, "images": len(paths), "model": job.spec.model,
                **job.settings.to_dict(), **sample.to_dict()}


def loader_only(config: RunConfig, images: int) -> dict:
    """The loader alone on the first `images` of SOURCE, of any kind; no model is loaded.

    For comparing where and how images are kept (loose files or tar shards, local disk or
    a bucket): --workers and --batch-size as given, else a worker a core and the smallest
    batch the run would lower its own to (no model here to measure one with).
    """
    preprocess = resolve_preprocess(config.model, config.weights, config.resize, config.crop)
    source = open_source(config.source_spec())
    items = first_items(source, images)
    workers = tuning.usable_cores() if config.workers is None else config.workers
    size = LoaderSize(workers, config.batch_size or MIN_BATCH_SIZE, PREFETCH_BATCHES)
    with tempfile.TemporaryDirectory(prefix="label-images-bench-") as tmp:
        plan = planning.freeze(items, Store(tmp), config.shard_size)
        rate = loading.alone(plan, source, preprocess, size, config.max_pixels)
    figure = loading.figure(rate, size, len(items))
    return {"source": config.source, "images": len(items), "workers": size.workers,
            "batch_size": size.batch_size, "figures": [dataclasses.asdict(figure)]}


def fidelity_only(config: RunConfig, images: int) -> dict:
    """Our crops against the reference on the first `images` of SOURCE; no model is loaded."""
    preprocess = resolve_preprocess(config.model, config.weights, config.resize, config.crop)
    source = open_source(config.source_spec())
    items = first_items(source, images)
    found = fidelity.compare(fetched(source, items["path"].to_pylist(), config.max_pixels),
                             preprocess, config.max_pixels)
    return {"source": config.source, "images": len(items), "preprocess": preprocess.to_dict(),
            "fidelity": found.to_dict(), "fidelity_text": fidelity.render(found, preprocess)}
