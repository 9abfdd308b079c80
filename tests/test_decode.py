"""Decoding: orientation, colour modes, sizes, and per-image errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision import transforms as T

from pipeline.decode import DECODE_ERRORS, ImageError, decode
from pipeline.preprocess import Preprocess

SMALL = Preprocess(resize=40, crop=32)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def halves_image(width=80, height=40) -> Image.Image:
    """Left half red, right half blue: orientation is visible in the crop."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_and_size_is_as_displayed(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated 90 degrees clockwise
    data = encode(halves_image(), fmt, exif=exif.tobytes())
    decoded = decode(data, SMALL, max_pixels=10**8)
    assert (decoded.width, decoded.height) == (40, 80)
    red, blue = decoded.image[0].float(), decoded.image[2].float()
    # after rotating clockwise the red half is on top
    assert red[:8].mean() > 200 and blue[:8].mean() < 60
    assert blue[-8:].mean() > 200 and red[-8:].mean() < 60


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_every_colour_mode_becomes_rgb_uint8(mode):
    rgb = halves_image()
    if mode == "I;16":
        grey = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        image = Image.fromarray(grey)  # uint16: mode I;16
        fmt = "PNG"
    else:
        image = rgb.convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
    decoded = decode(encode(image, fmt), SMALL, max_pixels=10**8)
    assert decoded.image.shape == (3, 32, 32) and decoded.image.dtype == torch.uint8
    if mode == "I;16":  # 16-bit levels are scaled, not clipped to white
        expected = T.functional.pil_to_tensor(rgb.convert("L").convert("RGB").resize((64, 32)))
        assert abs(decoded.image.float().mean() - expected.float().mean()) < 3


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (50, 50), c) for c in [(255, 0, 0), (0, 255, 0)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = decode(buffer.getvalue(), SMALL, max_pixels=10**8).image
    assert image[0].float().mean() > 200 and image[1].float().mean() < 50


def test_extreme_aspect_ratios_still_give_the_reference_crop():
    """Pixels compared, not only the shape; more sizes and formats in test_fidelity.py."""
    reference = T.Compose([T.Resize(40), T.CenterCrop(32), T.PILToTensor()])
    rng = np.random.default_rng(2)
    for size in [(1, 1), (3000, 3), (2, 900)]:
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        ours = decode(encode(image, "PNG"), SMALL, 10**8).image
        assert ours.shape == (3, 32, 32)
        assert (ours.float() - reference(image).float()).abs().mean() <= 0.25, size


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_images_over_the_pixel_limit_are_refused_from_the_header(fmt, monkeypatch):
    import simplejpeg

    data = encode(Image.new("L", (4000, 4000)), fmt)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", None)  # never reached
    monkeypatch.setattr(ImageFile.ImageFile, "load", None)
    with pytest.raises(ImageError, match="4000x4000 is over the --max-pixels limit"):
        decode(data, SMALL, max_pixels=10_000_000)


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff" + bytes(range(256)) * 4,
                                  b"plain text, not a png"])
def test_broken_bytes_raise_a_per_image_error(data):
    with pytest.raises((ImageError, *DECODE_ERRORS)):
        decode(data, SMALL, max_pixels=10**8)


