"""`label-images bench`: decode, loader, model, end to end and the tutorials' loop, side by side."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

from pipeline import fidelity, probes, tuning
from pipeline import plan as planning
from pipeline import runner
from pipeline.backends import resolve_preprocess
from pipeline.classifier import Classifier
from pipeline.config import RunConfig
from pipeline.decode import DECODE_ERRORS, ImageError, decode
from pipeline.job import prepare, source_spec
from pipeline.errors import UsageError
from pipeline.loader import MAX_BYTES_PER_PIXEL, make_loader, stack_images
from pipeline.memory import PREFETCH_BATCHES, LoaderSize
from pipeline.sources import open_source, read_items
from pipeline.storage import Store, is_remote, open_input, read_bytes

LOADER_BATCH = 32  # --loader-only's batch when none is given (no model to measure one)


@dataclasses.dataclass
class Figure:
    name: str
    images_per_second: float
    note: str = ""


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def reference_transform(preprocess) -> T.Compose:
    """The tutorials' per-image transform on a PIL image, with the weights' settings."""
    return T.Compose([
        T.Resize(preprocess.resize, interpolation=T.InterpolationMode(preprocess.interpolation)),
        T.CenterCrop(preprocess.crop), T.ToTensor(), T.Normalize(preprocess.mean, preprocess.std)])


def _fetched(source, paths: list[str], max_pixels: int, chunk: int = 16):
    """(path, bytes or why not) for each path, read as the run's loader reads them, a few at
    a time: what works for every kind of source, tar members and Parquet rows included."""
    for start in range(0, len(paths), chunk):
        part = paths[start:start + chunk]
        yield from zip(part, source.fetch(part, MAX_BYTES_PER_PIXEL * max_pixels))


def _per_core_decode(paths: list[str], preprocess) -> tuple[float, float]:
    """Images/s on one core: our decode, and the PIL reference transform, same files.

    The reference is the tutorials' whole per-image transform, normalisation included: that
    is the work their loader does per image. Ours stops at uint8; the model step normalises.
    """
    reference = reference_transform(preprocess)

    def ours() -> int:
        done = 0
        for path in paths:
            try:
                # stacked as the loader does: the one copy into its batch each crop gets
                stack_images([decode(read_bytes(path), preprocess, max_pixels=10**10).image])
                done += 1
            except (ImageError, *DECODE_ERRORS):
                pass
        return done

    def pil() -> int:
        done = 0
        for path in paths:
            try:
                with open_input(path) as fh:
                    reference(Image.open(fh).convert("RGB"))
                done += 1
            except DECODE_ERRORS:
                pass
        return done

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's setting
    try:
        # One untimed pass each (file cache, lazy imports), then alternate and keep each
        # one's best of five: a shared VM's noise hits both alike.
        best = {ours: float("inf"), pil: float("inf")}
        decoded = {fn: fn() for fn in best}  # a file that fails is not counted as done
        for _ in range(5):
            for fn in best:
                started = time.perf_counter()
                fn()
                best[fn] = min(best[fn], time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return _rate(decoded[ours], best[ours]), _rate(decoded[pil], best[pil])


def _ready_at_start(size: LoaderSize) -> int:
    """Batches the loader may hold ready when its first arrives: each worker's prefetched
    ones (workers start together), or the one in hand when decoding in the main process."""
    return max(1, size.workers * size.prefetch)


def _loader_alone(plan, source, preprocess, size: LoaderSize, max_pixels: int,
                  pin_memory: bool = False) -> float | None:
    """Images/s out of the DataLoader, nothing else running; the better of two passes.

    Timed from when the batches ready at start (_ready_at_start) are taken: worker
    start-up is not throughput, and batches decoded before the clock started would count
    as taking no time (64 images with 2 workers once "measured" 300,000 images/s). None
    when no batch comes after those.
    """
    ready = _ready_at_start(size)
    if plan.num_items <= ready * size.batch_size:
        return None
    best = 0.0
    for _ in range(2):  # the first pass also pays for warming files and allocator
        loader = make_loader(plan, list(range(plan.num_shards)), source, preprocess,
                             batch_size=size.batch_size, workers=size.workers,
                             max_pixels=max_pixels, pin_memory=pin_memory,
                             prefetch=size.prefetch)
        batches = iter(loader)
        for _ in range(ready):
            next(batches)
        started, count = time.perf_counter(), 0
        for batch in batches:
            count += len(batch.indices)
        seconds = time.perf_counter() - started
        del batches, loader
        best = max(best, _rate(count, seconds))
    return best


def _loader_figure(rate: float | None, size: LoaderSize, images: int) -> Figure:
    if rate is None:
        return Figure("loader alone", 0.0, f"not timed: {images} image(s) are no more than "
                      f"the {_ready_at_start(size)} batch(es) of {size.batch_size} the loader "
                      "has ready at its start; use more --images")
    workers = size.workers
    return Figure("loader alone", rate, f"{workers} worker(s), {rate / workers:.1f}/worker"
                  if workers else "in the main process (--workers 0)")


def _model_alone(classifier: Classifier, batches: int, batch_size: int) -> float:
    crop = classifier.spec.preprocess.crop
    images = stack_images(torch.randint(0, 256, (batch_size, 3, crop, crop),
                                        dtype=torch.uint8).unbind())  # the loader's layout
    if classifier.on_cuda:
        images = images.pin_memory()
    for _ in range(2):  # warm-up: allocator, oneDNN/cuDNN kernel choice, compile
        classifier.predict(images)
    started = time.perf_counter()
    for _ in range(batches):
        classifier.predict(images)
    return _rate(batches * batch_size, time.perf_counter() - started)


def _by_batch(when: str, choice: dict | None) -> str:
    """The rates a batch size was chosen from, as the job measured (or cached) them."""
    if not choice:
        return ""
    return f"{when}, by batch: " + ", ".join(
        f"{b}: {r:.1f}" for b, r in choice["images_per_second"].items())


def _plain_loop(paths: list[str], job) -> float:
    """The tutorials' loop: PIL, Resize, CenterCrop, ToTensor, Normalize, fp32, one at a time."""
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
    return _rate(count, time.perf_counter() - started)


