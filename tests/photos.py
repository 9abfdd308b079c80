"""Synthetic photos for fidelity tests and benchmarks: smooth fields, soft shapes, noise."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Not a real photo, but with a photo's mix of smooth areas, edges and sensor noise."""
    rng = np.random.default_rng(seed)
    field = np.zeros((height, width, 3), np.float32)
    for cells, weight in [(4, 90), (12, 45), (40, 22), (120, 10)]:
        coarse = rng.normal(0, 1, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        channels = [np.asarray(Image.fromarray(coarse[..., c]).resize((width, height),
                                                                     Image.BICUBIC))
                    for c in range(3)]
        field += weight * np.stack(channels, -1)
    image = Image.fromarray(np.clip(field + 128, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(width // 40, width // 6))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - r, y - r, x + r, y + r], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=max(1, width / 1000)))
    noisy = np.asarray(image, np.float32) + rng.normal(0, 3, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def photo_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    photo(width, height, seed).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


if __name__ == "__main__":
    # python -m tests.photos DIR COUNT WIDTH HEIGHT: a folder of synthetic JPEGs for `bench`.
    import sys
    from pathlib import Path

    from pipeline import heap

    heap.keep_freed_memory()  # 12 MP float images: 8 of them in 12 s instead of 24-26 here
    folder, count, width, height = Path(sys.argv[1]), *map(int, sys.argv[2:5])
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo(width, height, seed=i).save(folder / f"{i:05d}.jpg", quality=90)