def test_truncated_jpeg_is_an_error_not_a_grey_guess():
    data = encode(halves_image(400, 300), "JPEG", quality=90)
    with pytest.raises((ImageError, *DECODE_ERRORS)):
        decode(data[: len(data) // 2], SMALL, max_pixels=10**8)


@pytest.mark.parametrize("size, resize, decoded_size", [
    ((500, 375), 256, (375, 500)), ((2200, 1600), 256, (1600, 2200)),
    ((2731, 2048), 256, (1024, 1366)), ((4000, 3000), 256, (1500, 2000)),
    ((4000, 3000), 232, (1500, 2000)), ((8000, 6200), 256, (1550, 2000)),
    ((12000, 8200), 256, (1025, 1500))],
    ids=["imagenet-size", "3.5-megapixel", "5.6-megapixel", "12-megapixel", "12-megapixel-232",
         "50-megapixel", "98-megapixel"])
def test_large_jpegs_are_decoded_at_the_dct_scale_that_keeps_the_bound(size, resize,
                                                                       decoded_size,
                                                                       monkeypatch):
    """The speed path is taken where the sweep in test_fidelity.py shows it is safe: the
    scaled image still 4x the resize or more; never where it is not."""
    import simplejpeg

    decoded = []
    real_decode = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg",
                        lambda *a, **k: decoded.append(real_decode(*a, **k).shape[:2])
                        or real_decode(*a, **k))
    data = encode(Image.new("RGB", size, (90, 120, 150)), "JPEG", quality=50)
    assert decode(data, Preprocess(resize=resize), max_pixels=10**9).image.shape == (3, 224, 224)
    assert decoded == [decoded_size]


def test_heic_is_turned_once_whatever_its_orientation():
    """libheif applies the turn written in the file; exif_transpose must not apply it again."""
    import pillow_heif
    from PIL import ImageOps

    from tests.photos import photo

    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    stored = photo(320, 240, seed=5)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        heic = io.BytesIO()
        # Full-resolution chroma, so that what is left is our decode's difference, not
        # HEVC's 4:2:0 (about 2 levels on this photo); a wrong turn differs by 60 or more.
        pillow_heif.from_pillow(stored).save(heic, quality=90, chroma=444, exif=exif.tobytes())
        ours = decode(heic.getvalue(), Preprocess(), max_pixels=10**8)
        shown = ImageOps.exif_transpose(Image.open(io.BytesIO(encode(stored, "PNG",
                                                                     exif=exif.tobytes()))))
        assert (ours.width, ours.height) == shown.size, orientation
        difference = (ours.image.float() - reference(shown).float()).abs().mean()
        assert difference <= 1.5, (orientation, difference)


def test_jpeg_that_libjpeg_only_warns_about_is_read_as_pil_reads_it():
    """Stray bytes before a marker: libjpeg-turbo's strict mode refuses, PIL reads the image."""
    data = encode(halves_image(400, 300), "JPEG", quality=90)
    scan = data.index(b"\xff\xda")
    stray = data[:scan] + b"\x00\x00" + data[scan:]
    ours = decode(stray, SMALL, max_pixels=10**8).image
    reference = T.Compose([T.Resize(40), T.CenterCrop(32), T.PILToTensor()])
    expected = reference(Image.open(io.BytesIO(data)))
    assert (ours.float() - expected.float()).abs().mean() <= 1.5


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resizing_only_the_cropped_region_matches_the_reference(interpolation, monkeypatch):
    """Landscape, portrait, up- and downscaling, resize == crop: the crop is the reference's."""
    from torchvision.transforms import InterpolationMode

    from pipeline.decode import resize_and_crop
    from tests.photos import photo

    resized_pixels = []
    real_interpolate = torch.nn.functional.interpolate
    monkeypatch.setattr(torch.nn.functional, "interpolate", lambda x, *a, **k: (
        resized_pixels.append(x.shape[-2] * x.shape[-1]) or real_interpolate(x, *a, **k)))
    mode = InterpolationMode(interpolation)
    for width, height in [(500, 375), (375, 500), (640, 427), (1024, 768), (250, 188),
                          (100, 80), (99, 71), (1283, 611)]:
        for resize, crop in [(256, 224), (232, 224), (224, 224), (342, 299), (72, 64)]:
            image = photo(width, height, seed=width + resize)
            reference = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(crop),
                                   T.PILToTensor()])(image)
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
            ours = resize_and_crop(pixels, Preprocess(resize=resize, crop=crop,
                                                      interpolation=interpolation))
            assert ours.shape == reference.shape
            # Measured: at most 0.30 (the whole-image resize: 0.24); a crop off by one
            # pixel is several levels.
            assert (ours.float() - reference.float()).abs().mean() <= 0.5, (width, height)
            if (width, height, resize) == (500, 375, 256):
                assert resized_pixels[-1] < 0.7 * width * height  # the work saved is real


@pytest.mark.parametrize("size", [(80, 40), (37, 300), (1200, 900), (901, 1603), (4000, 3000)])
@pytest.mark.parametrize("orientation", [1, 6])
def test_plain_resize_keeps_the_whole_image_at_the_input_size(size, orientation):
    """Preprocess(resize=None): Keras' recipe, the whole picture squeezed to the input, no crop;
    against torchvision's own resize of PIL's full decode, DCT-scaled JPEG decode or not."""
    width, height = size
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([cols * 255 // width, rows * 255 // height,
                       (cols + rows) * 255 // (width + height)], -1).astype(np.uint8)
    pixels[:, : width // 8, 0] = 255  # a red left edge: a centre crop would lose it
    stretch = Preprocess(resize=None, crop=24)
    exif = Image.Exif()
    exif[0x0112] = orientation
    for fmt in ("PNG", "JPEG"):
        data = encode(Image.fromarray(pixels), fmt, exif=exif.tobytes(),
                      **({"quality": 95} if fmt == "JPEG" else {}))
        decoded = decode(data, stretch, max_pixels=10**8)
        shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        full = torch.from_numpy(np.array(shown)).permute(2, 0, 1)
        reference = T.functional.resize(full, [24, 24], antialias=True)
        assert decoded.image.shape == (3, 24, 24)
        assert (decoded.width, decoded.height) == shown.size
        difference = (decoded.image.float() - reference.float()).abs()
        assert difference.mean() < 0.25 and difference.max() <= 2, (fmt, difference.mean())
