"""Bench stage: the model alone (the job's batch, and the eager model's best) and the whole
run end to end, measured in turn."""

from __future__ import annotations

import dataclasses
import time

import torch

from pipeline import runner, tuning
from pipeline.bench.sample import Figure, Sample, rate
from pipeline.classifier import Classifier
from pipeline.loader import stack_images


def measure(sample: Sample) -> None:
    config, job, chosen = sample.config, sample.job, sample.job.settings
    batches = max(4, min(20, len(sample.paths) // chosen.batch_size))
    # The job's classifier is compiled when the job compiles; the best batch is the
    # eager model's (what a compile is held to), measured on an eager copy.
    eager = job.classifier if not chosen.compile else Classifier(
        job.spec, job.classifier.device, job.classifier.dtype, job.config.top_k)
    best = tuning.measure_batch_size(eager)  # cached: the job measured it
    same = eager is job.classifier and best.batch_size == chosen.batch_size
    e2e_config = dataclasses.replace(  # the job's own choices, not measured again
        config, source=str(sample.manifest), out=str(sample.workdir / "run"), quiet=True,
        overwrite=True, path_column=None, id_column=None, root=None, keep_columns=(),
        batch_size=chosen.batch_size, workers=chosen.workers, runtime=chosen.runtime)
    # Model alone and end to end in turn, twice, each keeping its better run: a shared
    # machine's slow moments then land on both alike instead of skewing their ratio.
    model, best_model, end_to_end = 0.0, 0.0, None
    for _ in range(2):
        model = max(model, alone(job.classifier, batches, chosen.batch_size))
        best_model = model if same else max(best_model, alone(eager, batches,
                                                              best.batch_size))
        run = runner.run(e2e_config)
        if end_to_end is None or run.images_per_second > end_to_end.images_per_second:
            end_to_end = run
    e2e = end_to_end.images_per_second
    # Time the loop spent getting batches: with workers, decode starving the model shows
    # here, while sharing the CPU with it shows only as a lower rate; without, this is
    # the decode itself, done in turn with the model.
    waited = end_to_end.load_seconds / end_to_end.loop_seconds
    plain = sample.rates["plain"]
    sample.figures += [
        Figure(f"model alone, batch {chosen.batch_size} (the job's"
               + ", compiled)" * chosen.compile + ")" * (not chosen.compile), model,
               by_batch("compiled at the job's start",
                        chosen.measured.get("compiled_batch_sizes"))),
        Figure(f"model alone, {'eager, ' * chosen.compile}best batch ({best.batch_size})",
               best_model, "the job's too; " * same
               + by_batch("at the job's start", best.to_dict())),
        Figure("end to end, once the process is up", e2e,
               f"{e2e / best_model:.2f}x model at its best batch, {e2e / plain:.2f}x plain "
               f"loop, {waited:.0%} of it getting batches"),
    ]
    sample.found["measured_best_batch"] = best.batch_size
    sample.found["model_alone_threads"] = torch.get_num_threads()  # the job's: torch_threads
    sample.found["ratios"] = {"decode_vs_pil_per_core": sample.rates["decode"] / sample.rates["pil"],
                              "end_to_end_vs_model": e2e / model,
                              "end_to_end_vs_model_at_best_batch": e2e / best_model,
                              "end_to_end_vs_plain_loop": e2e / plain,
                              "end_to_end_getting_batches": waited}


def alone(classifier: Classifier, batches: int, batch_size: int) -> float:
    height, width = classifier.spec.preprocess.size
    images = stack_images(torch.randint(0, 256, (batch_size, 3, height, width),
                                        dtype=torch.uint8).unbind())  # the loader's layout
    if classifier.on_cuda:
        images = images.pin_memory()
    for _ in range(2):  # warm-up: allocator, oneDNN/cuDNN kernel choice, compile
        classifier.predict(images)
    started = time.perf_counter()
    for _ in range(batches):
        classifier.predict(images)
    return rate(batches * batch_size, time.perf_counter() - started)


def by_batch(when: str, choice: dict | None) -> str:
    """The rates a batch size was chosen from, as the job measured (or cached) them."""
    if not choice:
        return ""
    return f"{when}, by batch: " + ", ".join(
        f"{b}: {r:.1f}" for b, r in choice["images_per_second"].items())
