"""torchvision's classification models: named weights (with their own preprocessing) or files."""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import pickle
import re
import socket
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from pipeline.backends.base import (DEFAULT_PREPROCESS, Backend, ModelSpec, head_name,
                                    load_weights)
from pipeline.backends.checkpoints import (SUFFIXES, check_categories, load_checkpoint,
                                           sha256_file)
from pipeline.preprocess import Preprocess
from pipeline.errors import RunError, UsageError, notice

_DOWNLOAD_TIMEOUT_S = 60
# torchvision's file names end in the first hex digits of the file's sha256
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")


class TorchvisionBackend(Backend):
    prefix = ""
    library = "torchvision"

    def resolve(self, model: str, weights: str) -> ModelSpec:
        check_model_name(model)
        if os.path.isfile(weights):
            return _from_checkpoint_file(model, Path(weights))
        if weights.endswith(SUFFIXES) or os.sep in weights:
            raise UsageError(f"--weights file not found: {weights}")
        return _from_named_weights(model, weights)

    def preprocess(self, model: str, weights: str) -> Preprocess:
        if os.path.isfile(weights):
            return self.resolve(model, weights).preprocess
        check_model_name(model)
        return preprocess_of(lookup_weights(model, weights))

    def catalogue(self, model: str | None) -> list[dict]:
        models = list_models(module=torchvision.models)
        if model is not None:
            if model not in models:
                raise UsageError(f"unknown model {model!r}; see `label-images weights list`")
            models = [model]
        rows = []
        for name in models:
            enum = get_model_weights(name)
            for weights in enum:
                metrics = next(iter(weights.meta.get("_metrics", {}).values()), {})
                rows.append({
                    "model": name, "weights": str(weights), "default": weights == enum.DEFAULT,
                    "classes": len(weights.meta.get("categories") or []),
                    "top1": metrics.get("acc@1"), "size_mb": weights.meta.get("_file_size"),
                    "cached": cache_path(weights).is_file(), "path": str(cache_path(weights)),
                    "url": weights.url,
                })
        return rows

    def fetch(self, model: str, weights_name: str, to: str | None) -> Path:
        """Download one weights file, check it against the hash in its name, return where."""
        weights = lookup_weights(model, weights_name)
        target = (Path(to) / os.path.basename(weights.url)) if to else cache_path(weights)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        expected = _HASH_IN_NAME.search(target.name)
        try:
            with download_timeout():
                # torch.hub writes a temporary file, checks the sha256 prefix, then moves it
                torch.hub.download_url_to_file(weights.url, str(target), progress=True,
                                               hash_prefix=expected.group(1) if expected else None)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise RunError(f"cannot download {weights.url} ({reason}); run `label-images "
                           "weights fetch` on a machine with network and copy the file "
                           "over") from None
        except RuntimeError as exc:
            if "invalid hash value" not in str(exc):  # torch.hub's words for a mismatch
                raise
            raise RunError(f"{weights.url} arrived damaged ({exc}); nothing was kept, try "
                           "again") from None
        return target


def check_model_name(model: str) -> None:
    """An unknown model name is one line, with the nearest names torchvision has."""
    known = list_models(module=torchvision.models)
    if model not in known:
        close = difflib.get_close_matches(model, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown model {model!r}{hint}; see torchvision.models.list_models()")


def preprocess_of(weights) -> Preprocess:
    t = weights.transforms()
    return Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]),
                      mean=tuple(t.mean), std=tuple(t.std), interpolation=t.interpolation.value)


def lookup_weights(model: str, name: str):
    enum = get_model_weights(model)
    member = name.split(".")[-1] if name.startswith(enum.__name__ + ".") else name
    try:
        return enum[member]
    except KeyError:
        choices = ", ".join(["DEFAULT", *enum.__members__])
        raise UsageError(f"--weights {name!r} is not a file nor weights of {model} "
                         f"(choices: {choices})") from None


