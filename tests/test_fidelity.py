"""Our crops against the reference transform, swept over sizes, shapes, orientations, modes.

The reference is torchvision's Resize + CenterCrop on the PIL image (PIL decodes, PIL
resizes), as the tutorials' loop does it; nothing here compares the code with itself. The
bound is in levels of 255 per pixel of the uint8 crop: a mean of 0.25 and a maximum of 8.
A crop shifted by one pixel, or a DCT-scaled decode used as if it were the image, breaks the
mean by tens of times at the sizes that are exact multiples of the resize.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from pipeline.decode import decode
from pipeline.preprocess import Preprocess
from pipeline.backends import resolve_preprocess
from tests.photos import photo

MEAN_BOUND, MAX_BOUND = 0.25, 8

PREPROCESSING = {
    "tutorials-256-bilinear": Preprocess(),
    # named weights' own: ResNet-50 V2 (232, bilinear) and EfficientNet-B0 (256, bicubic)
    "resnet50-v2-232-bilinear": resolve_preprocess("resnet50", "IMAGENET1K_V2"),
    "efficientnet-b0-256-bicubic": resolve_preprocess("efficientnet_b0", "IMAGENET1K_V1"),
}
ASPECTS = {"landscape-4:3": (4, 3), "portrait-3:4": (3, 4), "landscape-16:9": (16, 9)}
LONGEST = 7112  # 16:9 at a shorter side of 4000


def shorter_sides(resize: int) -> list[int]:
    """224 to 4000 px every 64, and each place where a decode's choice may change, +/- 1.

    Those places: 2x, 4x, 8x the resize (where a 1/2, 1/4, 1/8 decode would equal the
    resize) and 3x to 16x (where a rule for the DCT scale could step; ours steps at 8x).
    """
    edges = [k * resize for k in (1, 2, 3, 4, 6, 8, 12, 16)]
    sizes = set(range(224, 4001, 64)) | {e + d for e in edges for d in (-1, 0, 1)}
    return sorted(s for s in sizes if 224 <= s <= 4000)


@pytest.fixture(scope="module")
def master() -> np.ndarray:
    """One photo-like field to cut every test image from (a new one per size costs minutes)."""
    left = np.asarray(photo(5334, 4000, seed=11))
    return np.concatenate([left, left[:, ::-1][:, :LONGEST - 5334]], axis=1)


def cut(master: np.ndarray, shorter: int, aspect: tuple[int, int]) -> Image.Image:
    across, down = aspect
    if across >= down:
        width, height = shorter * across // down, shorter
        return Image.fromarray(master[:height, :width])
    width, height = shorter, shorter * down // across
    return Image.fromarray(master[:width, :height].transpose(1, 0, 2))  # portrait: turned


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def reference(data: bytes, preprocess: Preprocess) -> torch.Tensor:
    """The tutorials' transform on the image as a viewer shows it."""
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    mode = T.InterpolationMode(preprocess.interpolation)
    return T.Compose([T.Resize(preprocess.resize, interpolation=mode),
                      T.CenterCrop(preprocess.crop), T.PILToTensor()])(shown)


def difference(data: bytes, preprocess: Preprocess) -> tuple[float, float]:
    ours = decode(data, preprocess, max_pixels=10**9).image.float()
    expected = reference(data, preprocess).float()
    assert ours.shape == expected.shape
    levels = (ours - expected).abs()
    return levels.mean().item(), levels.max().item()


def assert_within_bound(measured: dict) -> None:
    worst_mean = max(measured, key=lambda k: measured[k][0])
    worst_max = max(measured, key=lambda k: measured[k][1])
    assert measured[worst_mean][0] <= MEAN_BOUND, (worst_mean, measured[worst_mean])
    assert measured[worst_max][1] <= MAX_BOUND, (worst_max, measured[worst_max])


