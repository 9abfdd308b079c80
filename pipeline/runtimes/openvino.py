"""OpenVINO on the CPU: the torch network converted once (cached), run with OpenVINO's
kernels at bf16 where the CPU has it, else f32.

The converted model is kept in the measurement cache's folder under a key of what it is
converted from (the model's fingerprint: weights' hash included) and of OpenVINO's
version, so a later run reads it in milliseconds and a changed checkpoint is converted
anew. The classifier still normalises on the device in torch (fp32) and hands OpenVINO the
float batch; what comes back are the logits the top-k is taken of.

INT8, OpenVINO's own precision: post-training quantization (NNCF) calibrated on the job's own first
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
import ctypes
import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import UsageError
from pipeline.options import Option
from pipeline.runtimes.base import Preparing, Runtime

if TYPE_CHECKING:  # torch is imported where the network runs: the registry loads none
    import torch

name = "openvino"
# the classifier's dtype (torch's name) -> OpenVINO's inference precision hint
HINTS = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}

AGREEMENT_BOUND = 0.99  # top-1 agreement with fp32 on the held-out images


class OpenVino(Runtime):
    """The network converted to OpenVINO and run with its CPU kernels; INT8 (below) is
    its own precision, calibrated on the job's first images and checked against fp32."""

    name = name
    own_kernels = True  # the network outside torch: logits only, no embeddings
    precisions = ("fp16", "bf16", "fp32", "int8")
    options = (Option("int8_agreement", float, "--precision int8: the least top-1 agreement "
                      "with fp32 on the job's held-out images, or INT8 is refused",
                      default=AGREEMENT_BOUND, valid=lambda share: 0 < share <= 1,
                      must="is a share of images, above 0 and at most 1 (0.98 for 98%)"),)

    def check(self, device, precision: str = "auto") -> None:
        if importlib.util.find_spec("openvino") is None:
            raise UsageError("--runtime openvino needs OpenVINO: pip install "
                             "'label-images[openvino]'")
        if device.type != "cpu":
            raise UsageError(f"--runtime openvino runs on the CPU, not {device}: use --device "
                             "cpu or another runtime")
        if precision == "int8":
            check_int8()

    def sample_size(self, precision: str) -> int:
        return sample_size() if precision == "int8" else 0

    def prepare(self, classifier, preparing: Preparing = Preparing()) -> dict:
        if preparing.precision != "int8":
            use(classifier, preparing.cache)
            return {}
        images, asked = preparing.images(sample_size()) if preparing.images else ([], 0)
        bound = preparing.options.get("int8_agreement", AGREEMENT_BOUND)
        return {"int8": quantize(classifier, images, asked, preparing.cache, bound)}


RUNTIME = OpenVino()


# The signals the job handles (a dead loader worker, Ctrl-C, a scheduler's stop): taken on
# our threads, none of OpenVINO's.
_PROCESS_SIGNALS = {signal.SIGCHLD, signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def shielded():
    """An OpenVINO call, leaving this thread's signal handling as it found it.

    OpenVINO's CPU plugin gives the thread that compiles a model an alternate signal stack
    (sigaltstack) and, once that model is freed, unmaps the stack without taking it off
    the thread. Python's handlers run on the alternate stack, so the next signal this
    thread took (a loader worker's or a subprocess's exit, Ctrl-C) was a SIGSEGV: the
    kernel could not write the signal's frame there. Our stack is put back after every
    call. The threads OpenVINO starts inside take the job's signals blocked, so they
    arrive on ours.
    """
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _PROCESS_SIGNALS)
    stack = _signal_stack()
    try:
        yield
    finally:
        _signal_stack(stack)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


_SS_DISABLE = 2  # <signal.h>: no alternate stack


# libc, opened once: shielded() runs around every batch's inference
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int),
                ("ss_size", ctypes.c_size_t)]  # Linux's stack_t


def _signal_stack(restore: _SignalStack | None = None) -> _SignalStack | None:
    """This thread's alternate signal stack; with `restore`, set back to it (Linux only)."""
    if _LIBC is None:
        return None
    current = _SignalStack()
    if restore is None:
        _LIBC.sigaltstack(None, ctypes.byref(current))
        return current
    if restore.ss_flags & _SS_DISABLE:
        restore = _SignalStack(None, _SS_DISABLE, 0)
    else:
        restore = _SignalStack(restore.ss_sp, 0, restore.ss_size)
    if _LIBC.sigaltstack(ctypes.byref(restore), None) != 0:
        raise OSError(ctypes.get_errno(), "sigaltstack")
    return None


def load():
    """openvino, imported with its first threads shielded (see shielded)."""
    with shielded():
        import openvino

    return openvino


class Network:
    """The compiled OpenVINO model as the classifier's network: a float batch in, logits
    out, as torch tensors."""

    def __init__(self, compiled, precision: str, cached: bool, convert_seconds: float,
                 model=None, options: dict | None = None):
        self.compiled = compiled
        self.model, self.options = model, options or {}
        self.precision = precision
        self.cached = cached
        self.convert_seconds = convert_seconds

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        with shielded():
            found = self.compiled(x.float().contiguous().numpy())[0]
        return torch.from_numpy(np.asarray(found))

    def with_threads(self, threads: int) -> "Network":
        """The same model compiled for `threads` (those the decode workers leave it)."""
        ov = load()
        options = {**self.options, "INFERENCE_NUM_THREADS": threads}
        with shielded():
            compiled = ov.Core().compile_model(self.model, "CPU", options)
        return Network(compiled, self.precision,
                       self.cached, self.convert_seconds, self.model, options)

    def describe(self) -> dict:
        return {"runtime": name, "precision": self.precision, "from_cache": self.cached,
                "convert_seconds": round(self.convert_seconds, 2)}


