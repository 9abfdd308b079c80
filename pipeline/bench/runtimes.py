"""Bench stage: every runtime installed here side by side, the model alone at its own best
batch and the whole job end to end with it (INT8 too, where NNCF is installed and the
job's images pass its agreement check)."""

from __future__ import annotations

import dataclasses

from pipeline import runner, runtimes, tuning
from pipeline.bench.model import alone
from pipeline.bench.sample import Figure, Sample
from pipeline.classifier import Classifier
from pipeline.errors import UsageError
from pipeline.summary import count


def measure(sample: Sample) -> None:
    job, config = sample.job, sample.config
    device = job.classifier.device
    names = [n for n in runtimes.installed(device) if n != "compile" or job.settings.compile]
    candidates = [(name, None) for name in names]
    if "openvino" in names and _has_nncf():
        candidates.append(("openvino", "int8"))
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
            keep_columns=(), runtime=name, compile=name == "compile",
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


def _has_nncf() -> bool:
    from pipeline.runtimes import int8

    try:
        int8.check()
    except UsageError:
        return False
    return True


def _model_alone(sample: Sample, name: str, precision: str | None) -> tuple[float, int]:
    job = sample.job
    dtype = job.classifier.dtype
    if precision == "int8":
        import torch

        dtype = torch.float32
    classifier = Classifier(job.spec, job.classifier.device, dtype, job.config.top_k)
    if precision == "int8":
        from pipeline.runtimes import int8

        int8.quantize(classifier, job.source, sample.paths[:int8.sample_size()],
                      sample.config.max_pixels, sample.config.int8_agreement)
    elif name == "compile":
        classifier.compile(fixed_batch=job.settings.batch_size)
    elif name != "torch":
        runtimes.get(name).use(classifier, dtype)
    if name == "compile":
        batch = job.settings.batch_size
    else:
        batch = tuning.measure_batch_size(classifier).batch_size  # cached: the job's key
    batches = max(4, min(20, len(sample.paths) // batch))
    return alone(classifier, batches, batch), batch
