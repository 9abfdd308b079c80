"""The classifier: model and weights, device and precision, and `predict(uint8 batch) -> top-k`."""

from __future__ import annotations

import difflib
import hashlib
import os
import pickle
import socket
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from pipeline.decode import Preprocess
from pipeline.errors import RunError, UsageError, notice

DEFAULT_PREPROCESS = Preprocess()  # the tutorials' 256/224 ImageNet recipe
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class ModelSpec:
    """What determines the labels, resolved: the fingerprint is built from this."""

    model: str
    weights_id: str  # a torchvision weights name, or "sha256:<hex>" of a local file
    num_classes: int
    categories: tuple[str, ...]
    preprocess: Preprocess
    state_dict: dict = field(repr=False, compare=False)
    builder_weights: object = field(default=None, repr=False, compare=False)

    def describe(self) -> dict:
        return {
            "model": self.model,
            "weights": self.weights_id,
            "num_classes": self.num_classes,
            "labels_sha256": hashlib.sha256("\n".join(self.categories).encode()).hexdigest(),
            "preprocess": self.preprocess.to_dict(),
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX, where bf16 convolutions are fast."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def resolve_model(model: str, weights: str, labels: str | None = None,
                  resize: int | None = None, crop: int | None = None) -> ModelSpec:
    """Find the architecture, load the weights on the CPU, and settle classes and preprocessing."""
    check_model_name(model)
    if os.path.isfile(weights):
        spec = _from_checkpoint_file(model, Path(weights))
    elif weights.endswith(_CHECKPOINT_SUFFIXES) or os.sep in weights:
        raise UsageError(f"--weights file not found: {weights}")
    else:
        spec = _from_torchvision_weights(model, weights)
    if labels is not None:
        spec = replace(spec, categories=tuple(read_labels(labels, spec.num_classes)))
    if resize is not None or crop is not None:
        spec = replace(spec, preprocess=replace(spec.preprocess,
                                                resize=resize or spec.preprocess.resize,
                                                crop=crop or spec.preprocess.crop))
    return spec


def resolve_preprocess(model: str, weights: str, resize: int | None = None,
                       crop: int | None = None) -> Preprocess:
    """The preprocessing resolve_model would settle on, without downloading named weights."""
    if os.path.isfile(weights):
        return resolve_model(model, weights, resize=resize, crop=crop).preprocess
    check_model_name(model)
    preprocess = _preprocess_of(lookup_weights(model, weights))
    return replace(preprocess, resize=resize or preprocess.resize, crop=crop or preprocess.crop)


def check_model_name(model: str) -> None:
    """An unknown model name is one line, with the nearest names torchvision has."""
    known = list_models(module=torchvision.models)
    if model not in known:
        close = difflib.get_close_matches(model, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown model {model!r}{hint}; see torchvision.models.list_models()")


def read_labels(path: str, num_classes: int) -> list[str]:
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


def _preprocess_of(weights) -> Preprocess:
    t = weights.transforms()
    return Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]),
                      mean=tuple(t.mean), std=tuple(t.std), interpolation=t.interpolation.value)


def preprocess_of_weights(model: str, name: str) -> Preprocess:
    """The preprocessing that torchvision's named weights were evaluated with."""
    return _preprocess_of(lookup_weights(model, name))


def lookup_weights(model: str, name: str):
    enum = get_model_weights(model)
    member = name.split(".")[-1] if name.startswith(enum.__name__ + ".") else name
    try:
        return enum[member]
    except KeyError:
        choices = ", ".join(["DEFAULT", *enum.__members__])
        raise UsageError(f"--weights {name!r} is not a file nor weights of {model} "
                         f"(choices: {choices})") from None


def weights_cache_path(weights) -> Path:
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


def _from_torchvision_weights(model: str, name: str) -> ModelSpec:
    weights = lookup_weights(model, name)
    cached = weights_cache_path(weights)
    try:
        with download_timeout():
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
    categories = weights.meta.get("categories") or []
    num_classes = len(categories)
    return ModelSpec(model=model, weights_id=str(weights), num_classes=num_classes,
                     categories=tuple(categories), preprocess=_preprocess_of(weights),
                     state_dict=state_dict, builder_weights=weights)


