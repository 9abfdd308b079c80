"""Image bytes to a uint8 CHW crop: EXIF orientation, RGB, resize, centre crop; errors raised per item."""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

# We refuse oversized images ourselves (--max-pixels, from the header, before decoding), so
# PIL's own global guard, which warns or raises at a fixed size, is switched off.
Image.MAX_IMAGE_PIXELS = None

# What a broken, truncated or hostile file can raise while being identified or decoded.
# Anything else is a bug in this code and should surface.
DECODE_ERRORS = (OSError, ValueError, RuntimeError, SyntaxError, EOFError, struct.error,
                 Image.DecompressionBombError)

# JPEGs whose shorter side is at least this many times the resize target are decoded
# downscaled in the DCT (PIL's draft): from 2 on, a scale of 1/2 or less is possible.
DRAFT_FACTOR = 2

# EXIF orientations that swap width and height when applied.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


class ImageError(Exception):
    """This item cannot be labelled; the message becomes the row's `error` text."""


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: resize the shorter side, centre crop, then normalise on the device."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}


@dataclass(frozen=True)
class Decoded:
    image: torch.Tensor  # uint8 (3, crop, crop)
    width: int  # as displayed, after EXIF orientation
    height: int


def decode(data: bytes, preprocess: Preprocess, max_pixels: int) -> Decoded:
    """Decode and preprocess one image; raises ImageError or one of DECODE_ERRORS."""
    if not data:
        raise ImageError("empty file")
    image = Image.open(io.BytesIO(data))  # reads the header only
    stored_width, stored_height = image.size
    if stored_width * stored_height > max_pixels:
        raise ImageError(
            f"{stored_width}x{stored_height} is over the --max-pixels limit of {max_pixels}")
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        if min(image.size) >= DRAFT_FACTOR * preprocess.resize:
            pixels, width, height = _decode_large_jpeg(image, preprocess.resize)
        else:
            pixels = _decode_jpeg(data)  # oriented: its shape is the displayed size
            height, width = pixels.shape[-2:]
    else:
        pixels = _decode_with_pil(image)
        height, width = pixels.shape[-2:]
    return Decoded(image=resize_and_crop(pixels, preprocess), width=int(width),
                   height=int(height))


def _decode_large_jpeg(image: Image.Image, resize: int) -> tuple[torch.Tensor, int, int]:
    """Large photos: libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT (PIL's draft picks
    the smallest scale that keeps the shorter side >= resize); the antialiased resize does
    the rest. Measured on 12 MP: 6.8x the PIL reference, within 0.4/255 of its crop."""
    width, height = image.size
    if image.getexif().get(_EXIF_ORIENTATION_TAG, 1) in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width  # report the displayed size, not the stored one
    scale = resize / min(image.size)
    image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    return _decode_with_pil(image), width, height


def _decode_jpeg(data: bytes) -> torch.Tensor:
    """libjpeg-turbo through torchvision: faster than PIL for the common case."""
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work
        # and are what this project measures against. Moving is an extra dependency, left
        # for later; until then the warning would repeat for every image.
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=".*decoding and encoding capabilities of TorchVision")
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)


def _decode_with_pil(image: Image.Image) -> torch.Tensor:
    image.load()
    image = ImageOps.exif_transpose(image)
    return F.pil_to_tensor(to_rgb(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB the way a viewer would show it (alpha is dropped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: PIL's own conversion clips at 255, which turns most of it white.
        scaled = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")  # 2-D uint8: mode L
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P":
        # Via RGBA so that palette transparency does not trigger PIL's warning; same colours.
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() always copies


def resize_and_crop(pixels: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Shorter side to `resize` (antialiased, like PIL), then the centre `crop` square.

    When downscaling, only the source region under the crop is resized, which is about half
    the work on ImageNet-sized photos. Each axis' region starts where the full resize's sampling grid
    falls within 1/64 of an output pixel of a whole source pixel, so the kept pixels are
    those of the full resize, sampled at most that far off; an axis with no such start
    nearby is only cut on its far side, which is exact.
    """
    radius = _FILTER_RADIUS.get(preprocess.interpolation)
    height, width = pixels.shape[-2:]
    resized_height, resized_width = resized_size(height, width, preprocess.resize)
    crop = preprocess.crop
    # Downscaling only: torch copies an axis whose output length equals its input length
    # whatever the scale asked for, which a slightly enlarged region can hit.
    if (radius is not None and crop <= min(resized_height, resized_width)
            and resized_height <= height and resized_width <= width):
        rows = _Span.under_crop(height, resized_height, crop, radius)
        cols = _Span.under_crop(width, resized_width, crop, radius)
        # Copied as height x width x channel rows: the channels_last layout that torch's
        # vectorised uint8 resize needs, and the cheapest copy from a decoder's output.
        region = pixels.permute(1, 2, 0)[rows.start:rows.stop, cols.start:cols.stop]
        region = region.contiguous().permute(2, 0, 1).unsqueeze(0)
        resized = torch.nn.functional.interpolate(
            region, scale_factor=(1 / rows.scale, 1 / cols.scale), mode=preprocess.interpolation,
            antialias=True, align_corners=False, recompute_scale_factor=False)
        kept = resized[0, :, rows.skip:rows.skip + crop, cols.skip:cols.skip + crop]
        if kept.shape[-2:] == (crop, crop):  # else rounding at an edge: take the full way
            return kept.contiguous()
    mode = InterpolationMode(preprocess.interpolation)
    resized = F.resize(pixels, [preprocess.resize], interpolation=mode, antialias=True)
    return F.center_crop(resized, [crop, crop]).contiguous()


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `resize`, the longer is truncated."""
    if width <= height:
        return int(resize * height / width), resize
    return resize, int(resize * width / height)


# How far the antialiased filter reaches, in output pixels, per interpolation we crop early.
_FILTER_RADIUS = {"bilinear": 1.0, "bicubic": 2.0}
_MAX_SKIP = 16  # output pixels resized before the crop while looking for a whole-pixel start
_ALIGNMENT = 1 / 64  # output pixels of sampling shift accepted for a region start


@dataclass(frozen=True)
class _Span:
    """One axis of the region resized: source [start, stop), output pixels to skip, scale."""

    start: int
    stop: int
    skip: int
    scale: float

    @classmethod
    def under_crop(cls, size: int, resized: int, crop: int, radius: float) -> "_Span":
        scale = size / resized
        first = int(round((resized - crop) / 2.0))  # first kept pixel, as CenterCrop rounds
        reach = radius * max(scale, 1.0) + 1  # source pixels the filter reads, plus rounding
        stop = min(size, math.ceil((first + crop) * scale + reach))
        for skip in range(min(first, _MAX_SKIP) + 1):
            origin = (first - skip) * scale
            if skip * scale >= reach and abs(origin - round(origin)) <= _ALIGNMENT * scale:
                return cls(round(origin), stop, skip, scale)
        return cls(0, stop, first, scale)  # from the edge: exact, only the far side is cut
