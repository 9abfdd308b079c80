"""timm's models (`--model timm:resnet50.a1_in1k`): pretrained weights or timm-trained files.

timm is an optional extra (`pip install '.[timm]'`). Preprocessing comes from the model's
pretrained config as timm's own eval transform uses it: resize the shorter side to
floor(size / crop_pct), centre crop `size`, its interpolation, mean and std.
"""

from __future__ import annotations

import math
import os
import socket
import urllib.parse
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
_PROBE_TIMEOUT_S = 5  # to open a connection to the hub before asking it for weights


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
        """Into the Hugging Face cache (where a run looks first), or into the folder `to`."""
        timm = _timm()
        _check_name(timm, model)
        from huggingface_hub import hf_hub_download

        hub_id, names = _hub_files(timm, model)
        failure = None
        for name in names:
            try:
                return Path(hf_hub_download(hub_id, name, local_dir=to))
            except Exception as exc:  # the hub's many errors; the next file name, else say it
                failure = failure or exc
        raise RunError(f"cannot download {hub_id} from the Hugging Face hub "
                       f"({_one_line(failure)})")


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


def _hub_files(timm, model: str) -> tuple[str, list[str]]:
    """The hub repository of a pretrained name and the file names its weights may have
    there, as timm looks for them (safetensors first)."""
    config = timm.models.get_pretrained_cfg(model)
    if config is None or not config.hf_hub_id:
        raise UsageError(f"timm has no pretrained weights on the Hugging Face hub for {model!r}"
                         "; pass --weights FILE")
    if config.hf_hub_filename:
        return config.hf_hub_id, [config.hf_hub_filename]
    return config.hf_hub_id, ["model.safetensors", "pytorch_model.bin"]


def _cached_file(hub_id: str, names: list[str]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        found = try_to_load_from_cache(hub_id, name)
        if isinstance(found, str):
            return found
    return None


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached from here, found at once; None if it may be. Without
    this, huggingface_hub retries for about 45 s before giving up."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return None  # through a proxy: only the download itself can tell
    host = urllib.parse.urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{host} cannot be reached: {exc.strerror or exc}"
    return None


def _one_line(exc: BaseException | None) -> str:
    """A library's whole message on one line: never cut off mid-sentence."""
    text = " ".join(str(exc).split()) if exc is not None else ""
    return text or type(exc).__name__


def _pretrained(timm, model: str) -> ModelSpec:
    hub_id, names = _hub_files(timm, model)
    cached = _cached_file(hub_id, names)
    staging = (f"on a connected machine run `label-images weights fetch --model timm:{model}`"
               " and copy the Hugging Face cache (HF_HOME, default ~/.cache/huggingface) "
               "here, or pass --weights FILE")
    if cached is None:
        why = _hub_unreachable()
        if why is not None:
            raise UsageError(f"timm's pretrained weights for {model} ({hub_id}) are not in "
                             f"the Hugging Face cache and {why}; {staging}")
    try:
        # a cached file is loaded as a file: no request to the hub at all
        overlay = {"file": cached} if cached else None
        net = timm.create_model(model, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # the hub's and the network's many errors: one line, never random
        raise UsageError(f"timm's pretrained weights for {model} ({hub_id}) are not cached "
                         f"and could not be downloaded ({_one_line(exc)}); {staging}") from None
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