def use(classifier, cache: Path) -> Network:
    """Convert (or read back) the classifier's network, compile it for this CPU at the
    classifier's precision, and make it the classifier's network."""
    ov = load()
    hint = HINTS[str(classifier.dtype).removeprefix("torch.")]
    path, cached, convert_seconds = converted(classifier, ov, cache)
    core = ov.Core()
    model = core.read_model(str(path))
    options = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    with shielded():
        compiled = core.compile_model(model, "CPU", options)
    network = Network(compiled, hint, cached, convert_seconds,
                      model, options)
    classifier.use_network(network, name, own_kernels=True, speed_key=name)
    return network


def converted(classifier, ov, cache: Path) -> tuple[Path, bool, float]:
    """The converted model's path under the `cache` folder, converting it (once) if it is
    not there; whether it was, and the seconds converting took."""
    import torch

    spec = classifier.spec
    key = hashlib.sha256(json.dumps({"model": spec.describe(), "openvino": ov.__version__},
                                    sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cache) / "openvino" / key
    path = folder / "model.xml"
    if path.is_file():
        return path, True, 0.0
    started = time.perf_counter()
    net = spec.build().eval()  # fp32 from the weights, not the classifier's bf16 copy
    example = torch.zeros(2, 3, *spec.preprocess.size)
    if spec.preprocess.layout == "NHWC":
        example = example.permute(0, 2, 3, 1)
    # Through torch.export (jit.trace, OpenVINO's other way in, is deprecated): any batch
    # size, the input's other sides fixed, so OpenVINO plans for them.
    batch = torch.export.Dim("batch", min=1, max=65536)
    exported = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    with shielded():
        model = ov.convert_model(exported)
    model.reshape([-1, *example.shape[1:]])
    partial = folder.with_name(f".{key}.{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(partial / "model.xml"), compress_to_fp16=False)
    try:
        os.rename(partial, folder)  # whole or absent; a concurrent run's copy is as good
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return path, False, time.perf_counter() - started


# INT8: quantized on the job's own images, held to fp32 before any image is labelled

CALIBRATION_IMAGES = 300
HELD_OUT_IMAGES = 200
MIN_HELD_OUT = 10  # fewer than this cannot say anything about 99%
_BATCH = 16


def check_int8() -> None:
    if importlib.util.find_spec("nncf") is None:
        raise UsageError("--precision int8 needs NNCF: pip install 'label-images[openvino]'")


def sample_size() -> int:
    """How many of the job's first images INT8 needs: calibration, then held out."""
    return CALIBRATION_IMAGES + HELD_OUT_IMAGES


def quantize(classifier, images: list[torch.Tensor], asked: int, cache: Path,
             bound: float = AGREEMENT_BOUND) -> dict:
    """Make the classifier's network the INT8 one, or refuse below `bound`; the figures.

    `images`: the decodable ones (uint8 crops) among the job's first `asked`."""
    ov = load()
    with shielded():  # its threads too: see openvino.shielded
        import nncf

    check_int8()
    calibration = images[:max(1, min(CALIBRATION_IMAGES, len(images) * 3 // 5))]
    held_out = images[len(calibration):len(calibration) + HELD_OUT_IMAGES]
    if len(held_out) < MIN_HELD_OUT:
        raise UsageError(f"--precision int8 is checked on images of the job not used to "
                         f"calibrate it: {len(images)} decodable among its first "
                         f"{asked} leave {len(held_out)}, fewer than {MIN_HELD_OUT}")
    inputs = [_input(classifier, calibration[i:i + _BATCH])
              for i in range(0, len(calibration), _BATCH)]
    path, _, _ = converted(classifier, ov, cache)
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in calibration)).hexdigest()
    target = path.parent / f"int8-{nncf.__version__}-{digest[:16]}" / "model.xml"
    cached = target.is_file()
    core = ov.Core()
    if not cached:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(
                io.StringIO()), shielded():
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
    with shielded():
        compiled = core.compile_model(model, "CPU", options)
    int8 = Network(compiled, "int8", cached, 0.0,
                           model, options)
    figures = agreement(classifier, int8, held_out, bound)
    figures.update(calibration_images=len(calibration), from_cache=cached)
    if figures["top1_agreement"] < bound:
        fewer = (f" (the job's first {asked} images, {len(images)} decodable: fewer than "
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
    classifier.use_network(int8, name, own_kernels=True, speed_key=name)
    return figures


def _input(classifier, images: list[torch.Tensor]) -> np.ndarray:
    import torch

    x = classifier.network_input(torch.stack(images).to(classifier.device))
    return x.float().contiguous().numpy()


def _lower(agreement: float) -> str:
    """A bound that this agreement would pass, as a user would type it."""
    return f"{max(0.0, int(agreement * 100) / 100):.2f}"


def agreement(classifier, int8, held_out: list[torch.Tensor],
              bound: float = AGREEMENT_BOUND) -> dict:
    """Top-1 of the INT8 network against the fp32 eager network's on the held-out images,
    and the largest gap in the reference's top-1 probability."""
    import torch

    reference_net = classifier.eager_net.float()
    agree, gap = 0, 0.0
    with torch.inference_mode():
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