@pytest.mark.parametrize("aspect", ASPECTS, ids=list(ASPECTS))
@pytest.mark.parametrize("name", PREPROCESSING, ids=list(PREPROCESSING))
def test_jpeg_crops_match_the_reference_at_every_size(master, name, aspect):
    preprocess = PREPROCESSING[name]
    measured = {}
    for shorter in shorter_sides(preprocess.resize):
        data = encode(cut(master, shorter, ASPECTS[aspect]), quality=90)
        measured[shorter] = difference(data, preprocess)
    assert_within_bound(measured)


@pytest.mark.parametrize("name", PREPROCESSING, ids=list(PREPROCESSING))
def test_every_exif_orientation_matches_at_every_dct_scale(master, name):
    """A turned photo is cut and scaled as displayed: at full size and each DCT scale."""
    preprocess = PREPROCESSING[name]
    measured = {}
    for shorter in (500, 2 * preprocess.resize, 1600, 3024):
        stored = cut(master, shorter, (4, 3))
        for orientation in range(1, 9):
            exif = Image.Exif()
            exif[0x0112] = orientation
            data = encode(stored, quality=90, exif=exif.tobytes())
            ours = decode(data, preprocess, max_pixels=10**9)
            shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
            assert (ours.width, ours.height) == shown.size, (shorter, orientation)
            measured[(shorter, orientation)] = difference(data, preprocess)
    assert_within_bound(measured)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_greyscale_and_cmyk_jpegs_match_at_every_size(master, mode):
    preprocess = PREPROCESSING["tutorials-256-bilinear"]
    measured = {}
    for shorter in shorter_sides(preprocess.resize)[::3]:
        image = cut(master, shorter, (4, 3)).convert(mode)
        measured[shorter] = difference(encode(image, quality=90), preprocess)
    assert_within_bound(measured)


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("WEBP", {"lossless": True}),
                                          ("TIFF", {}), ("BMP", {}), ("PPM", {}),
                                          ("JPEG2000", {"irreversible": False})],
                         ids=["PNG", "WebP", "TIFF", "BMP", "PPM", "JPEG2000"])
def test_other_formats_match_the_reference(master, fmt, options):
    """PIL decodes these; extreme aspect ratios (a 5-pixel-high strip) included."""
    preprocess = PREPROCESSING["tutorials-256-bilinear"]
    measured = {}
    for width, height in [(500, 375), (375, 500), (1200, 900), (600, 5), (9, 700)]:
        image = Image.fromarray(np.ascontiguousarray(master[:height, :width]))
        measured[(width, height)] = difference(encode(image, fmt, **options), preprocess)
    assert_within_bound(measured)


def test_bench_fidelity_reports_each_files_difference_from_the_reference(cli, tmp_path,
                                                                         master):
    """The user-facing check: its figures are the differences measured here, file by file."""
    import json

    folder = tmp_path / "photos"
    folder.mkdir()
    preprocess = PREPROCESSING["resnet50-v2-232-bilinear"]
    expected = {}
    for shorter, aspect in [(375, (4, 3)), (1024, (3, 4)), (2048, (16, 9))]:
        path = folder / f"{shorter}.jpg"
        path.write_bytes(encode(cut(master, shorter, aspect), quality=90))
        expected[str(path)] = difference(path.read_bytes(), preprocess)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    report = tmp_path / "fidelity.json"
    result = cli("bench", folder, "--fidelity", "--model", "resnet50", "--weights",
                 "IMAGENET1K_V2", "--json", report)  # named weights: no download needed
    assert result.exit_code == 0, result.output
    found = json.loads(report.read_text())["fidelity"]
    assert found["compared"] == 3 and found["unreadable"] == 1
    worst = max(expected, key=lambda p: expected[p][0])
    assert found["worst_mean"]["path"] == worst
    assert found["worst_mean"]["mean"] == pytest.approx(expected[worst][0])
    assert found["worst_max"]["max"] == max(m for _, m in expected.values())
    assert found["mean"] == pytest.approx(np.mean([m for m, _ in expected.values()]))
    assert found["over_bound"] == []
    assert "Resize(232, bilinear)" in result.output and worst in result.output
