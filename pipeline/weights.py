"""`label-images weights`: list a model family's named weights, and stage them for offline
machines (download on a connected one, verify, say exactly what to pass)."""

from __future__ import annotations

from pathlib import Path

from pipeline.backends import backend_for


def catalogue(model: str | None = None) -> list[dict]:
    """Every named weights of the family (or one model's), with its published facts."""
    backend, name = backend_for(model or "")
    return backend.catalogue(name or None)


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
    backend, name = backend_for(model)
    return backend.fetch(name, weights_name, to)
