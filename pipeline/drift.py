"""What a night changed in the labels: each class's count and share against last night's,
the shift of the top-1 score distribution and of the class shares (PSI), classes that
appear or vanish, and how many relabelled images changed their top-1.

The population stability index (PSI) is sum((p - q) * ln(p / q)) over bins (10 bins of
the top-1 score; the classes), each share floored at EPSILON so an empty bin is finite.
Its usual reading: under 0.1 no real shift, 0.1-0.25 a moderate one, above 0.25 a large
one. A night whose PSI reaches the threshold (--drift-threshold, default 0.1) says so in
one line; the figures are in summary.json and the report either way.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BINS = 10  # top-1 score bins of 0.1
EPSILON = 1e-4
DEFAULT_THRESHOLD = 0.1
SHOWN_CLASSES = 20  # the classes whose shares moved most, in the summary and the report


@dataclass
class LabelStats:
    """A table's ok rows: how many per top-1 class, and a histogram of top-1 scores."""

    counts: Counter = field(default_factory=Counter)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))

    @property
    def ok(self) -> int:
        return sum(self.counts.values())

    def add(self, table: pa.Table) -> None:
        # two columns filtered, not the table (its lists of labels cost 20x the rest)
        ok = table.select(["top1_label", "top1_score"]).filter(
            pc.equal(table["status"], "ok"))
        if not ok.num_rows:
            return
        for entry in pc.value_counts(ok["top1_label"]).to_pylist():
            self.counts[entry["values"]] += entry["counts"]
        scores = ok["top1_score"].to_numpy(zero_copy_only=False)
        bins = np.clip((np.nan_to_num(scores) * BINS).astype(np.int64), 0, BINS - 1)
        self.histogram += np.bincount(bins, minlength=BINS)

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "histogram": self.histogram.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> LabelStats:
        return cls(Counter(data["counts"]), np.asarray(data["histogram"], np.int64))


def psi(before: np.ndarray, after: np.ndarray) -> float:
    """The population stability index of two histograms over the same bins."""
    p = np.maximum(before / max(before.sum(), 1), EPSILON)
    q = np.maximum(after / max(after.sum(), 1), EPSILON)
    return float(np.sum((q - p) * np.log(q / p)))


def compare(before: LabelStats, after: LabelStats, relabelled: int, top1_changed: int,
            threshold: float) -> dict:
    """Tonight against last night: what the summary, summary.json and the report show."""
    classes = sorted(set(before.counts) | set(after.counts))
    old = np.array([before.counts.get(c, 0) for c in classes], np.float64)
    new = np.array([after.counts.get(c, 0) for c in classes], np.float64)
    old_share, new_share = old / max(old.sum(), 1), new / max(new.sum(), 1)
    moved = sorted(range(len(classes)), key=lambda i: -abs(new_share[i] - old_share[i]))
    figures = {
        "score_psi": round(psi(before.histogram, after.histogram), 4),
        "class_psi": round(psi(old, new), 4) if classes else 0.0,
        "threshold": threshold,
        "appeared": [c for c in classes if not before.counts.get(c) and after.counts.get(c)],
        "vanished": [c for c in classes if before.counts.get(c) and not after.counts.get(c)],
        "relabelled": relabelled, "top1_changed": top1_changed,
        "classes": [{"label": classes[i], "before": int(old[i]), "after": int(new[i]),
                     "share_before": round(float(old_share[i]), 4),
                     "share_after": round(float(new_share[i]), 4)}
                    for i in moved[:SHOWN_CLASSES]],
        "histogram_before": before.histogram.tolist(),
        "histogram_after": after.histogram.tolist(),
    }
    figures["drift"] = max(figures["score_psi"], figures["class_psi"]) >= threshold
    return figures


def line(figures: dict) -> str:
    """The one line a night says when its labels shifted past the threshold."""
    moved = figures["classes"][0] if figures["classes"] else None
    parts = [f"class shares PSI {figures['class_psi']:.2f}",
             f"top-1 scores PSI {figures['score_psi']:.2f}"]
    if moved is not None:
        parts.append(f"{moved['label']!r} {_share(moved['share_before'])} -> "
                     f"{_share(moved['share_after'])}")
    if figures["appeared"]:
        parts.append(f"{len(figures['appeared'])} class(es) new")
    if figures["vanished"]:
        parts.append(f"{len(figures['vanished'])} class(es) gone")
    if figures["relabelled"]:
        parts.append(f"{figures['top1_changed']} of {figures['relabelled']} changed images "
                     "changed their top-1")
    return (f"labels shifted since last night ({'; '.join(parts)}; threshold "
            f"{figures['threshold']:g}): see the report")


def _share(value: float) -> str:
    return f"{100 * value:.1f}%" if not math.isnan(value) else "-"
