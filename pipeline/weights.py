"""`label-images weights`: list a model family's named weights, and stage them for offline
machines (download on a connected one, verify, say exactly what to pass)."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from pipeline import cache
from pipeline.errors import UsageError, notice

CATALOGUE = "weights-catalogue.json"  # torchvision's, per version: the cache file
# what decides where torch.hub keeps downloads (torch.hub.get_dir): a key of the catalogue
HUB_ENVIRONMENT = ("TORCH_HOME", "XDG_CACHE_HOME", "HOME")


def catalogue(model: str | None = None) -> list[dict]:
    """Every named weights of the family (or one model's), with its published facts."""
    if ":" in (model or ""):  # another family's (timm:, keras:): its backend lists them
        from pipeline.backends import backend_for

        backend, name = backend_for(model)
        notice(f"listing {model.partition(':')[0]}'s weights (importing it takes seconds) ...")
        return backend.catalogue(name or None)
    rows = _torchvision()
    if model is not None:
        rows = [row for row in rows if row["model"] == model]
        if not rows:
            raise UsageError(f"unknown model {model!r}; see `label-images weights list`")
    return rows


def _torchvision() -> list[dict]:
    """torchvision's catalogue, kept per torchvision version and torch.hub directory:
    listing it imports torchvision (seconds), reading it back does not. Whether each
    file is downloaded is looked up afresh every time."""
    key = "|".join([f"torchvision {importlib.metadata.version('torchvision')}",
                    *(os.environ.get(name, "") for name in HUB_ENVIRONMENT)])
    rows = cache.read(CATALOGUE).get(key)
    if rows is None:
        from pipeline.backends import backend_for

        notice("listing torchvision's weights (once per torchvision version) ...")
        backend, _ = backend_for("")
        rows = [{k: v for k, v in row.items() if k != "cached"} for row in backend.catalogue(None)]
        cache.keep(CATALOGUE, key, rows, what="the weights catalogue",
                   then="the next listing imports torchvision again")
    return [{**row, "cached": os.path.isfile(row["path"])} for row in rows]


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
    from pipeline.backends import backend_for

    backend, name = backend_for(model)
    return backend.fetch(name, weights_name, to)
