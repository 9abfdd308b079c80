"""People's answers kept in the run (reviews.parquet: key, label, reviewer, when, tool), and
the model's agreement with them: top-1 and top-k, per class, with how many were reviewed.
Joined with the labels by key in DuckDB, the table streamed: a review of a key the run does
not have is counted and named, never dropped silently."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import keys
from pipeline.errors import UsageError
from pipeline.review.base import REVIEW_SCHEMA
from pipeline.rundir import REVIEWS_FILE, add_agreement, finished_table
from pipeline.storage import Store

EXAMPLES = 5  # unknown keys named in the figures


def record(out: str, answers: Iterable[pa.Table]) -> int:
    """Add people's answers to the run's reviews (a key's latest answer wins); how many
    keys the reviews now hold."""
    store = Store(out)
    new = pa.concat_tables([t.cast(REVIEW_SCHEMA) for t in answers] or
                           [REVIEW_SCHEMA.empty_table()])
    if pc.any(pc.is_null(new["key"])).as_py():
        new = _keys_from_paths(out, new)
    missing = new.filter(pc.is_null(new["key"]))
    if missing.num_rows:
        raise UsageError(f"{missing.num_rows} answers carry neither a key (a Label Studio "
                         "task's data.key) nor an image path: were these exported by "
                         "label-images?")
    tables = [new]
    if store.exists(REVIEWS_FILE):
        with store.open(REVIEWS_FILE) as fh:
            tables.insert(0, pq.read_table(fh).cast(REVIEW_SCHEMA))
    both = pa.concat_tables(tables)
    order = pa.array(range(both.num_rows), pa.int64())
    folder = keys.spill_folder()
    con = keys.connect(folder)
    try:
        con.register("answers", both.append_column("arrival", order))
        latest = con.sql(
            "SELECT key, label, reviewer, reviewed_at, tool, path FROM answers QUALIFY row_number() "
            "OVER (PARTITION BY key ORDER BY reviewed_at DESC NULLS LAST, arrival DESC) = 1 "
            "ORDER BY key").to_arrow_table().cast(REVIEW_SCHEMA)
    finally:
        con.close()
        shutil.rmtree(folder, ignore_errors=True)
    with store.writing(REVIEWS_FILE) as sink:
        pq.write_table(latest, sink)
    return latest.num_rows


def _spool_table(out: str, columns: list[str], folder: str) -> str | None:
    """The finished table's `columns`, streamed to a Parquet file on local disk for DuckDB
    (the table may be CSV, Delta, Iceberg or remote); None if it has no rows."""
    table_store, fmt = finished_table(out)
    spool = os.path.join(folder, "labels.parquet")
    writer = None
    for table in fmt.batches(table_store, columns):
        writer = writer or pq.ParquetWriter(spool, table.schema)
        writer.write_table(table)
    if writer is None:
        return None
    writer.close()
    return spool


def _keys_from_paths(out: str, answers: pa.Table) -> pa.Table:
    """Answers a tool gave by image path (a FiftyOne field people filled in): the run's key
    for that path; a path the run does not have keeps the path as its key (reported as a
    key the run does not have, not dropped)."""
    folder = keys.spill_folder()
    con = keys.connect(folder)
    try:
        spool = _spool_table(out, ["key", "path"], folder)
        con.register("answers", answers.append_column(
            "arrival", pa.array(range(answers.num_rows), pa.int64())))
        source = (f"read_parquet('{_quoted(spool)}')" if spool else
                  "(SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS path WHERE false)")
        found = con.sql(
            "SELECT coalesce(a.key, (SELECT min(t.key) FROM " + source + " t WHERE t.path = "
            "a.path), a.path) AS key, a.label, a.reviewer, a.reviewed_at, a.tool, a.path "
            "FROM answers a ORDER BY a.arrival").to_arrow_table()
    finally:
        con.close()
        shutil.rmtree(folder, ignore_errors=True)
    return found.cast(REVIEW_SCHEMA)


def _quoted(path: str) -> str:
    return path.replace("'", "''")


def agreement(out: str) -> dict | None:
    """How often the model agreed with people on the reviewed images of this run; None if
    nobody has reviewed any."""
    store = Store(out)
    if not store.exists(REVIEWS_FILE):
        return None
    with store.open(REVIEWS_FILE) as fh:
        reviews = pq.read_table(fh)
    folder = keys.spill_folder()
    con = keys.connect(folder)
    try:
        con.register("reviews", reviews)
        spool = _spool_table(out, ["key", "status", "top1_label", "labels"], folder)
        if spool is None:
            return None
        con.execute(f"CREATE VIEW labels AS SELECT * FROM read_parquet('{_quoted(spool)}')")
        joined = ("SELECT r.key, r.label, l.key IS NOT NULL AS known, l.status, "
                  "l.top1_label = r.label AS top1, list_contains(l.labels, r.label) AS top_k "
                  "FROM reviews r LEFT JOIN labels l ON r.key = l.key")
        con.execute(f"CREATE TABLE joined AS {joined}")
        total, known, ok, top1, top_k = con.sql(
            "SELECT count(*), count(*) FILTER (known), count(*) FILTER (status = 'ok'), "
            "count(*) FILTER (top1 AND status = 'ok'), "
            "count(*) FILTER (top_k AND status = 'ok') FROM joined").fetchall()[0]
        unknown = [row[0] for row in con.sql(
            f"SELECT key FROM joined WHERE NOT known ORDER BY key LIMIT {EXAMPLES}").fetchall()]
        classes = con.sql(
            "SELECT label, count(*), count(*) FILTER (top1), count(*) FILTER (top_k) "
            "FROM joined WHERE status = 'ok' GROUP BY label ORDER BY count(*) DESC, label"
        ).fetchall()
    finally:
        con.close()
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "reviewed": ok,  # reviewed images the model labelled (not error rows)
        "top1_agreement": round(top1 / ok, 4) if ok else None,
        "top_k_agreement": round(top_k / ok, 4) if ok else None,
        "per_class": [{"label": label, "reviewed": n, "top1_agreement": round(a / n, 4),
                       "top_k_agreement": round(k / n, 4)} for label, n, a, k in classes],
        "error_rows_reviewed": known - ok,
        "unknown_keys": total - known, "unknown_examples": unknown,
    }


def keep_agreement(out: str, when: str, model: str) -> dict | None:
    """The model's agreement with all answers so far, measured now on the table and kept
    in the run's history (`when`: a night, answers read; `model`: what labelled it), for
    the report's night by night; None when nobody has reviewed any image."""
    figures = agreement(out)
    if figures and figures["reviewed"]:
        add_agreement(Store(out), {
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "when": when,
            "model": model, **{k: figures[k] for k in ("reviewed", "top1_agreement",
                                                       "top_k_agreement")}})
    return figures
