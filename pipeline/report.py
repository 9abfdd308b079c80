"""`label-images report`: what a run found, in the terminal or as one self-contained HTML page
(report_page.py draws the page).

Only the columns a report needs are read, and everything shown is bounded (top labels, a
sample of thumbnails per label, the lowest scores, the first errors), so a table of millions
of rows gives a page of a few megabytes at most.
"""

from __future__ import annotations

import heapq
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import keys
from pipeline.rundir import finished_table, recorded, summary_of
from pipeline.storage import Store, atomic_path
from pipeline.summary import count

COLUMNS = ["key", "path", "status", "error", "top1_label", "top1_score"]
CONFIDENCE_EDGES = (0.2, 0.5, 0.8)
TOP_LABELS = 20  # labels in the histogram and the contact sheet
THUMBNAILS_PER_LABEL = 8
REVIEW_ROWS = 50
ERROR_ROWS = 100
HISTORY_SHOWN = 30  # the last nights of agreement with people shown in the report


@dataclass
class Findings:
    """Everything a report shows, computed once from the table."""

    rows: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: list[tuple[str, int]] = field(default_factory=list)
    labels: list[tuple[str, int]] = field(default_factory=list)
    confidence: dict[str, int] = field(default_factory=dict)  # "< 0.2" -> count, ...
    histogram: list[int] = field(default_factory=list)  # top-1 scores in 10 bins of 0.1
    samples: dict[str, list[tuple[str, str, float]]] = field(default_factory=dict)
    review: list[tuple[str, str, str, float]] = field(default_factory=list)
    error_rows: list[tuple[str, str, str]] = field(default_factory=list)
    run: dict[str, str] = field(default_factory=dict)  # model, weights, date, source
    agreement: dict | None = None  # with people's reviews (review/reviews.py), if any
    agreement_history: list[dict] = field(default_factory=list)  # night by night (rundir)
    drift: dict | None = None  # a night's labels against last night's (drift.py), if any
    calibration: dict | None = None  # the scores' reliability on reviewed images, if any


def describe_run(out: str) -> dict[str, str]:
    """What the table was labelled with, from the run directory's run.json (if it has one)."""
    record = recorded(Store(out))
    fingerprint, config = record.fingerprint, record.config
    if not fingerprint:
        return {}
    weights = fingerprint.get("weights", "")
    if config.get("weights") and config["weights"] not in weights:  # a file: its name too
        weights = f"{config['weights']} ({weights[:19]}...)"
    return {"model": fingerprint.get("model", ""), "weights": weights,
            "run date": record.started_at,
            "source": fingerprint.get("source", {}).get("location", "")}


def last_night(out: str) -> dict | None:
    """The last night's comparison with the night before, from summary.json (drift.py)."""
    figures = summary_of(Store(out)).get("drift") or {}
    return figures if "classes" in figures else None


def drift_lines(figures: dict) -> list[str]:
    """The comparison with the night before, for the terminal."""
    lines = [f"since the night before: class shares PSI {figures['class_psi']:.3f}, top-1 "
             f"scores PSI {figures['score_psi']:.3f} (threshold {figures['threshold']:g}"
             f"{': shifted' if figures['drift'] else ''}); {figures['top1_changed']} of "
             f"{figures['relabelled']} changed images changed their top-1"]
    for name in ("appeared", "vanished"):
        if figures[name]:
            lines.append(f"classes {name}: {', '.join(figures[name][:10])}")
    moved = [c for c in figures["classes"][:5] if c["share_before"] != c["share_after"]]
    if moved:
        lines.append("shares that moved most: " + ", ".join(
            f"{c['label']} {share(c['share_before'])} -> {share(c['share_after'])}"
            for c in moved))
    return lines


def read_batches(out: str) -> Iterator[pa.Table]:
    """The report's columns of the finished table, a batch at a time: never the table."""
    store, fmt = finished_table(out)
    return fmt.batches(store, COLUMNS)


def error_kind(text: str) -> str:
    """'UnidentifiedImageError: ...' -> 'UnidentifiedImageError'; free text up to a colon."""
    return text.split(":", 1)[0].strip()[:60] or "unknown"


