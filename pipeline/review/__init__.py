"""The review target seam: a finished run's chosen rows out to people (predictions with their
scores), and people's answers back as the run's reviews table. One module a tool, one line
in TARGETS; `selection.py` picks the rows, `reviews.py` keeps the answers and measures the
model's agreement with them."""

from __future__ import annotations

from pipeline.errors import UsageError
from pipeline.review import fiftyone, label_studio
from pipeline.review.base import REVIEW_SCHEMA, ReviewTarget, Run

TARGETS: dict[str, ReviewTarget] = {t.name: t for t in (label_studio.TARGET, fiftyone.TARGET)}
__all__ = ["REVIEW_SCHEMA", "TARGETS", "ReviewTarget", "Run", "get"]


def reading(where: str) -> ReviewTarget:
    """The tool whose answers are at `where` (an export file, a dataset's field)."""
    for target in TARGETS.values():
        if target.claims(where):
            return target
    raise UsageError(f"{where}: not answers any review tool here reads (a Label Studio JSON "
                     "export file, fiftyone://DATASET/FIELD)")


def get(name: str) -> ReviewTarget:
    if name not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, got {name!r}")
    return TARGETS[name]