def bench(config: RunConfig, images: int, reference_images: int,
          plan_rows: int | None) -> dict:
    """Measure everything with the same settings in one process; returns the figures."""
    if not open_source(source_spec(config)).holds_files:
        # Its stages open each image's file, and the end-to-end run reads a manifest of them
        raise UsageError(f"bench measures a sample of image files (a folder or a manifest); "
                         f"{config.source} holds its images inside other files: "
                         "--loader-only and --fidelity measure it")
    with tempfile.TemporaryDirectory(prefix="label-images-bench-") as tmp:
        workdir = Path(tmp)
        job = prepare(dataclasses.replace(config, out=str(workdir / "unused")))
        items = job.items.slice(0, images)
        paths = [p if is_remote(p) else os.path.abspath(p) for p in items["path"].to_pylist()]
        manifest = workdir / "sample.txt"
        manifest.write_text("".join(p + "\n" for p in paths))
        plan = planning.freeze(items, Store(str(workdir)), config.shard_size)
        preprocess = job.spec.preprocess
        ours, pil = _per_core_decode(paths[:100], preprocess)
        if not ours or not pil:
            raise UsageError(f"none of the first {min(100, len(paths))} images of "
                             f"{config.source} could be decoded: nothing to measure")
        fidelity_found = fidelity.compare(_fetched(job.source, paths[:100], config.max_pixels),
                                          preprocess, config.max_pixels)
        chosen = job.settings
        loader_size = LoaderSize(chosen.workers, chosen.batch_size, chosen.prefetch)
        loader = _loader_alone(plan, job.source, preprocess, loader_size, config.max_pixels,
                               pin_memory=job.classifier.on_cuda)
        model_batches = max(4, min(20, len(paths) // job.settings.batch_size))
        # The job's classifier is compiled when the job compiles; the best batch is the
        # eager model's (what a compile is held to), measured on an eager copy.
        eager = job.classifier if not chosen.compile else Classifier(
            job.spec, job.classifier.device, job.classifier.dtype, config.top_k)
        best = tuning.measure_batch_size(eager)  # cached: the job measured it
        e2e_config = dataclasses.replace(  # the job's own choices, not measured again
            config, source=str(manifest), out=str(workdir / "run"), quiet=True,
            overwrite=True, path_column=None, id_column=None, root=None, keep_columns=(),
            batch_size=chosen.batch_size, workers=chosen.workers, compile=chosen.compile)
        # Model alone and end to end in turn, twice, each keeping its better run: a shared
        # machine's slow moments then land on both alike instead of skewing their ratio.
        model, best_model, end_to_end = 0.0, 0.0, None
        for _ in range(2):
            model = max(model, _model_alone(job.classifier, model_batches, chosen.batch_size))
            best_model = model if eager is job.classifier and \
                best.batch_size == chosen.batch_size else max(
                    best_model, _model_alone(eager, model_batches, best.batch_size))
            run = runner.run(e2e_config)
            if end_to_end is None or run.images_per_second > end_to_end.images_per_second:
                end_to_end = run
        e2e = end_to_end.images_per_second
        # Time the loop spent getting batches: with workers, decode starving the model shows
        # here, while sharing the CPU with it shows only as a lower rate; without, this is
        # the decode itself, done in turn with the model.
        waited = end_to_end.load_seconds / end_to_end.loop_seconds
        plain = _plain_loop(paths[:reference_images], job)
        figures = [
            Figure("PIL reference transform, 1 core", pil),
            Figure("decode + resize (ours), 1 core", ours, f"{ours / pil:.2f}x PIL"),
            _loader_figure(loader, loader_size, len(paths)),
            Figure(f"model alone, batch {chosen.batch_size} (the job's"
                   + ", compiled)" * chosen.compile + ")" * (not chosen.compile), model,
                   _by_batch("compiled at the job's start", chosen.measured.get(
                       "compiled_batch_sizes"))),
            Figure(f"model alone, {'eager, ' * chosen.compile}best batch ({best.batch_size})",
                   best_model, "the job's too; " * (eager is job.classifier and
                                                    best.batch_size == chosen.batch_size)
                   + _by_batch("at the job's start", best.to_dict())),
            Figure("end to end, once the process is up", e2e,
                   f"{e2e / best_model:.2f}x model at its best batch, {e2e / plain:.2f}x plain "
                   f"loop, {waited:.0%} of it getting batches"),
            Figure("plain loop (tutorials, fp32, 1 image)", plain),
        ]
        result = {
            "source": config.source, "images": len(paths),
            "measured_best_batch": best.batch_size,
            "model": job.spec.model, **job.settings.to_dict(),
            "model_alone_threads": torch.get_num_threads(),  # the job's: torch_threads
            "figures": [dataclasses.asdict(f) for f in figures],
            "ratios": {"decode_vs_pil_per_core": ours / pil,
                       "end_to_end_vs_model": e2e / model,
                       "end_to_end_vs_model_at_best_batch": e2e / best_model,
                       "end_to_end_vs_plain_loop": e2e / plain,
                       "end_to_end_getting_batches": waited},
        }
        result["fidelity"] = fidelity_found.to_dict()
        result["fidelity_text"] = fidelity.render(fidelity_found, preprocess)
        if chosen.compile:
            result["compile"] = probes.compile_times(config, job, workdir)
        else:
            expected = chosen.measured.get("compile", {}).get("expected")
            result["compile"] = {"chosen": False, "expected": expected}
        if plan_rows:
            result["planning"] = probes.planning(plan_rows, workdir)
        return result


def loader_only(config: RunConfig, images: int) -> dict:
    """The loader alone on the first `images` of SOURCE, of any kind; no model is loaded.

    For comparing where and how images are kept (loose files or tar shards, local disk or
    a bucket): --workers and --batch-size as given, else a worker a core and batches of
    LOADER_BATCH.
    """
    preprocess = resolve_preprocess(config.model, config.weights, config.resize, config.crop)
    source = open_source(source_spec(config))
    items = read_items(source).slice(0, images)
    workers = tuning.usable_cores() if config.workers is None else config.workers
    size = LoaderSize(workers, config.batch_size or LOADER_BATCH, PREFETCH_BATCHES)
    with tempfile.TemporaryDirectory(prefix="label-images-bench-") as tmp:
        plan = planning.freeze(items, Store(tmp), config.shard_size)
        rate = _loader_alone(plan, source, preprocess, size, config.max_pixels)
    figure = _loader_figure(rate, size, len(items))
    return {"source": config.source, "images": len(items), "workers": size.workers,
            "batch_size": size.batch_size, "figures": [dataclasses.asdict(figure)]}


def render_loader_only(result: dict) -> str:
    figure = result["figures"][0]
    return (f"label-images bench --loader-only: {result['images']} images from "
            f"{result['source']}, batch {result['batch_size']}, "
            f"{result['workers']} worker(s)\n"
            f"{figure['name']:<44} {figure['images_per_second']:>9.1f}  {figure['note']}")


def fidelity_only(config: RunConfig, images: int) -> dict:
    """Our crops against the reference on the first `images` of SOURCE; no model is loaded."""
    preprocess = resolve_preprocess(config.model, config.weights, config.resize, config.crop)
    source = open_source(source_spec(config))
    items = read_items(source).slice(0, images)
    found = fidelity.compare(_fetched(source, items["path"].to_pylist(), config.max_pixels),
                             preprocess, config.max_pixels)
    return {"source": config.source, "images": len(items), "preprocess": preprocess.to_dict(),
            "fidelity": found.to_dict(), "fidelity_text": fidelity.render(found, preprocess)}


def _threads(result: dict) -> str:
    alone, job = result["model_alone_threads"], result["torch_threads"]
    if job in (None, alone):
        return f"{alone} torch thread(s)"
    return f"{alone} torch thread(s), {job} in the job beside its workers"


def render(result: dict) -> str:
    lines = [f"label-images bench: {result['images']} images from {result['source']}; "
             f"{result['model']} {result['precision']} on {result['device']}, batch "
             f"{result['batch_size']}, {result['workers']} worker(s), "
             f"{_threads(result)}",
             f"{'stage':<44} {'images/s':>9}  note"]
    for figure in result["figures"]:
        lines.append(f"{figure['name']:<44} {figure['images_per_second']:>9.1f}  {figure['note']}")
    lines.append(result["fidelity_text"])
    found = result["compile"]
    if "cold_seconds" in found:
        lines.append(f"compile at batch {result['batch_size']}: {found['cold_seconds']:.1f} s "
                     f"cold (empty kernel cache), {found['warm_seconds']:.1f} s warm (kernels "
                     "kept from an earlier run)")
    else:
        expected = found["expected"]
        lines.append("compile: not used by this job" + (
            f" (expected {expected['compile_seconds']:.0f} s for {expected['speedup']}x, "
            f"from {expected['from']})" if expected else " (--no-compile)")
            + "; --compile measures it")
    if "planning" in result:
        p = result["planning"]
        lines.append(f"planning {p['rows']:,} rows: {p['plan_seconds']:.1f} s, resume check "
                     f"{p['resume_seconds']:.1f} s, peak {p['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)
