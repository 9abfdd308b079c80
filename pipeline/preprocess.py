"""What a model expects as input: how an image becomes its crop, and how the crop its tensor.

The model backends say it (from the weights, the checkpoint or the saved model); the decode
stage makes the uint8 crop from it and the classifier the model's input on the device.
Neither learns which backend it came from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

CHANNEL_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW", "NHWC")
# --input-mode: what a model's input values are, as the Keras applications name them
# (caffe, torch, tf) and as raw pixels in either colour order. mean/std in 0-1 units.
_RAW = ((0.0, 0.0, 0.0), (1 / 255,) * 3)
INPUT_MODES = {
    "rgb": ("RGB", *_RAW),
    "bgr": ("BGR", *_RAW),  # cv2.imread's pixels as they are: Keras' transfer recipe
    "caffe": ("BGR", (103.939 / 255, 116.779 / 255, 123.68 / 255), (1 / 255,) * 3),
    "torch": ("RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "tf": ("RGB", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # x / 127.5 - 1
}


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: the crop made by the loader, then normalised on the device.

    `resize`: the shorter side is resized to it (antialiased) and the centre `crop` square
    cut; with `resize=None` the whole image is resized to `crop` x `crop` (or `crop_height`
    x `crop`, a model's non-square input), aspect ratio and all (Keras' recipe: no crop). mean and std are in units of a full channel (255 = 1.0):
    pixel values 0-255 as they are are mean 0, std 1/255. `channels` is the order the model
    reads the colours in, `layout` whether its input is channels first or last.
    """

    resize: int | None = 256
    crop: int = 224  # the input's width, and its height unless crop_height says otherwise
    crop_height: int | None = None  # a non-square input's height: whole-image resize only
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    channels: str = "RGB"
    layout: str = "NCHW"
    antialias: bool = True  # False: cv2.resize's INTER_LINEAR, which samples, not averages

    def with_mode(self, mode: str) -> Preprocess:
        """The same resize, the input values of `mode` (INPUT_MODES)."""
        channels, mean, std = INPUT_MODES[mode]
        return dataclasses.replace(self, channels=channels, mean=mean, std=std)

    def __post_init__(self):
        if self.channels not in CHANNEL_ORDERS or self.layout not in LAYOUTS:
            raise ValueError(f"channels {self.channels!r} / layout {self.layout!r}: "
                             f"expected one of {CHANNEL_ORDERS} / {LAYOUTS}")
        if self.crop_height not in (None, self.crop) and not self.stretch:
            raise ValueError("a non-square input is the whole image resized (resize=None)")

    @property
    def stretch(self) -> bool:
        """The whole image resized to the input size, no crop."""
        return self.resize is None

    @property
    def size(self) -> tuple[int, int]:
        """The model's input (height, width)."""
        return (self.crop_height or self.crop, self.crop)

    @property
    def crop_bytes(self) -> int:
        """One preprocessed image in a batch: uint8, 3 x height x width."""
        return 3 * self.size[0] * self.size[1]

    def to_dict(self) -> dict:
        described = {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                     "std": list(self.std), "interpolation": self.interpolation}
        # Only where they are not the default: fingerprints of earlier runs stay equal.
        if self.channels != "RGB":
            described["channels"] = self.channels
        if self.layout != "NCHW":
            described["layout"] = self.layout
        if not self.antialias:
            described["antialias"] = False
        if self.crop_height not in (None, self.crop):
            described["crop_height"] = self.crop_height
        return described
