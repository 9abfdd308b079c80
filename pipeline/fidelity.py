"""Our crops against the tutorials' transform on the same files: the fidelity bound, checked."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageOps
from torchvision import transforms as T

from pipeline.decode import DECODE_ERRORS, ImageError, decode
from pipeline.preprocess import Preprocess

# Per image, in levels of 255 of the uint8 crop: the bound our fast paths are held to (the
# sweep in tests/test_fidelity.py; docs/fidelity.md says how it was chosen).
MEAN_BOUND = 0.25
MAX_BOUND = 8


@dataclass(frozen=True)
class FileDifference:
    path: str
    mean: float  # mean absolute difference over the crop's pixels and channels
    max: float  # the largest single difference


@dataclass
class Fidelity:
    compared: int = 0
    unreadable: int = 0  # error rows in a run: nothing to compare
    mean: float = 0.0  # over all compared images
    worst_mean: FileDifference | None = None
    worst_max: FileDifference | None = None
    over_bound: list[FileDifference] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_bound": MEAN_BOUND, "max_bound": MAX_BOUND}


def reference_crop(data: bytes, preprocess: Preprocess):
    """torchvision's Resize + CenterCrop on the PIL image, turned as EXIF says (as we label)."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    mode = T.InterpolationMode(preprocess.interpolation)
    return T.Compose([T.Resize(preprocess.resize, interpolation=mode),
                      T.CenterCrop(preprocess.crop), T.PILToTensor()])(image)


def compare(files: Iterable[tuple[str, bytes | Exception]], preprocess: Preprocess,
            max_pixels: int) -> Fidelity:
    """Decode each image both ways and measure the difference of the two crops.

    `files`: each image's name and bytes (or why they could not be read), as a source
    fetches them.
    """
    found = Fidelity()
    total = 0.0
    for path, data in files:
        if isinstance(data, Exception):
            found.unreadable += 1
            continue
        try:
            ours = decode(data, preprocess, max_pixels).image.float()
            expected = reference_crop(data, preprocess).float()
        except (ImageError, *DECODE_ERRORS):
            found.unreadable += 1
            continue
        levels = (ours - expected).abs()
        difference = FileDifference(path, levels.mean().item(), levels.max().item())
        found.compared += 1
        total += difference.mean
        if found.worst_mean is None or difference.mean > found.worst_mean.mean:
            found.worst_mean = difference
        if found.worst_max is None or difference.max > found.worst_max.max:
            found.worst_max = difference
        if difference.mean > MEAN_BOUND or difference.max > MAX_BOUND:
            found.over_bound.append(difference)
    found.mean = total / found.compared if found.compared else 0.0
    return found


def render(found: Fidelity, preprocess: Preprocess) -> str:
    lines = [f"our crops against the reference transform (PIL, Resize({preprocess.resize}, "
             f"{preprocess.interpolation}), CenterCrop({preprocess.crop})) on "
             f"{found.compared} image(s), in levels of 255"
             + (f"; {found.unreadable} unreadable, not compared" if found.unreadable else "")]
    if not found.compared:
        return lines[0]
    lines += [f"  mean difference {found.mean:.3f}",
              f"  worst image by mean {found.worst_mean.mean:.3f}: {found.worst_mean.path}",
              f"  largest pixel difference {found.worst_max.max:.0f}: {found.worst_max.path}"]
    if found.over_bound:
        lines.append(f"  {len(found.over_bound)} image(s) over the bound (mean {MEAN_BOUND}, "
                     f"max {MAX_BOUND}), first {found.over_bound[0].path}: please report it")
    else:
        lines.append(f"  every image within the bound (mean <= {MEAN_BOUND}, max <= {MAX_BOUND})")
    return "\n".join(lines)