def cache_path(weights) -> Path:
    """Where torch.hub keeps (and looks for) a downloaded torchvision weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


@contextmanager
def download_timeout() -> Iterator[None]:
    """torch.hub waits forever by default; on a closed network it should fail, not hang."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _from_named_weights(model: str, name: str) -> ModelSpec:
    weights = lookup_weights(model, name)
    cached = cache_path(weights)
    was_cached = cached.is_file()
    try:
        # torch.hub announces a download on stdout before it tries: offline, that line
        # came before our one-line error; online, we say it once the file is here.
        with download_timeout(), contextlib.redirect_stdout(io.StringIO()):
            state_dict = torch.hub.load_state_dict_from_url(
                weights.url, progress=False, check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError, pickle.UnpicklingError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if cached.is_file():
            raise UsageError(f"cached weights file {cached} cannot be read ({reason}); "
                             "delete it and run again") from None
        raise UsageError(
            f"weights {weights} are not cached at {cached} and could not be downloaded "
            f"({reason}); on a machine with network run `label-images weights fetch --model "
            f"{model} --weights {weights.name}` (or download {weights.url}) and copy the file "
            f"to that path (or set TORCH_HOME), or pass --weights PATH"
        ) from None
    if not was_cached:
        notice(f"downloaded {weights} to {cached}")
    else:  # torch.hub checks the hash of what it downloads only
        check_named_hash(cached, weights, sha256_file(cached))
    categories = tuple(weights.meta.get("categories") or [])
    return ModelSpec(model=model, weights_id=str(weights), num_classes=len(categories),
                     categories=categories, preprocess=preprocess_of(weights),
                     build=partial(_build, model, len(categories), state_dict, weights))


def _from_checkpoint_file(model: str, path: Path) -> ModelSpec:
    state_dict, categories = load_checkpoint(path)
    head = head_name(get_model(model, weights=None))
    num_classes, hidden = head_shape(state_dict, head)
    if num_classes is None:
        raise UsageError(f"--weights {path} does not look like a {model} checkpoint "
                         f"(no {head + '.weight'!r} in it)")
    if categories is not None:
        check_categories(categories, num_classes, path)
    # A staged copy of torchvision's own file keeps its class names and preprocessing.
    known = next((w for w in get_model_weights(model)
                  if os.path.basename(w.url) == path.name), None)
    digest = sha256_file(path)
    if known is not None and categories is None:
        check_named_hash(path, known, digest)
        categories = known.meta.get("categories")
    return ModelSpec(model=model, weights_id=f"sha256:{digest}",
                     num_classes=num_classes,
                     categories=tuple(categories or [str(i) for i in range(num_classes)]),
                     preprocess=preprocess_of(known) if known else DEFAULT_PREPROCESS,
                     build=partial(_build, model, num_classes, state_dict, known, hidden))


def check_named_hash(path: Path, weights, digest: str) -> None:
    """torchvision names its files after the start of their sha256 (resnet50-11ad3fa6.pth):
    a file by that name with another hash is something else (a fine-tuned copy, a stand-in)
    about to be given ImageNet's class names and preprocessing. Said, not refused."""
    match = _HASH_IN_NAME.search(os.path.basename(weights.url))
    if match and not digest.startswith(match.group(1)):
        notice(f"{path} is named as torchvision's {weights} but its sha256 ({digest[:12]}...) "
               f"does not start with {match.group(1)}, as that file's does: it is labelled "
               "with ImageNet's class names and preprocessing all the same; pass --labels if "
               "it was trained on others")


def head_shape(state_dict: dict, head: str) -> tuple[int | None, int | None]:
    """(classes, hidden units) of the head a checkpoint holds under `head` (torchvision's
    last Linear: `fc` for ResNets): a Linear, or the recipe's Dense-ReLU-Dense
    (`head.0`, `head.2`, as `nn.Sequential(Linear, ReLU, Linear)` saves it, what
    `label-images fit` writes). (None, None): neither."""
    if f"{head}.weight" in state_dict:
        return int(state_dict[f"{head}.weight"].shape[0]), None
    if f"{head}.0.weight" in state_dict and f"{head}.2.weight" in state_dict:
        return (int(state_dict[f"{head}.2.weight"].shape[0]),
                int(state_dict[f"{head}.0.weight"].shape[0]))
    return None, None


def with_head(net: nn.Module, num_classes: int, hidden: int | None = None) -> nn.Module:
    """The network with its last Linear replaced: a Linear to `num_classes`, or with
    `hidden` the recipe's Dense(hidden) + ReLU + Dense(num_classes), as the tutorials do
    it (`model.fc = nn.Sequential(...)`)."""
    head = head_name(net)
    features = net.get_submodule(head).in_features
    parent, _, name = head.rpartition(".")
    new = nn.Linear(features, num_classes) if hidden is None else nn.Sequential(
        nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    setattr(net.get_submodule(parent) if parent else net, name, new)
    return net


def _build(model: str, num_classes: int, state_dict: dict, weights,
           hidden: int | None = None) -> nn.Module:
    # Some architectures change shape with pretrained weights (inception's input transform);
    # torchvision's builder sets those options when given weights: mirrored here.
    overrides = {}
    if weights is not None and model in ("inception_v3", "googlenet"):
        overrides = {"transform_input": True, "aux_logits": False, "init_weights": False}
    net = get_model(model, weights=None, num_classes=num_classes, **overrides)
    if hidden is not None:
        net = with_head(net, num_classes, hidden)
    return load_weights(net, state_dict, model)
