"""timm's models (`--model timm:resnet50.a1_in1k`): pretrained weights or timm-trained files.

timm is an optional extra (`pip install '.[timm]'`). Preprocessing comes from the model's
pretrained config as timm's own eval transform uses it: resize the shorter side to
floor(size / crop_pct), centre crop `size`, its interpolation, mean and std.
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path

from torch import nn

from pipeline.backends.base import Backend, ModelSpec, load_weights
from pipeline.backends.checkpoints import (SUFFIXES, check_categories, load_checkpoint,
                                           sha256_file)
from pipeline.preprocess import Preprocess
from pipeline.errors import RunError, UsageError

# What timm's training scripts save a model under, the exponential moving average first:
# it is what their own validation reports.
_STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def _timm():
    try:
        import timm
    except ImportError:
        raise UsageError("--model timm:... needs timm: pip install 'label-images[timm]'") \
            from None
    return timm


class TimmBackend(Backend):
    prefix = "timm:"
    library = "timm"

    def resolve(self, model: str, weights: str) -> ModelSpec:
        timm = _timm()
        _check_name(timm, model)
        if os.path.isfile(weights):
            return _from_file(timm, model, Path(weights))
        if weights.endswith(SUFFIXES) or os.sep in weights:
            raise UsageError(f"--weights file not found: {weights}")
        if weights != "DEFAULT":
            raise UsageError(f"--weights for timm: DEFAULT (the pretrained weights the name "
                             f"says, e.g. timm:{model.split('.')[0]}.a1_in1k) or a checkpoint "
                             f"file, not {weights!r}")
        return _pretrained(timm, model)

    def preprocess(self, model: str, weights: str) -> Preprocess:
        if os.path.isfile(weights):
            return self.resolve(model, weights).preprocess
        timm = _timm()
        _check_name(timm, model)
        return preprocess_of(timm.create_model(model, pretrained=False))

    def catalogue(self, model: str | None) -> list[dict]:
        timm = _timm()
        names = timm.list_pretrained(f"{model}*" if model else "*")
        return [{"model": f"timm:{name}", "weights": f"timm:{name}", "default": False,
                 "classes": timm.models.get_pretrained_cfg(name).num_classes, "top1": None,
                 "size_mb": None, "cached": None, "url": None} for name in names]

    def fetch(self, model: str, weights: str, to: str | None):
        raise RunError("timm's pretrained weights come from the Hugging Face hub: on a "
                       "connected machine run `huggingface-cli download timm/<name>` and copy "
                       "its cache (HF_HOME), or pass --weights FILE")


def preprocess_of(net: nn.Module) -> Preprocess:
    """What timm's eval transform does, from the model's pretrained config."""
    timm = _timm()
    config = timm.data.resolve_data_config({}, model=net)
    size = config["input_size"][-1]
    if config.get("crop_mode", "center") != "center" or config["input_size"][-2] != size:
        raise UsageError(f"timm's {config.get('crop_mode')} crop of "
                         f"{config['input_size'][1:]} is not one we reproduce; pass --resize "
                         "and --crop")
    return Preprocess(resize=math.floor(size / config["crop_pct"]), crop=size,
                      mean=tuple(config["mean"]), std=tuple(config["std"]),
                      interpolation=config["interpolation"])


def _check_name(timm, model: str) -> None:
    if not timm.is_model(model.split(".")[0]):
        raise UsageError(f"unknown timm model {model!r}; see timm.list_models()")


def _class_names(timm, net: nn.Module, num_classes: int) -> tuple[str, ...]:
    subset = timm.data.infer_imagenet_subset(net)
    if subset is None:
        return tuple(str(i) for i in range(num_classes))
    info = timm.data.ImageNetInfo(subset)
    return tuple(info.index_to_description(i).split(",")[0] for i in range(num_classes))


def _pretrained(timm, model: str) -> ModelSpec:
    try:
        net = timm.create_model(model, pretrained=True)
    except Exception as exc:  # the hub's and the network's many errors: one line, never random
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"timm's pretrained weights for {model} are not cached and could not "
                         f"be downloaded ({first}); on a machine with network load them once "
                         "(they go to the Hugging Face cache, HF_HOME) and copy that cache, "
                         "or pass --weights FILE") from None
    num_classes = net.num_classes
    state_dict = net.state_dict()
    hub_id = net.pretrained_cfg.get("hf_hub_id") or model
    return ModelSpec(model=f"timm:{model}", weights_id=f"timm:{hub_id}",
                     num_classes=num_classes, categories=_class_names(timm, net, num_classes),
                     preprocess=preprocess_of(net),
                     build=partial(_build, model, num_classes, state_dict))


def _from_file(timm, model: str, path: Path) -> ModelSpec:
    raw_state, categories = load_checkpoint(path, state_keys=_STATE_KEYS)
    head = timm.create_model(model, pretrained=False).default_cfg.get("classifier", "fc")
    weight = raw_state.get(f"{head}.weight")
    if weight is None:
        raise UsageError(f"--weights {path} does not look like a timm {model} checkpoint (no "
                         f"{head}.weight in it)")
    num_classes = int(weight.shape[0])
    net = timm.create_model(model, pretrained=False, num_classes=num_classes)
    if categories is not None:
        check_categories(categories, num_classes, path)
    else:
        categories = _class_names(timm, net, num_classes) if num_classes == 1000 else None
    return ModelSpec(model=f"timm:{model}", weights_id=f"sha256:{sha256_file(path)}",
                     num_classes=num_classes,
                     categories=tuple(categories or [str(i) for i in range(num_classes)]),
                     preprocess=preprocess_of(net),
                     build=partial(_build, model, num_classes, raw_state))


def _build(model: str, num_classes: int, state_dict: dict) -> nn.Module:
    net = _timm().create_model(model, pretrained=False, num_classes=num_classes)
    return load_weights(net, state_dict, f"timm:{model}")
