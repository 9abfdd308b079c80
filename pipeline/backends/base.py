"""The model backend interface: a model name and weights -> a ModelSpec for the rest of the job."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from pipeline.preprocess import Preprocess
from pipeline.errors import UsageError

DEFAULT_PREPROCESS = Preprocess()  # the tutorials' 256/224 ImageNet recipe


@dataclass(frozen=True)
class ModelSpec:
    """What determines the labels, resolved: the fingerprint is built from this."""

    model: str
    weights_id: str  # named weights, or "sha256:<hex>" of a local file
    num_classes: int
    categories: tuple[str, ...]
    preprocess: Preprocess
    build: Callable[[], nn.Module] = field(repr=False, compare=False)  # CPU, eval mode
    precision: str | None = None  # the one precision the network runs in, if it has one

    def describe(self) -> dict:
        return {
            "model": self.model,
            "weights": self.weights_id,
            "num_classes": self.num_classes,
            "labels_sha256": hashlib.sha256("\n".join(self.categories).encode()).hexdigest(),
            "preprocess": self.preprocess.to_dict(),
        }


class Backend:
    prefix: str  # "" for the default family
    library: str  # the distribution that builds its networks, recorded in run.json
    options: tuple = ()  # options.Option: what this family declares (--option NAME=VALUE)

    def configured(self, options: dict) -> Backend:
        """This family for one run, told the options it declares (typed); what changes the
        model must show in the spec's weights_id (the fingerprint)."""
        return self

    def resolve(self, model: str, weights: str) -> ModelSpec:
        """Find the architecture, load the weights on the CPU, settle classes and preprocessing."""
        raise NotImplementedError

    def preprocess(self, model: str, weights: str) -> Preprocess:
        """The preprocessing `resolve` would settle on, without downloading anything."""
        raise NotImplementedError

    def catalogue(self, model: str | None) -> list[dict]:
        """Named weights: model, weights, default, classes, top1, size_mb, cached, url."""
        raise NotImplementedError

    def fetch(self, model: str, weights: str, to: str | None):
        """Download one named weights file into `to` (default: the cache); its path."""
        raise NotImplementedError


def overridden(preprocess: Preprocess, resize: int | None, crop: int | None) -> Preprocess:
    height, width = preprocess.size
    if height != width and resize and not crop:
        # a centre crop is square: which square of a non-square input is the user's to say
        raise UsageError(f"--resize {resize} centre-crops a square, and this model takes "
                         f"{width}x{height} images: give --crop too, or leave --resize out")
    return replace(preprocess, resize=resize or preprocess.resize, crop=crop or preprocess.crop,
                   crop_height=None if crop else preprocess.crop_height)


def read_labels(path: str, num_classes: int) -> list[str]:
    """Class names from a file (one a line), or from a training folder: its subfolders in
    alphabetical order, as Keras' image_dataset_from_directory numbers them."""
    if os.path.isdir(path):
        names = sorted(entry.name for entry in os.scandir(path)
                       if entry.is_dir() and not entry.name.startswith("."))
        if len(names) != num_classes:
            raise UsageError(f"--labels {path} has {len(names)} class folders, but the model "
                             f"has {num_classes} classes")
        return names
    try:
        with open(path, encoding="utf-8") as fh:
            names = [line.strip() for line in fh.read().splitlines()]
    except FileNotFoundError:
        raise UsageError(f"--labels file not found: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--labels file {path} is not UTF-8 text") from None
    while names and not names[-1]:
        names.pop()
    if len(names) != num_classes:
        raise UsageError(f"--labels {path} names {len(names)} classes, "
                         f"but the model has {num_classes}")
    return names


def head_name(net: nn.Module) -> str:
    """The last Linear layer: its output size is the class count, its input the embedding."""
    name = None
    for module_name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    if name is None:
        raise UsageError(f"cannot find the classification head of {type(net).__name__}")
    return name


def embedding_head(net: nn.Module) -> tuple[nn.Module, int]:
    """The module whose input is the embedding, and its size: the last Linear, or the
    whole of a fitted Dense-ReLU-Dense head (`label-images fit`), whose input is the same
    pooled features the plain Linear had."""
    name = head_name(net)
    parent_name = name.rpartition(".")[0]
    parent = net.get_submodule(parent_name) if parent_name else None
    if (isinstance(parent, nn.Sequential) and len(parent) == 3
            and isinstance(parent[0], nn.Linear) and isinstance(parent[1], nn.ReLU)):
        return parent, parent[0].in_features
    head = net.get_submodule(name)
    return head, head.in_features


def load_weights(net: nn.Module, state_dict: dict, model: str) -> nn.Module:
    """The state dict into the network, or one line saying why it does not fit."""
    try:
        missing, unexpected = net.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shapes differ: most often the wrong --model for the file
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        first = lines[0].removeprefix("size mismatch for ") if lines else str(exc)[:200]
        raise UsageError(f"the weights do not fit {model} ({len(lines)} tensors differ "
                         f"in shape, e.g. {first}); is --model right?") from None
    if missing or unexpected:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else ""]))
        raise UsageError(f"the weights do not fit {model}: {detail}")
    return net.eval()
