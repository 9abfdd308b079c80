"""Checkpoint files for any backend: tensors and plain containers only, never pickled code."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

from pipeline.errors import UsageError

SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def load_checkpoint(path: Path, state_keys: tuple[str, ...] = ("state_dict",)
                    ) -> tuple[dict, list[str] | None]:
    """(state_dict, class names if the file has them) of a checkpoint file, on the CPU.

    Takes a plain state_dict, or a dict with one under the first of `state_keys` it has,
    and optional 'categories'. A DataParallel/DDP save's 'module.' prefixes are dropped.
    """
    _check_is_a_checkpoint(path)
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
    wrapped = next((key for key in state_keys if isinstance(raw.get(key), dict)), None)
    state_dict = raw[wrapped] if wrapped else raw
    categories = raw.get("categories") if wrapped else None
    if not isinstance(state_dict, dict) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UsageError(f"--weights {path} is not a state_dict (a dict of tensors), "
                         "nor a dict with one under 'state_dict'")
    return {k.removeprefix("module."): v for k, v in state_dict.items()}, categories


# What torch.save writes first: a zip archive (since torch 1.6), or a pickle's protocol mark.
_CHECKPOINT_STARTS = (b"PK\x03\x04", b"\x80")


def _check_is_a_checkpoint(path: Path) -> None:
    """A file that is no checkpoint at all (class names, an image, a Keras file) said as
    such, before torch's unpickler answers with a piece of its own internals."""
    try:
        with open(path, "rb") as fh:
            start = fh.read(4)
    except OSError as exc:
        raise UsageError(f"--weights {path}: {exc.strerror or exc}") from None
    if not start.startswith(_CHECKPOINT_STARTS):
        text = start.isascii() and all(c.isprintable() or c.isspace()
                                       for c in start.decode("ascii"))
        hint = " (a text file: class names go to --labels)" if text else ""
        raise UsageError(f"--weights {path} is not a PyTorch checkpoint (a file torch.save "
                         f"wrote){hint}")


def check_categories(categories, num_classes: int, path: Path) -> None:
    if (not isinstance(categories, (list, tuple)) or len(categories) != num_classes
            or not all(isinstance(c, str) for c in categories)):
        raise UsageError(f"--weights {path}: 'categories' must list {num_classes} names")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
