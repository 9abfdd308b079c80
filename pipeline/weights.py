"""`label-images weights`: list torchvision's classification weights, and stage them for
offline machines (download on a connected one, verify, say exactly what to pass)."""

from __future__ import annotations

import os
import re
import urllib.error
from pathlib import Path

import torch
import torchvision
from torchvision.models import get_model_weights, list_models

from pipeline.errors import RunError, UsageError
from pipeline.model import download_timeout, lookup_weights, sha256_file, weights_cache_path

# torchvision's file names end in the first hex digits of the file's sha256
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")


def catalogue(model: str | None = None) -> list[dict]:
    """Every classification weights enum member (or one model's), with its published facts."""
    models = list_models(module=torchvision.models)
    if model is not None:
        if model not in models:
            raise UsageError(f"unknown model {model!r}; see `label-images weights list`")
        models = [model]
    rows = []
    for name in models:
        enum = get_model_weights(name)
        default = enum.DEFAULT
        for weights in enum:
            metrics = next(iter(weights.meta.get("_metrics", {}).values()), {})
            rows.append({
                "model": name, "weights": str(weights), "default": weights == default,
                "classes": len(weights.meta.get("categories") or []),
                "top1": metrics.get("acc@1"), "size_mb": weights.meta.get("_file_size"),
                "cached": weights_cache_path(weights).is_file(), "url": weights.url,
            })
    return rows


def render(rows: list[dict]) -> str:
    lines = [f"{'weights':<48} {'classes':>7} {'top-1':>6} {'MB':>7}  cached"]
    for row in rows:
        top1 = f"{row['top1']:.1f}" if row["top1"] is not None else "-"
        size = f"{row['size_mb']:.1f}" if row["size_mb"] is not None else "-"
        name = row["weights"] + (" (DEFAULT)" if row["default"] else "")
        lines.append(f"{name:<48} {row['classes']:>7} {top1:>6} {size:>7}  "
                     f"{'yes' if row['cached'] else ''}")
    return "\n".join(lines)


def fetch(model: str, weights_name: str, to: str | None) -> Path:
    """Download one weights file, check its hash, and return where it is."""
    weights = lookup_weights(model, weights_name)
    target = (Path(to) / os.path.basename(weights.url)) if to else weights_cache_path(weights)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with download_timeout():
            torch.hub.download_url_to_file(weights.url, str(partial), progress=True)
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise RunError(f"cannot download {weights.url} ({reason}); run `label-images weights "
                       "fetch` on a machine with network and copy the file over") from None
    expected = _HASH_IN_NAME.search(target.name)
    if expected and not sha256_file(partial).startswith(expected.group(1)):
        partial.unlink(missing_ok=True)
        raise RunError(f"{weights.url} arrived damaged (sha256 does not start with "
                       f"{expected.group(1)}); nothing was kept, try again")
    os.replace(partial, target)
    return target
