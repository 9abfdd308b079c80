"""Pixels as a viewer shows them, without torch: any PIL mode to 8-bit RGB, and the errors a
decoder raises on a bad file (the report's thumbnails use both, as the decoders do)."""

from __future__ import annotations

import struct

import numpy as np
from PIL import Image

# What a broken, truncated or hostile file can raise while being identified or decoded.
# Anything else is a bug in this code and should surface.
DECODE_ERRORS = (OSError, ValueError, RuntimeError, SyntaxError, EOFError, struct.error,
                 Image.DecompressionBombError)


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
