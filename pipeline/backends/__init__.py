"""The model backend seam: a model name, weights or checkpoint -> a ModelSpec; one module a family.

A backend turns `--model`/`--weights` into what the rest of the job needs: how to build the
network with its weights, the class names, the preprocessing, and what determines the
labels (for the fingerprint). The family is chosen by a prefix of the model name
(`timm:resnet50`); no prefix is torchvision. A new family is a module with a `Backend`
subclass and one line in BACKENDS.
"""

from __future__ import annotations

from dataclasses import replace

from pipeline.backends.base import Backend, ModelSpec, head_name, overridden, read_labels
from pipeline.backends.keras import KerasBackend
from pipeline.backends.timm import TimmBackend
from pipeline.backends.torchvision import TorchvisionBackend
from pipeline.preprocess import Preprocess
from pipeline.errors import UsageError
from pipeline.options import declared

__all__ = ["BACKENDS", "Backend", "ModelSpec", "backend_for", "head_name", "resolve_model",
           "resolve_preprocess"]

BACKENDS: list[Backend] = [TimmBackend(), KerasBackend(), TorchvisionBackend()]  # no prefix: the default


def backend_for(model: str) -> tuple[Backend, str]:
    """The backend whose prefix the model name has, and the name without it."""
    for backend in BACKENDS:
        if backend.prefix and model.startswith(backend.prefix):
            return backend, model[len(backend.prefix):]
    family, colon, _ = model.partition(":")
    if colon and family.isidentifier():
        known = ", ".join(b.prefix for b in BACKENDS if b.prefix) or "none"
        raise UsageError(f"--model {model!r}: unknown model family {family!r} (known "
                         f"prefixes: {known}; no prefix for torchvision)")
    return next(b for b in BACKENDS if not b.prefix), model


def resolve_model(model: str, weights: str, labels: str | None = None,
                  resize: int | None = None, crop: int | None = None,
                  input_mode: str | None = None, options: dict | None = None) -> ModelSpec:
    """The spec for --model/--weights, with --labels, --resize, --crop and --input-mode
    applied; `options`: the run's, of which the family is told those it declares."""
    backend, name = backend_for(model)
    spec = backend.configured(declared(backend, options or {})).resolve(name, weights)
    if labels is not None:
        spec = replace(spec, categories=tuple(read_labels(labels, spec.num_classes)))
    preprocess = overridden(spec.preprocess, resize, crop)
    if input_mode is not None:
        preprocess = preprocess.with_mode(input_mode)
    return replace(spec, preprocess=preprocess)


def resolve_preprocess(model: str, weights: str, resize: int | None = None,
                       crop: int | None = None) -> Preprocess:
    """The preprocessing resolve_model would settle on, without downloading named weights."""
    backend, name = backend_for(model)
    return overridden(backend.preprocess(name, weights), resize, crop)
