"""Bench stage: every runtime installed here side by side, the model alone at its own best
batch and the whole job end to end with it (INT8 too, where NNCF is installed and the
job's images pass its agreement check)."""

from __future__ import annotations

import dataclasses

from pipeline import runner, runtimes, tuning
from pipeline.bench.model import alone
from pipeline.bench.sample import Figure, Sample
from pipeline.classifier import Classifier, resolve_precision
from pipeline.errors import UsageError
from pipeline.options import declared
from pipeline.summary import count


def measure(sample: Sample) -> None:
    job, config = sample.job, sample.config
    device = job.classifier.device
    names = [n for n in runtimes.installed(device)
             if n != runtimes.COMPILED or job.settings.compile]
    candidates = [(name, None) for name in names]
    # a precision only a runtime of its own offers (INT8), where its extra is installed
    candidates += [(name, precision) for name in names for precision in
                   runtimes.get(name).precisions
                   if runtimes.offering(precision) == [name] and _runs(name, device, precision)]
    found = {}
    for name, precision in candidates:
        label = name if precision is None else f"{name} {precision}"
        try:
            rate, batch = _model_alone(sample, name, precision)
        except UsageError as refused:  # INT8 below its agreement bound on these images
            sample.figures.append(Figure(f"runtime {label}: refused", 0.0, str(refused)))
            continue
        run = runner.run(dataclasses.replace(
            config, source=str(sample.manifest), out=str(sample.workdir / f"rt-{label}"),
            quiet=True, overwrite=True, path_column=None, id_column=None, root=None,
            keep_columns=(), runtime=name,
            precision=precision or config.precision, batch_size=batch,
            # torch's are the job's own; another runtime's measured by its run, as a job on
            # it would (its model's rate decides how many decode workers keep up)
            workers=config.workers if runtimes.get(name).own_kernels else job.settings.workers))
        e2e = run.images_per_second
        found[label] = {"model_alone": round(rate, 1), "batch_size": batch,
                        "workers": run.settings.get("workers"),
                        "end_to_end": round(e2e, 1),
                        "waiting_for_batches": round(run.load_seconds / run.loop_seconds, 3)}
        sample.figures += [Figure(f"runtime {label}: model alone, batch {batch}", rate),
                           Figure(f"runtime {label}: end to end", e2e,
                                  f"{count(run.settings.get('workers', 0), 'worker')}, "
                                  f"{run.load_seconds / run.loop_seconds:.0%} of it getting "
                                  "batches" + (": decode is the bottleneck" if
                                               run.load_seconds > 0.5 * run.loop_seconds
                                               else ""))]
    sample.found["runtimes"] = found
    sample.found["auto"] = auto_choice(found, job.settings.measured.get("runtimes", {}),
                                       len(sample.paths))


def auto_choice(found: dict, weighing: dict, images: int) -> dict:
    """What `auto` would choose from bench's own figures (each runtime's model alone at
    its best batch; what it costs once, as the job's weighing had it), asked of the chooser
    a run asks (runtimes.fastest): for the sample's images and for a million."""
    weighed = weighing.get("weighed", {})
    expected = {name: runtimes.Expected(figures["model_alone"],
                                        weighed.get(name, {}).get("once_seconds", 0.0))
                for name, figures in found.items() if name in runtimes.RUNTIMES}
    return {"once_seconds": {name: e.once_seconds for name, e in expected.items()},
            "images": images, "for_the_images": runtimes.fastest(images, expected),
            "for_a_million": runtimes.fastest(10**6, expected)} if expected else {}


def _runs(name: str, device, precision: str) -> bool:
    try:
        runtimes.get(name).check(device, precision)
    except UsageError:
        return False
    return True


def _model_alone(sample: Sample, name: str, precision: str | None) -> tuple[float, int]:
    job, runtime = sample.job, runtimes.get(name)
    device = job.classifier.device
    dtype = resolve_precision(precision, device) if precision else job.classifier.dtype
    classifier = Classifier(job.spec, device, dtype, job.config.top_k)
    # prepared as a job on it would be (settings.apply): the job's batch shape, its cache,
    # the job's own first images where it calibrates on them
    runtime.prepare(classifier, runtimes.Preparing(
        precision=precision or "auto", batch_size=job.settings.batch_size,
        options=declared(runtime, sample.config.options), cache=tuning.cache_dir(),
        images=lambda n: (tuning.first_crops(job.source, sample.paths[:n], job.spec.preprocess,
                                             sample.config.max_pixels), len(sample.paths[:n]))))
    if name == runtimes.COMPILED:
        batch = job.settings.batch_size
    else:
        batch = tuning.measure_batch_size(classifier).batch_size  # cached: the job's key
    batches = max(4, min(20, len(sample.paths) // batch))
    return alone(classifier, batches, batch), batch
