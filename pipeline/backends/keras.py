"""Keras 3 models (`--model keras:PATH`, .keras or legacy .h5), run as the torch modules they
are on Keras' torch backend (no TensorFlow).

What the transfer-learning recipe feeds its model is the default preprocessing: the image
read as cv2.imread reads it (BGR, values 0-255, channels last) and resized whole to the
model's input size with cv2.resize's INTER_LINEAR (bilinear, not antialiased), no crop,
no normalisation. `--input-mode` picks the Keras applications' caffe/torch/tf modes or RGB
instead; `--resize R` resizes the shorter side to R and centre-crops the input size. Class
names: `--labels FILE` or `--labels TRAINING_FOLDER` (its subfolders in alphabetical order,
as image_dataset_from_directory numbers them), else indices. A last layer that is already
a softmax is not soft-maxed again. Keras is an optional extra (`pip install
'label-images[keras]'`).
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn

from pipeline.backends.base import Backend, ModelSpec
from pipeline.backends.checkpoints import sha256_file
from pipeline.errors import UsageError
from pipeline.preprocess import Preprocess

SUFFIXES = (".keras", ".h5", ".hdf5")


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")  # before the first import of keras
    try:
        import keras
    except ImportError:
        raise UsageError("--model keras:... needs Keras: pip install 'label-images[keras]'") \
            from None
    if keras.backend.backend() != "torch":
        raise UsageError(f"Keras runs on its {keras.backend.backend()} backend here "
                         "(KERAS_BACKEND): label-images runs Keras models on torch; unset it "
                         "or set KERAS_BACKEND=torch")
    return keras


class KerasBackend(Backend):
    prefix = "keras:"
    library = "keras"

    def resolve(self, model: str, weights: str) -> ModelSpec:
        path = Path(model)
        if weights not in ("DEFAULT", model, str(path)):
            raise UsageError("--model keras:PATH is the model and its weights: leave --weights "
                             "out")
        loaded = _load(path)
        classes, softmax = _check_classifier(loaded, path)
        height, width = _input_size(loaded, path)
        preprocess = Preprocess(resize=None, crop=width, crop_height=height, mean=(0.0, 0.0, 0.0),
                                std=(1 / 255,) * 3, interpolation="bilinear", channels="BGR",
                                layout="NHWC", antialias=False)
        return ModelSpec(model=f"keras:{path}", weights_id=f"sha256:{sha256_file(path)}",
                         num_classes=classes,
                         categories=tuple(str(i) for i in range(classes)),
                         preprocess=preprocess, precision="fp32",
                         build=partial(_build, path, softmax))

    def preprocess(self, model: str, weights: str) -> Preprocess:
        return self.resolve(model, weights).preprocess

    def catalogue(self, model: str | None) -> list[dict]:
        if not model:
            return []
        spec = self.resolve(model, "DEFAULT")
        return [{"model": spec.model, "weights": spec.weights_id, "default": True,
                 "classes": spec.num_classes, "top1": None,
                 "size_mb": os.path.getsize(model) / 2**20, "cached": True, "url": None}]

    def fetch(self, model: str, weights: str, to: str | None):
        raise UsageError("a Keras model is a file of yours: copy it, there is nothing to fetch")


def _load(path: Path):
    keras = _keras()
    if not path.is_file():
        raise UsageError(f"--model keras:{path}: no such file")
    if path.suffix not in SUFFIXES:
        raise UsageError(f"--model keras:{path}: a Keras model is a {' or '.join(SUFFIXES)} "
                         "file")
    try:
        with warnings.catch_warnings():  # Keras' own, about numpy and legacy formats
            warnings.simplefilter("ignore", DeprecationWarning)
            return keras.saving.load_model(str(path), compile=False)
    except Exception as exc:  # zip, HDF5 and deserialisation errors alike: one line
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise UsageError(f"--model keras:{path} cannot be loaded as a Keras model "
                         f"({reason})") from None


def _check_classifier(model, path: Path) -> tuple[int, bool]:
    """The class count, and whether the output is softmax probabilities already."""
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        raise UsageError(f"--model keras:{path} is not a classifier: its output is "
                         f"{[tuple(o.shape) for o in model.outputs]}, not (batch, classes)")
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "linear")
    if activation not in ("softmax", "linear"):
        raise UsageError(f"--model keras:{path} is not a classifier: its last layer's "
                         f"activation is {activation}, not softmax or none (logits)")
    return int(model.outputs[0].shape[-1]), activation == "softmax"


def _input_size(model, path: Path) -> tuple[int, int]:
    if len(model.inputs) != 1:
        raise UsageError(f"--model keras:{path} takes {len(model.inputs)} inputs, not one "
                         "image")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3 or None in shape[1:3]:
        raise UsageError(f"--model keras:{path} does not take images: its input is {shape}, "
                         "not (batch, height, width, 3)")
    return int(shape[1]), int(shape[2])


class KerasNet(nn.Module):
    """The Keras model as the network the classifier runs: NHWC float in, logits out.

    Kept off the module tree, so that the classifier's move to a dtype or memory format
    leaves Keras' own variables as Keras made them (fp32). Keras on torch puts its variables,
    and every tensor a layer is handed, on its own default device (CUDA wherever CUDA
    exists), not where the job runs: so the model is loaded, and called, inside
    keras.device(...) of the job's device, and a move to another device loads it there
    again. A softmax output is given back as its log: the classifier's softmax of it is the
    model's probabilities again.
    """

    def __init__(self, path: Path, softmax: bool, device: torch.device):
        super().__init__()
        self.path = path
        self.device = device
        self._softmax = softmax
        # the scope every call runs in: made once, not looked up on each batch
        self._on_device = partial(_keras().device, str(device))
        with self._on_device():
            object.__setattr__(self, "_keras", _load(path))

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and device != self.device:
            return KerasNet(self.path, self._softmax, device).train(self.training)
        return self  # a dtype or memory format: Keras' variables stay as Keras made them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._on_device():
            out = self._keras(x.float(), training=False)
        return out.clamp_min(1e-30).log() if self._softmax else out


def _build(path: Path, softmax: bool) -> nn.Module:
    # on the CPU first, which every machine has; the classifier's .to(device) moves it
    return KerasNet(path, softmax, torch.device("cpu")).eval()
