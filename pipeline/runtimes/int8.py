"""INT8 on OpenVINO: post-training quantization (NNCF) calibrated on the job's own first
images, then held to the fp32 reference on others of them before any image is labelled.

Calibration takes the first CALIBRATION_IMAGES decodable images of the plan (never
synthetic data: the ranges must be the job's); the agreement check labels the next ones
(HELD_OUT_IMAGES, never the calibration's) with the INT8 model and with the fp32 network
and compares top-1. A job with fewer images than both calibrates on three fifths of them and
checks on the rest. Below the bound (--int8-agreement, AGREEMENT_BOUND by default) the job
refuses INT8 in one line with the figures (docs/fidelity.md says why this bound). The quantized model is cached by the converted
model's key, NNCF's version and the calibration images' digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import importlib.util
import os
import shutil

import numpy as np
import torch

from pipeline.decode import DECODE_ERRORS, ImageError, decode
from pipeline.errors import UsageError
from pipeline.loader import MAX_BYTES_PER_PIXEL, stack_images

CALIBRATION_IMAGES = 300
HELD_OUT_IMAGES = 200
AGREEMENT_BOUND = 0.99  # top-1 agreement with fp32 on the held-out images
MIN_HELD_OUT = 10  # fewer than this cannot say anything about 99%
_BATCH = 16


def check() -> None:
    if importlib.util.find_spec("nncf") is None:
        raise UsageError("--precision int8 needs NNCF: pip install 'label-images[openvino]'")


def sample_size() -> int:
    """How many of the job's first images INT8 needs: calibration, then held out."""
    return CALIBRATION_IMAGES + HELD_OUT_IMAGES


def crops(source, paths: list[str], preprocess, max_pixels: int) -> list[torch.Tensor]:
    """The decodable images among `paths`, as the loader makes them (uint8 crops)."""
    found = []
    for start in range(0, len(paths), _BATCH):
        part = paths[start:start + _BATCH]
        for data in source.fetch(part, MAX_BYTES_PER_PIXEL * max_pixels):
            if isinstance(data, BaseException):
                continue
            try:
                found.append(decode(data, preprocess, max_pixels).image)
            except (ImageError, *DECODE_ERRORS):
                continue
    return found


def quantize(classifier, source, paths: list[str], max_pixels: int,
             bound: float = AGREEMENT_BOUND) -> dict:
    """Make the classifier's network the INT8 one, or refuse below `bound`; the figures."""
    from pipeline.runtimes import openvino as runtime

    ov = runtime.load()
    with runtime.shielded():  # its threads too: see openvino.shielded
        import nncf

    check()
    images = crops(source, paths, classifier.spec.preprocess, max_pixels)
    calibration = images[:max(1, min(CALIBRATION_IMAGES, len(images) * 3 // 5))]
    held_out = images[len(calibration):len(calibration) + HELD_OUT_IMAGES]
    if len(held_out) < MIN_HELD_OUT:
        raise UsageError(f"--precision int8 is checked on images of the job not used to "
                         f"calibrate it: {len(images)} decodable among its first "
                         f"{len(paths)} leave {len(held_out)}, fewer than {MIN_HELD_OUT}")
    inputs = [_input(classifier, calibration[i:i + _BATCH])
              for i in range(0, len(calibration), _BATCH)]
    path, _, _ = runtime.converted(classifier, ov)
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in calibration)).hexdigest()
    target = path.parent / f"int8-{nncf.__version__}-{digest[:16]}" / "model.xml"
    cached = target.is_file()
    core = ov.Core()
    if not cached:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(
                io.StringIO()), runtime.shielded():
            # NNCF draws progress bars: this is one step of the job's start, not its output
            quantized = nncf.quantize(core.read_model(str(path)), nncf.Dataset(inputs),
                                      subset_size=len(inputs))  # in batches, as given
        partial = target.parent.with_name(f".{target.parent.name}.{os.getpid()}")
        partial.mkdir(parents=True, exist_ok=True)
        ov.save_model(quantized, str(partial / "model.xml"), compress_to_fp16=False)
        try:
            os.rename(partial, target.parent)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
    options = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    model = core.read_model(str(target))
    with runtime.shielded():
        compiled = core.compile_model(model, "CPU", options)
    int8 = runtime.Network(compiled, "int8", cached, 0.0,
                           model, options)
    figures = agreement(classifier, int8, held_out, bound)
    figures.update(calibration_images=len(calibration), from_cache=cached)
    if figures["top1_agreement"] < bound:
        fewer = (f" (the job's first {len(paths)} images, {len(images)} decodable: fewer than "
                 f"the {CALIBRATION_IMAGES} + {HELD_OUT_IMAGES} asked)"
                 if len(calibration) < CALIBRATION_IMAGES or len(held_out) < HELD_OUT_IMAGES
                 else "")
        raise UsageError(
            f"--precision int8 refused: calibrated on {len(calibration)} images and checked on "
            f"{len(held_out)} others{fewer}, its top-1 agrees with fp32 on "
            f"{figures['top1_agreement']:.1%} (worst top-1 score gap "
            f"{figures['worst_top1_score_gap']:.3f}), below the {bound:.1%} bound; accept "
            f"less with --int8-agreement {_lower(figures['top1_agreement'])}, or use "
            "--precision bf16 or fp32")
    classifier.use_network(int8, runtime.name)
    return figures


def _input(classifier, images: list[torch.Tensor]) -> np.ndarray:
    x = classifier.network_input(stack_images(images).to(classifier.device))
    return x.float().contiguous().numpy()


def _lower(agreement: float) -> str:
    """A bound that this agreement would pass, as a user would type it."""
    return f"{max(0.0, int(agreement * 100) / 100):.2f}"


@torch.inference_mode()
def agreement(classifier, int8, held_out: list[torch.Tensor],
              bound: float = AGREEMENT_BOUND) -> dict:
    """Top-1 of the INT8 network against the fp32 eager network's on the held-out images,
    and the largest gap in the reference's top-1 probability."""
    reference_net = classifier.eager_net.float()
    agree, gap = 0, 0.0
    for i in range(0, len(held_out), _BATCH):
        x = torch.from_numpy(_input(classifier, held_out[i:i + _BATCH]))
        reference = reference_net(x).float().softmax(1)
        found = int8(x).float().softmax(1)
        top1 = reference.argmax(1)
        agree += int((found.argmax(1) == top1).sum())
        rows = torch.arange(len(top1))
        gap = max(gap, float((found[rows, top1] - reference[rows, top1]).abs().max()))
    return {"held_out_images": len(held_out), "top1_agreement": round(agree / len(held_out), 4),
            "worst_top1_score_gap": round(gap, 4), "bound": bound}