def _from_checkpoint_file(model: str, path: Path) -> ModelSpec:
    try:
        # weights_only: a checkpoint is tensors and plain containers; never run its pickles.
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UsageError(f"--weights {path} is not a plain checkpoint (refused to unpickle "
                         f"it: {first[:160]}); save it with torch.save(model.state_dict(), ...)"
                         ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise UsageError(f"--weights {path} is not a PyTorch checkpoint ({exc})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--weights {path} holds a {type(raw).__name__}, not a state_dict")
    state_dict = raw.get("state_dict", raw)
    categories = raw.get("categories") if "state_dict" in raw else None
    if not isinstance(state_dict, dict) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UsageError(f"--weights {path} is not a state_dict (a dict of tensors), "
                         "nor a dict with one under 'state_dict'")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DDP saves
    num_classes = _num_classes(model, state_dict, path)
    if categories is not None:
        if (not isinstance(categories, (list, tuple)) or len(categories) != num_classes
                or not all(isinstance(c, str) for c in categories)):
            raise UsageError(f"--weights {path}: 'categories' must list {num_classes} names")
    digest = sha256_file(path)
    # A staged copy of torchvision's own file keeps its class names and preprocessing.
    builder_weights = _known_weights_file(model, path)
    if builder_weights is not None and categories is None:
        categories = builder_weights.meta.get("categories")
    preprocess = _preprocess_of(builder_weights) if builder_weights else DEFAULT_PREPROCESS
    return ModelSpec(model=model, weights_id=f"sha256:{digest}", num_classes=num_classes,
                     categories=tuple(categories or [str(i) for i in range(num_classes)]),
                     preprocess=preprocess, state_dict=state_dict,
                     builder_weights=builder_weights)


def _known_weights_file(model: str, path: Path):
    for weights in get_model_weights(model):
        if os.path.basename(weights.url) == path.name:
            return weights
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _head_name(net: nn.Module) -> str:
    """The last Linear layer: its output size is the class count."""
    name = None
    for module_name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    if name is None:
        raise UsageError(f"cannot find the classification head of {type(net).__name__}")
    return name


def _num_classes(model: str, state_dict: dict, path: Path) -> int:
    head = _head_name(get_model(model, weights=None)) + ".weight"
    if head not in state_dict:
        raise UsageError(f"--weights {path} does not look like a {model} checkpoint "
                         f"(no {head!r} in it)")
    return int(state_dict[head].shape[0])


def build_network(spec: ModelSpec) -> nn.Module:
    """The architecture with the spec's weights loaded, on the CPU, in eval mode."""
    # Some architectures change shape with pretrained weights (e.g. inception's input
    # transform); torchvision's builder knows which, so let it set those options.
    kwargs = _builder_overrides(spec) if spec.builder_weights is not None else {}
    net = get_model(spec.model, weights=None, num_classes=spec.num_classes, **kwargs)
    try:
        missing, unexpected = net.load_state_dict(spec.state_dict, strict=False)
    except RuntimeError as exc:  # shapes differ: most often the wrong --model for the file
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        first = lines[0].removeprefix("size mismatch for ") if lines else str(exc)[:200]
        raise UsageError(f"the weights do not fit {spec.model} ({len(lines)} tensors differ "
                         f"in shape, e.g. {first}); is --model right?") from None
    if missing or unexpected:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else ""]))
        raise UsageError(f"the weights do not fit {spec.model}: {detail}")
    return net.eval()


def _builder_overrides(spec: ModelSpec) -> dict:
    # Mirrors what torchvision's builders set when given weights (only inception/googlenet).
    if spec.model in ("inception_v3", "googlenet"):
        return {"transform_input": True, "aux_logits": False, "init_weights": False}
    return {}


@dataclass(frozen=True)
class Prediction:
    class_ids: np.ndarray  # int32 (n, k), best first
    scores: np.ndarray  # float32 (n, k), softmax probabilities
    embeddings: np.ndarray | None = None  # float32 (n, d): the head's input, when asked

    @staticmethod
    def join(parts: list[Prediction]) -> Prediction:
        """The predictions of consecutive parts of a batch, as one."""
        embeddings = None
        if parts[0].embeddings is not None:
            embeddings = np.concatenate([p.embeddings for p in parts])
        return Prediction(class_ids=np.concatenate([p.class_ids for p in parts]),
                          scores=np.concatenate([p.scores for p in parts]),
                          embeddings=embeddings)