def analyse(batches: Iterable[pa.Table], seed: int = 0) -> Findings:
    """Everything a report shows, in one pass over the table: memory holds the counts (a
    label's count each, an error kind's), a sample of THUMBNAILS_PER_LABEL rows per label
    (reservoir sampling), the REVIEW_ROWS lowest scores and the first ERROR_ROWS errors."""
    found = Findings(histogram=[0] * 10)
    found.confidence = {f"< {edge}": 0 for edge in CONFIDENCE_EDGES}
    kinds: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    samples: dict[str, list] = {}  # label -> reservoir of (key, path, score)
    lowest: list = []  # the lowest scores seen (_keep_lowest)
    rng = np.random.default_rng(seed)
    for table in batches:
        ok_mask = pc.equal(table["status"], "ok")
        ok, bad = table.filter(ok_mask), table.filter(pc.invert(ok_mask))
        found.rows += table.num_rows
        found.ok += ok.num_rows
        found.errors += bad.num_rows
        kinds.update(error_kind(text or "") for text in bad["error"].to_pylist())
        if len(found.error_rows) < ERROR_ROWS:
            first = bad.slice(0, ERROR_ROWS - len(found.error_rows))
            found.error_rows += zip(first["key"].to_pylist(), first["path"].to_pylist(),
                                    first["error"].to_pylist())
        if not ok.num_rows:
            continue
        scores = ok["top1_score"].to_numpy(zero_copy_only=False).astype(np.float32)
        for edge in CONFIDENCE_EDGES:
            found.confidence[f"< {edge}"] += int((scores < edge).sum())
        found.histogram = (np.asarray(found.histogram) + np.histogram(
            scores, bins=10, range=(0.0, 1.0))[0]).tolist()
        _sample(samples, labels, ok, rng)  # (it counts the labels too)
        _keep_lowest(lowest, ok, scores, found.ok - ok.num_rows)
    found.error_kinds = sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))
    found.labels = sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))
    found.samples = {label: samples[label] for label, _ in found.labels[:TOP_LABELS]}
    found.review = [row for _, _, row in sorted(lowest, key=lambda e: (-e[0], -e[1]))]
    return found


def _sample(samples: dict, seen: Counter, ok: pa.Table, rng) -> None:
    """Reservoir sampling per label (Algorithm R), a batch at a time: each row of a label
    is kept with the same chance whatever the table's size. `seen`: each label's rows before
    this batch (updated here)."""
    codes = pc.dictionary_encode(ok["top1_label"]).combine_chunks()
    index, names = codes.indices.to_numpy(), codes.dictionary.to_pylist()
    order = np.argsort(index, kind="stable")  # each row's place among its label's rows
    starts = np.r_[0, np.flatnonzero(np.diff(index[order])) + 1]
    place = np.empty(len(index), np.int64)
    place[order] = np.arange(len(index)) - np.repeat(starts, np.diff(np.r_[starts, len(index)]))
    number = np.array([seen[name] for name in names], np.int64)[index] + place + 1
    slot = np.floor(rng.random(len(index)) * number).astype(np.int64)
    for i in np.flatnonzero((number <= THUMBNAILS_PER_LABEL) | (slot < THUMBNAILS_PER_LABEL)):
        row = (ok["key"][int(i)].as_py(), ok["path"][int(i)].as_py(),
               ok["top1_score"][int(i)].as_py())
        reservoir = samples.setdefault(names[index[i]], [])
        if number[i] <= THUMBNAILS_PER_LABEL:
            reservoir.append(row)
        else:
            reservoir[slot[i]] = row
    seen.update(dict(zip(names, np.bincount(index, minlength=len(names)).tolist())))


def _keep_lowest(lowest: list, ok: pa.Table, scores: np.ndarray, before: int) -> None:
    """The REVIEW_ROWS lowest top-1 scores so far, ties to the earlier row: a heap whose
    root is the highest kept (entries (-score, -row, fields)). `before`: ok rows before."""
    for i in np.argsort(scores, kind="stable")[:REVIEW_ROWS].tolist():
        entry = (-float(scores[i]), -(before + i))
        if len(lowest) == REVIEW_ROWS and entry <= lowest[0][:2]:
            break  # sorted: no later row of this batch is lower
        row = (ok["key"][i].as_py(), ok["path"][i].as_py(), ok["top1_label"][i].as_py(),
               float(scores[i]))
        if len(lowest) < REVIEW_ROWS:
            heapq.heappush(lowest, (*entry, row))
        else:
            heapq.heapreplace(lowest, (*entry, row))


