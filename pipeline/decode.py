"""Image bytes to a uint8 CHW crop: EXIF orientation, RGB, resize, centre crop; errors raised per item."""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
import pi_heif
import simplejpeg
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.errors import ImageError
from pipeline.pixels import DECODE_ERRORS, to_rgb  # noqa: F401 (the decoders' own)
from pipeline.preprocess import Preprocess

# We refuse oversized images ourselves (--max-pixels, from the header, before decoding), so
# PIL's own global guard, which warns or raises at a fixed size, is switched off.
Image.MAX_IMAGE_PIXELS = None
# HEIC/HEIF (iPhones' photos) through libheif. Its opener applies the file's rotation and
# mirroring and resets the EXIF orientation to 1, so exif_transpose below does not turn it
# twice. One decode thread, as each loader worker has one torch thread: libheif's default
# of four would oversubscribe a small CPU.
pi_heif.register_heif_opener()
pi_heif.options.DECODE_THREADS = 1

_JPEG_START = b"\xff\xd8\xff"  # SOI and the first marker's 0xFF
_DCT_FACTORS = (8, 4, 2, 1)  # the downscales libjpeg-turbo does with vectorised IDCTs
# How much the resize must still shrink a DCT-scaled decode: see dct_factor.
_DCT_MIN_DOWNSCALE = 4
# Each scan of a progressive JPEG is a pass over the whole image, however few bytes it has:
# a crafted file of tiny scans takes minutes to decode (libjpeg-turbo's "Two Issues with
# the JPEG Standard"). Encoders write about 10; 500 is the limit libjpeg-turbo's fuzzers use.
MAX_JPEG_SCANS = 500
_SEQUENTIAL_FRAMES = {0xC0, 0xC1}  # SOF0 baseline, SOF1 extended: Huffman, not progressive

_EXIF_ORIENTATION_TAG = 0x0112
# What each EXIF orientation asks of the stored pixels, as PIL's ImageOps.exif_transpose
# does it: (swap rows and columns first, then reverse the rows, reverse the columns).
_ORIENT = {
    1: (False, False, False),
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, False, True),  # turned clockwise
    7: (True, True, True),
    8: (True, True, False),  # turned anticlockwise
}


@dataclass(frozen=True)
class Decoded:
    image: torch.Tensor  # uint8 (3, crop, crop); a view, copied once into its batch
    width: int  # as displayed, after EXIF orientation
    height: int


def decode(data: bytes, preprocess: Preprocess, max_pixels: int) -> Decoded:
    """Decode and preprocess one image; raises ImageError or one of DECODE_ERRORS."""
    if not data:
        raise ImageError("empty file")
    if data.startswith(_JPEG_START):
        header = _JpegHeader.read(data)
        _check_scans(data, header)
        try:
            decoded = _decode_jpeg(data, header, preprocess, max_pixels)
        except ValueError:
            # libjpeg-turbo's strict mode refuses what libjpeg only warns about (stray bytes
            # before a marker, a truncated tail) and some rare layouts; PIL, the reference
            # decoder, decides: it reads the former and refuses truncated files too.
            decoded = None
        if decoded is not None:
            return decoded
    image = Image.open(io.BytesIO(data))  # reads the header only
    _check_size(*image.size, max_pixels)
    pixels = _decode_with_pil(image)
    height, width = pixels.shape[-2:]
    return Decoded(image=resize_and_crop(pixels, preprocess), width=int(width),
                   height=int(height))


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} is over the --max-pixels limit of {max_pixels}")


