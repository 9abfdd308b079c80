"""OpenVINO on the CPU: the torch network converted once (cached), run with OpenVINO's
kernels at bf16 where the CPU has it, else f32.

The converted model is kept in the measurement cache's folder under a key of what it is
converted from (the model's fingerprint: weights' hash included) and of OpenVINO's
version, so a later run reads it in milliseconds and a changed checkpoint is converted
anew. The classifier still normalises on the device in torch (fp32) and hands OpenVINO the
float batch; what comes back are the logits the top-k is taken of.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UsageError

name = "openvino"
own_kernels = True  # the network outside torch: logits only, no embeddings
PRECISIONS = {torch.bfloat16: "bf16", torch.float32: "f32", torch.float16: "f16"}


def check(device) -> None:
    if importlib.util.find_spec("openvino") is None:
        raise UsageError("--runtime openvino needs OpenVINO: pip install "
                         "'label-images[openvino]'")
    if device.type != "cpu":
        raise UsageError(f"--runtime openvino runs on the CPU, not {device}: use --device cpu "
                         "or another runtime")


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


def use(classifier, precision: torch.dtype) -> Network:
    """Convert (or read back) the classifier's network, compile it for this CPU, and make
    it the classifier's network."""
    ov = load()
    hint = PRECISIONS[precision]
    path, cached, convert_seconds = converted(classifier, ov)
    core = ov.Core()
    model = core.read_model(str(path))
    options = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    with shielded():
        compiled = core.compile_model(model, "CPU", options)
    network = Network(compiled, hint, cached, convert_seconds,
                      model, options)
    classifier.use_network(network, name)
    return network


def converted(classifier, ov) -> tuple[Path, bool, float]:
    """The converted model's path, converting it (once) if it is not cached; whether it
    was, and the seconds converting took."""
    from pipeline.tuning import cache_dir

    spec = classifier.spec
    key = hashlib.sha256(json.dumps({"model": spec.describe(), "openvino": ov.__version__},
                                    sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_dir() / "openvino" / key
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