def render_text(found: Findings) -> str:
    lines = [f"{found.rows} images: {found.ok} ok, {count(found.errors, 'error')}"]
    lines += [f"{name}: {value}" for name, value in found.run.items()]
    if found.error_kinds:
        lines.append("errors by kind: " + ", ".join(f"{k} {n}" for k, n in found.error_kinds))
    if found.labels:
        lines.append("most frequent labels:")
        width = max(len(label) for label, _ in found.labels[:10])
        lines += [f"  {label:<{width}}  {count}" for label, count in found.labels[:10]]
    if found.ok:
        lines.append("top-1 confidence: " + ", ".join(
            f"{n} ({100 * n / found.ok:.1f}%) {edge}" for edge, n in found.confidence.items()))
    if found.agreement:
        lines.append(agreement_line(found.agreement))
        classes = found.agreement["per_class"][:10]
        if classes:
            width = max(len(c["label"]) for c in classes)
            lines.append("agreement by the reviewers' label (reviewed, top-1, top-k):")
            lines += [f"  {c['label']:<{width}}  {c['reviewed']}  {share(c['top1_agreement'])}"
                      f"  {share(c['top_k_agreement'])}" for c in classes]
    if len(found.agreement_history) > 1:
        lines.append("agreement with people, night by night (reviewed, top-1, top-k, model):")
        lines += [f"  {e['at']}  {e['when']:<12}  {e['reviewed']}  "
                  f"{share(e['top1_agreement'])}  {share(e['top_k_agreement'])}  {e['model']}"
                  for e in found.agreement_history[-HISTORY_SHOWN:]]
    if found.calibration:
        lines.append(calibration_line(found.calibration))
    if found.drift:
        lines += drift_lines(found.drift)
    return "\n".join(lines)


def agreement_line(figures: dict) -> str:
    """The model's agreement with people on one line, as the report and `reviews` say it."""
    text = (f"people reviewed {figures['reviewed']} images: the model's top-1 agrees on "
            f"{share(figures['top1_agreement'])}, its top-k on "
            f"{share(figures['top_k_agreement'])}")
    if figures["unknown_keys"]:
        text += (f"; {count(figures['unknown_keys'], 'review')} name keys this run does not "
                 f"have (e.g. {', '.join(map(repr, figures['unknown_examples']))})")
    return text


def calibration_line(found: dict) -> str:
    """How far the scores can be trusted (review/calibration.py), on one line."""
    text = (f"scores on the {found['reviewed']} reviewed images: calibration error (ECE) "
            f"{found['ece_before']:.3f}, {found['ece_after']:.3f} once calibrated on them")
    if found["threshold"] is None:
        return text + f"; no top-1 score reaches {found['precision']:.0%} precision"
    return (text + f"; top-1 >= {found['threshold']:.2f}: {found['precision']:.0%} precise on "
            f"the reviewed images, {found['collection_share']:.0%} of the collection")


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def export_review(batches: Iterable[pa.Table], below: float, export: str) -> int:
    """Write the ok rows whose top-1 score is below `below` to a CSV for a labelling tool,
    lowest first: the rows are gathered on local disk and sorted there by DuckDB."""
    folder = keys.spill_folder()
    try:
        spool = os.path.join(folder, "review.parquet")
        count, writer = 0, None
        for table in batches:
            rows = table.filter(pc.and_(pc.equal(table["status"], "ok"),
                                        pc.less(table["top1_score"], below)))
            rows = rows.select(["key", "path", "top1_label", "top1_score"])
            writer = writer or pq.ParquetWriter(spool, rows.schema)
            writer.write_table(rows)
            count += rows.num_rows
        if writer is None:
            return 0
        writer.close()
        con = keys.connect(folder)
        try:  # ties keep the table's order
            reader = con.sql(
                "SELECT key, path, top1_label, top1_score FROM read_parquet($spool, "
                "file_row_number = true) ORDER BY top1_score, file_row_number",
                params={"spool": spool}).to_arrow_reader(65_536)
            with atomic_path(Path(export)) as tmp, pacsv.CSVWriter(
                    str(tmp), reader.schema) as out:
                for batch in reader:
                    out.write_batch(batch)
        finally:
            con.close()
        return count
    finally:
        shutil.rmtree(folder, ignore_errors=True)
