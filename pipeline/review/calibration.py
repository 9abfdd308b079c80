"""How far the run's top-1 scores can be trusted, measured on the images people reviewed.

A score is calibrated when, of the images scored 0.8, eight in ten are right. On the
reviewed images (right: people gave the model's top-1) this gives the expected calibration
error (ECE: the gap between score and accuracy, averaged over 10 score bins, weighted by
their images) before and after a calibration fitted on the answers (Platt scaling of the
score's logit, P(right) = sigmoid(a * logit(score) + b), which keeps the order of the
scores: only the top-k's probabilities are stored, not the logits temperature scaling
needs), and the lowest top-1 score at which the reviewed images reach a precision a team
asks for, with the share of the whole collection scored at least that.

The reviewed images are those sent to people, often the uncertain ones: figures measured on
them describe that sample; `export --rows all --limit N` sends a plain sample.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.rundir import REVIEWS_FILE, finished_table
from pipeline.storage import Store

BINS = 10
PRECISION = 0.95  # what the report looks for unless asked for another
MIN_REVIEWED = 20  # fewer answers than this: no calibration is fitted


def reviewed_scores(out: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-1 scores of the reviewed ok rows, whether people agreed, every ok row's top-1
    score histogram in 1000 bins): the table streamed once."""
    store = Store(out)
    with store.open(REVIEWS_FILE) as fh:
        reviews = pq.read_table(fh, columns=["key", "label"])
    answer = dict(zip(reviews["key"].to_pylist(), reviews["label"].to_pylist()))
    wanted = pa.array(sorted(k for k in answer if k is not None), pa.string())
    table_store, fmt = finished_table(out)
    scores, agreed = [], []
    collection = np.zeros(1000, np.int64)
    for table in fmt.batches(table_store, ["key", "status", "top1_label", "top1_score"]):
        table = table.filter(pc.equal(table["status"], "ok"))
        all_scores = np.nan_to_num(table["top1_score"].to_numpy(zero_copy_only=False))
        collection += np.bincount(np.clip((all_scores * 1000).astype(int), 0, 999),
                                  minlength=1000)
        mine = table.filter(pc.is_in(table["key"], wanted))
        for key, label, score in zip(mine["key"].to_pylist(), mine["top1_label"].to_pylist(),
                                     mine["top1_score"].to_pylist()):
            scores.append(score)
            agreed.append(label == answer[key])
    return np.array(scores, np.float64), np.array(agreed, bool), collection


def ece(confidence: np.ndarray, right: np.ndarray) -> float:
    """Expected calibration error over BINS equal-width bins of confidence."""
    bins = np.clip((confidence * BINS).astype(int), 0, BINS - 1)
    total = 0.0
    for b in range(BINS):
        members = bins == b
        if members.any():
            total += members.sum() * abs(confidence[members].mean() - right[members].mean())
    return float(total / max(len(confidence), 1))


def platt(scores: np.ndarray, right: np.ndarray) -> tuple[float, float]:
    """(a, b) of sigmoid(a * logit(score) + b) fitted to `right` (Newton's method on the
    log-loss, a little ridge so a perfect split stays finite)."""
    x = np.log(np.clip(scores, 1e-6, 1 - 1e-6) / np.clip(1 - scores, 1e-6, 1))
    design = np.stack([x, np.ones_like(x)], 1)
    w = np.array([1.0, 0.0])
    for _ in range(50):
        p = 1 / (1 + np.exp(-design @ w))
        gradient = design.T @ (p - right) + 1e-3 * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design + 1e-3 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])


def calibrated(scores: np.ndarray, a: float, b: float) -> np.ndarray:
    x = np.log(np.clip(scores, 1e-6, 1 - 1e-6) / np.clip(1 - scores, 1e-6, 1))
    return 1 / (1 + np.exp(-(a * x + b)))


def threshold(scores: np.ndarray, right: np.ndarray, precision: float) -> float | None:
    """The lowest top-1 score s such that the reviewed images scored s or more are at least
    `precision` right (None: no such s)."""
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    hits = np.cumsum(right[order])
    counts = np.arange(1, len(order) + 1)
    # a cut falls between different scores only: {score >= s} takes every tie of s
    ends = np.r_[ranked[:-1] > ranked[1:], True]
    meets = np.flatnonzero((hits / counts >= precision) & ends)
    if not len(meets):
        return None
    return float(ranked[meets[-1]])


def reliability(confidence: np.ndarray, right: np.ndarray) -> list[dict]:
    bins = np.clip((confidence * BINS).astype(int), 0, BINS - 1)
    return [{"bin": f"{b / BINS:.1f}-{(b + 1) / BINS:.1f}", "images": int((bins == b).sum()),
             "confidence": round(float(confidence[bins == b].mean()), 4),
             "accuracy": round(float(right[bins == b].mean()), 4)}
            for b in range(BINS) if (bins == b).any()]


def figures(out: str, precision: float = PRECISION) -> dict | None:
    """The reliability of the run's scores on the reviewed images; None: too few."""
    scores, right, collection = reviewed_scores(out)
    if len(scores) < MIN_REVIEWED:
        return None
    a, b = platt(scores, right)
    after = calibrated(scores, a, b)
    cut = threshold(scores, right, precision)
    covered = None
    if cut is not None and collection.sum():
        covered = float(collection[int(cut * 1000):].sum() / collection.sum())
    return {"reviewed": int(len(scores)), "ece_before": round(ece(scores, right), 4),
            "ece_after": round(ece(after, right), 4), "platt": [round(a, 4), round(b, 4)],
            "precision": precision, "threshold": cut,  # unrounded: a cut between scores
            "collection_share": None if covered is None else round(covered, 4),
            "reliability_before": reliability(scores, right),
            "reliability_after": reliability(after, right)}
