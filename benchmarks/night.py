"""An incremental night's diff over a fabricated previous table: `python -m benchmarks.night
WORK ROWS`. Prints each stage's seconds and this process's peak RSS as JSON.

The previous table has ROWS rows of the output schema (top-5 lists, versions); tonight's
listing, streamed as a source would, has 0.1% of them changed: half rewritten (a new
version), a quarter removed, a quarter new keys. Stages: the listing spooled with its
duplicate check and the one join with last night's keys, the counts, tonight's images to
label, the removed keys, and the new table written in listing order from a fabricated
labelling of tonight's images; each with the peak RSS so far.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.scale import keys
from pipeline.plan_probe import peak_rss_mb
from pipeline.night_diff import NightDiff, items_to_label
from pipeline.storage import Store
from pipeline.writer import output_schema

CHUNK = 1_000_000
TOP_K = 5


def labelled(names: pa.Array, version: pa.Array) -> pa.Table:
    """Rows of the output schema for these keys (the labels themselves do not matter)."""
    n = len(names)
    offsets = pa.array(np.arange(0, (n + 1) * TOP_K, TOP_K, dtype=np.int32))
    schema = output_schema(TOP_K, pa.schema([pa.field("source_size", pa.int64()),
                                             pa.field("source_version", pa.string())]), {})
    columns = {
        "key": names, "path": pa.repeat("/data/x.jpg", n),
        "status": pa.repeat("ok", n), "error": pa.nulls(n, pa.string()),
        "width": pa.array(np.full(n, 500, np.int32)),
        "height": pa.array(np.full(n, 375, np.int32)),
        "top1_label": pa.repeat("tabby cat", n),
        "top1_score": pa.array(np.full(n, 0.9, np.float32)),
        "labels": pa.ListArray.from_arrays(offsets, pa.repeat("tabby cat", n * TOP_K)),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(np.full(n * TOP_K, 0.1,
                                                                     np.float32))),
        "class_ids": pa.ListArray.from_arrays(offsets, pa.array(np.zeros(n * TOP_K, np.int32))),
        "source_size": pa.array(np.full(n, 12_345, np.int64)), "source_version": version}
    return pa.table(columns).cast(schema)


def previous_table(path: Path, rows: int) -> None:
    """Made once (a few minutes at 10^8), under a temporary name until it is whole."""
    if path.exists():
        return
    partial = path.with_suffix(".partial")
    with pq.ParquetWriter(partial, labelled(keys(0, 1), pa.array(["v0"])).schema) as writer:
        for start in range(0, rows, CHUNK):
            stop = min(rows, start + CHUNK)
            writer.write_table(labelled(keys(start, stop), pa.repeat("v0", stop - start)))
    partial.rename(path)


def tonight(rows: int):
    """The listing, a million at a time: every 2,000th changed, every 4,000th (offset 1)
    removed; as many new keys as removed, at the end."""
    removed = 0
    for start in range(0, rows, CHUNK):
        stop = min(rows, start + CHUNK)
        index = np.arange(start, stop)
        gone = (index % 4000) == 1
        removed += int(gone.sum())
        index = index[~gone]
        version = np.where(index % 2000 == 0, "v1", "v0")
        yield pa.table({"key": keys(start, stop).filter(pa.array(~gone)),
                        "path": pa.array(np.full(len(index), "/data/x.jpg")),
            "source_size": pa.array(np.full(len(index), 12_345, np.int64)),
            "source_version": pa.array(version)})
    yield pa.table({"key": keys(rows, rows + removed),
                    "path": pa.array(np.full(removed, "/data/x.jpg")),
                    "source_size": pa.array(np.full(removed, 12_345, np.int64)),
                    "source_version": pa.array(np.full(removed, "v0"))})


def main(work: str, rows: int) -> dict:
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    previous = work_dir / f"previous-{rows}.parquet"
    started = time.perf_counter()
    previous_table(previous, rows)
    figures = {"rows": rows, "make_previous_seconds": time.perf_counter() - started}
    store = Store(str(work_dir))
    stage = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal stage
        now = time.perf_counter()
        figures[f"{name}_seconds"] = round(now - stage, 1)
        figures[f"{name}_peak_rss_mb"] = round(peak_rss_mb())  # the peak so far
        stage = now

    with NightDiff(store, tonight(rows), previous.name, "the listing") as diff:
        lap("spool_duplicates_and_join")
        changes = diff.changes()
        lap("counts")
        path, _ = diff.to_label()
        lap("to_label")
        removed = diff.removed()
        lap("removed_keys")
        todo = pa.concat_tables(items_to_label(path))
        labels = work_dir / "tonight.parquet"
        pq.write_table(labelled(todo["key"], todo["source_version"]), labels)
        lap("fabricate_tonights_labels")
        template = pq.read_schema(labels)
        written = 0
        with pq.ParquetWriter(work_dir / "new.parquet", template) as writer:
            for batch in diff.rows(template, str(labels), ["key", "path", "source_size",
                                                           "source_version"]):
                writer.write_table(batch.select(template.names).cast(template))
                written += batch.num_rows
        lap("new_table")
    figures.update(changes=changes.__dict__, removed_keys=len(removed), written=written,
                   diff_seconds=round(sum(figures[f"{n}_seconds"] for n in (
                       "spool_duplicates_and_join", "counts", "to_label", "removed_keys")),
                                      1),
                   peak_rss_mb=round(peak_rss_mb()))
    (work_dir / "new.parquet").unlink()
    return figures


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(float(sys.argv[2])))))