def _decode_jpeg(data: bytes, header: _JpegHeader, preprocess: Preprocess,
                 max_pixels: int) -> Decoded | None:
    """libjpeg-turbo through simplejpeg, downscaled in the DCT when the photo is large.

    libjpeg can decode at 1/2, 1/4 or 1/8 scale for a fraction of the work (scales between
    1/2 and 1 are slower than a full decode: they have no vectorised IDCT). None for CMYK,
    which PIL's Adobe handling gets right.
    """
    height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    _check_size(width, height, max_pixels)
    if colourspace not in ("YCbCr", "Gray", "RGB"):
        return None
    # A resize that samples (not antialiased) must sample the full image: a DCT-scaled
    # decode would average first.
    factor = (dct_factor(min(width, height), preprocess.resize or max(preprocess.size))
              if preprocess.antialias else 1)
    transpose, *flips = _ORIENT.get(_jpeg_orientation(data, header), _ORIENT[1])
    while True:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // factor),
                                        min_width=-(-width // factor))
        # Turned as displayed by a view; the mirroring is left to resize_and_crop, because a
        # scaled decode's pixel grid starts at the stored image's first row and column.
        chw = torch.from_numpy(pixels).permute((2, 1, 0) if transpose else (2, 0, 1))
        shown_height, shown_width = (width, height) if transpose else (height, width)
        crop = resize_and_crop(chw, preprocess, (shown_height, shown_width, factor),
                               tuple(flips))
        if crop is not None:
            return Decoded(image=crop, width=shown_width, height=shown_height)
        factor = 1  # the scaled decode fell short at an edge: decode in full, which cannot


def dct_factor(shorter_side: int, resize: int) -> int:
    """The DCT downscale (8, 4, 2 or 1) that keeps our crop within the fidelity bound.

    The scaled IDCT blurs like a box of `factor` pixels before the resize's own filter; its
    share of the result falls as the resize's own downscale grows. Measured against the
    reference (docs/fidelity.md): with the scaled image still 4x the resize or more, crops
    within 0.15 levels on average and top-1 scores within 1.2e-3 on a score-sensitive
    checkpoint; at 3x, 0.19 and 2.5e-3 (over fp32's 2e-3); at 1x, 0.45 levels.
    """
    return next(f for f in _DCT_FACTORS
                if shorter_side >= f * resize * _DCT_MIN_DOWNSCALE or f == 1)


@dataclass(frozen=True)
class _JpegHeader:
    """What the segments before a JPEG's first scan say, from one walk over a few of them."""

    exif: bool  # an EXIF segment, or a header the walk cannot follow: PIL reads it
    one_scan: bool  # a sequential frame whose first scan holds every component

    @classmethod
    def read(cls, data: bytes) -> _JpegHeader:
        exif, components = False, None
        position = 2
        while position + 4 <= len(data) and data[position] == 0xFF:
            marker = data[position + 1]
            if marker == 0xFF:  # a fill byte before a marker
                position += 1
                continue
            if marker == 0xDA:  # start of scan: Ns, the components in it, == Nf?
                return cls(exif, bool(components)
                           and data[position + 4:position + 5] == components)
            if marker == 0xE1 and data[position + 4:position + 10] == b"Exif\x00\x00":
                exif = True
            elif marker in _SEQUENTIAL_FRAMES:
                components = data[position + 9:position + 10]  # Nf of the frame header
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
        return cls(exif=True, one_scan=False)


def _check_scans(data: bytes, header: _JpegHeader) -> None:
    """Refuse a JPEG of more scans than any encoder writes, before decoding it.

    Counting them is a pass over the whole file, so the usual camera or phone photo is not
    counted: a sequential JPEG whose first scan holds every component has no other (libjpeg
    refuses a second at once). Anything else is, a header the walk cannot follow included.
    """
    if header.one_scan:
        return
    # Entropy-coded data never holds the marker (0xFF is stuffed there); an EXIF thumbnail
    # adds its own few.
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise ImageError(f"a JPEG of {scans} scans, over the limit of "
                         f"{MAX_JPEG_SCANS}: encoders write about 10, and so many could take "
                         f"minutes to decode (a known attack on JPEG decoders)")


def _jpeg_orientation(data: bytes, header: _JpegHeader) -> int:
    """The EXIF orientation, asking PIL only when the file has an EXIF segment.

    Most web images have none, and PIL's header parse is a measurable share of a small
    image's decode; the walk over the marker segments before the image data is not.
    """
    if not header.exif:
        return 1
    return Image.open(io.BytesIO(data)).getexif().get(_EXIF_ORIENTATION_TAG, 1)


def _decode_with_pil(image: Image.Image) -> torch.Tensor:
    image.load()
    # In place: otherwise an image with nothing to turn is copied whole, to no purpose.
    ImageOps.exif_transpose(image, in_place=True)
    return F.pil_to_tensor(to_rgb(image))


def resize_and_crop(pixels: torch.Tensor, preprocess: Preprocess,
                    scaled_from: tuple[int, int, int] | None = None,
                    mirrored: tuple[bool, bool] = (False, False)) -> torch.Tensor | None:
    """Shorter side to `resize` (antialiased, like PIL), then the centre `crop` square.

    `scaled_from` is (height, width, factor) when `pixels` is libjpeg's 1/factor-scale decode
    of an image of that size. The resize and the crop box are then the original image's,
    exactly as torchvision computes them, and the scaled pixels are only what that sampling
    grid reads: decoded pixel j covers original pixels [j*factor, (j+1)*factor). `mirrored`
    says which axes (rows, columns) are to be shown reversed: the crop box is mirrored onto
    the pixels as they are, and only the crop is reversed, so the grid keeps its origin.
    Returns None when a scaled decode cannot give the crop (rounding at its far edge):
    decode at full size then.

    When downscaling, only the source region under the crop is resized, which is about half
    the work on ImageNet-sized photos. Each axis' region starts where the full resize's
    sampling grid falls within 1/64 of an output pixel of a whole source pixel, so the kept
    pixels are those of the full resize, sampled at most that far off; an axis with no such
    start nearby is only cut on its far side, which is exact.
    """
    if preprocess.stretch:
        return _stretch(pixels, preprocess, scaled_from, mirrored)
    radius = _FILTER_RADIUS.get(preprocess.interpolation)
    height, width = pixels.shape[-2:]
    full_height, full_width, factor = scaled_from or (height, width, 1)
    resized_height, resized_width = resized_size(full_height, full_width, preprocess.resize)
    crop = preprocess.crop
    reversed_axes = [axis for axis, reverse in zip((-2, -1), mirrored) if reverse]
    # Downscaling only: torch copies an axis whose output length equals its input length
    # whatever the scale asked for, which a slightly enlarged region can hit.
    if (radius is not None and preprocess.antialias and crop <= min(resized_height, resized_width)
            and resized_height <= full_height and resized_width <= full_width):
        # torchvision samples output pixel i at (i + 0.5) * full / resized in the original.
        rows = _Span.under_crop(height, full_height / resized_height / factor, resized_height,
                                crop, radius, mirrored[0])
        cols = _Span.under_crop(width, full_width / resized_width / factor, resized_width,
                                crop, radius, mirrored[1])
        # Copied as height x width x channel rows: the channels_last layout that torch's
        # vectorised uint8 resize needs, and the cheapest copy from a decoder's output. The
        # batch dimension goes in before the permute: added after it, its stride does not
        # say channels_last, and torch takes a generic path: half as long again, and planar.
        region = pixels.permute(1, 2, 0)[rows.start:rows.stop, cols.start:cols.stop]
        region = region.contiguous().unsqueeze(0).permute(0, 3, 1, 2)
        resized = torch.nn.functional.interpolate(
            region, scale_factor=(1 / rows.scale, 1 / cols.scale), mode=preprocess.interpolation,
            antialias=True, align_corners=False, recompute_scale_factor=False)
        kept = resized[0, :, rows.skip:rows.skip + crop, cols.skip:cols.skip + crop]
        if kept.shape[-2:] == (crop, crop):  # else rounding at an edge: take the full way
            return kept.flip(reversed_axes) if reversed_axes else kept
    if factor != 1:
        return None  # the full way resizes what it is given, which must be the original
    if reversed_axes:
        pixels = pixels.flip(reversed_axes)
    mode = InterpolationMode(preprocess.interpolation)
    resized = F.resize(pixels, [preprocess.resize], interpolation=mode,
                       antialias=preprocess.antialias)
    return F.center_crop(resized, [crop, crop])


def _stretch(pixels: torch.Tensor, preprocess: Preprocess,
             scaled_from: tuple[int, int, int] | None,
             mirrored: tuple[bool, bool]) -> torch.Tensor | None:
    """The whole image to crop x crop, aspect ratio and all (no crop): Keras' recipe.

    A scaled decode is resized on the original's sampling grid, as in resize_and_crop
    (decoded pixel j covers original pixels [j*factor, (j+1)*factor)): its last row or
    column may cover less than `factor`, which a resize to crop/size of it would stretch.
    """
    out_height, out_width = preprocess.size
    height, width = pixels.shape[-2:]
    full_height, full_width, factor = scaled_from or (height, width, 1)
    reversed_axes = [axis for axis, reverse in zip((-2, -1), mirrored) if reverse]
    if factor == 1:
        if reversed_axes:
            pixels = pixels.flip(reversed_axes)
        return F.resize(pixels, [out_height, out_width], antialias=preprocess.antialias,
                        interpolation=InterpolationMode(preprocess.interpolation))
    # mirrored after the resize: the grid keeps its origin at the stored first pixel
    region = pixels.permute(1, 2, 0).contiguous().unsqueeze(0).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        region.float() if preprocess.interpolation not in _FILTER_RADIUS else region,
        scale_factor=(out_height * factor / full_height, out_width * factor / full_width),
        mode=preprocess.interpolation, antialias=True, align_corners=False,
        recompute_scale_factor=False)[0, :, :out_height, :out_width]
    if resized.shape[-2:] != (out_height, out_width):
        return None  # rounding at the far edge: the full decode
    if resized.dtype != torch.uint8:
        resized = resized.round().clamp(0, 255).to(torch.uint8)
    return resized.flip(reversed_axes) if reversed_axes else resized


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
    @functools.lru_cache(maxsize=4096)  # datasets repeat a few sizes; the search is ~10 us
    def under_crop(cls, size: int, scale: float, resized: int, crop: int, radius: float,
                   mirrored: bool) -> "_Span":
        """The span of `size` source pixels, sampled every `scale`, under the crop."""
        first = int(round((resized - crop) / 2.0))  # first kept pixel, as CenterCrop rounds
        if mirrored:  # the same box seen from the other end, where (resized - crop) is odd
            first = resized - crop - first
        reach = radius * max(scale, 1.0) + 1  # source pixels the filter reads, plus rounding
        stop = min(size, math.ceil((first + crop) * scale + reach))
        for skip in range(min(first, _MAX_SKIP) + 1):
            origin = (first - skip) * scale
            if skip * scale >= reach and abs(origin - round(origin)) <= _ALIGNMENT * scale:
                return cls(round(origin), stop, skip, scale)
        return cls(0, stop, first, scale)  # from the edge: exact, only the far side is cut