class Classifier:
    """Weights cast once onto the device; uint8 batches in, top-k probabilities out (numpy)."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, top_k: int,
                 compile: bool = False, embeddings: bool = False):
        if top_k > spec.num_classes:
            raise UsageError(f"--top-k {top_k} is more than the model's {spec.num_classes} classes")
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.top_k = top_k
        self.on_cuda = device.type == "cuda"
        if self.on_cuda:  # the only CUDA-specific knobs; everything else is the same code
            torch.backends.cudnn.benchmark = True
        net = build_network(spec).to(device=device, dtype=dtype, memory_format=torch.channels_last)
        self._features: list[torch.Tensor] = []
        self.embedding_size = None
        if embeddings:
            # The pooled penultimate features are the head's input: catch them on the way in,
            # from the same forward pass that gives the labels.
            head = net.get_submodule(_head_name(net))
            head.register_forward_pre_hook(lambda _, inputs: self._features.append(inputs[0]))
            self.embedding_size = head.in_features
        self.net = torch.compile(net) if compile else net
        mean = torch.tensor(spec.preprocess.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.preprocess.std, device=device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on the device. In fp16 (10-bit mantissa)
        # that is accurate and halves the memory traffic; bf16's 8 bits would round three
        # times, measurably worse against the reference, so there it is done in fp32.
        self._norm_dtype = torch.float16 if dtype == torch.float16 else torch.float32
        self._scale = (1.0 / (255.0 * std)).to(self._norm_dtype)
        self._shift = (-mean / std).to(self._norm_dtype)
        self.fits: int | None = None  # the largest batch known to fit, once one did not

    def predict(self, images: torch.Tensor) -> Prediction:
        """Top-k of a uint8 batch. A batch the device has no memory for goes in halves.

        A model or input size that the default batch does not fit on a small card then
        still runs, at the largest batch that fits.
        """
        if self.fits is not None and len(images) > self.fits:
            return Prediction.join([self.predict(part) for part in images.split(self.fits)])
        try:
            return self._forward(images)
        except torch.cuda.OutOfMemoryError:  # what any device raises (torch.OutOfMemoryError)
            pass  # handled below, once the failed attempt's tensors are let go
        if self.on_cuda:
            torch.cuda.empty_cache()
        if len(images) == 1:
            raise RunError(f"{self.device} ran out of memory for a single image: "
                           f"{self.spec.model} at {self.spec.preprocess.crop}x"
                           f"{self.spec.preprocess.crop} does not fit in it")
        self.fits = len(images) // 2
        notice(f"{self.device} ran out of memory with batches of {len(images)}: going on "
               f"with {self.fits}; --batch-size {self.fits} starts there")
        return self.predict(images)

    @torch.inference_mode()
    def _forward(self, images: torch.Tensor) -> Prediction:
        x = images.to(self.device, non_blocking=self.on_cuda)
        x = torch.addcmul(self._shift, x.to(self._norm_dtype), self._scale)
        # The loader's batches arrive channels_last already (then this copies nothing);
        # other callers' planar ones are converted here.
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        self._features.clear()
        probs = self.net(x).float().softmax(dim=1)
        scores, ids = probs.topk(self.top_k, dim=1)
        embeddings = None
        if self.embedding_size is not None:
            embeddings = self._features[-1].float().cpu().numpy()
        return Prediction(class_ids=ids.to(torch.int32).cpu().numpy(), scores=scores.cpu().numpy(),
                          embeddings=embeddings)


def default_batch_size(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 32


# Cores up to which a CPU run decodes in its own process, between batches: what was measured.
SMALL_CPU = 2


def default_workers(device: torch.device) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    if device.type == "cuda":
        return min(8, cpus)
    if cpus <= SMALL_CPU:
        # The model's threads take every core. A worker decoding beside them preempts one,
        # and the other waits for it at each layer's end: on 2 cores, ResNet-50 on 500x375
        # photos ran at 0.75-0.93x the model alone that way, 0.85-1.02x decoding here between
        # batches (seven interleaved pairs); on 12 MP photos the two were even.
        return 0
    # With more cores the model gets faster, so decoding in turn with it costs more, while
    # a worker's share of the cores shrinks. Not measured (no such machine here).
    return cpus // 2
