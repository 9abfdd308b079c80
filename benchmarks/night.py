"""An incremental night over a fabricated nightly table: `python -m benchmarks.night WORK
ROWS [spread|clustered]`. Prints each stage's seconds and this process's peak RSS as JSON.

Last night's table has ROWS rows of the output schema (top-5 lists, versions) in parts of
night_table.PART_ROWS in key order, as nights leave it. Tonight's listing, streamed as a
source would, has 0.1% of them changed, in one of two shapes:
  spread     every 2,000th image rewritten (a new version), every 4,000th removed, as many
             new keys as removed at the end: changes in every part (the worst case)
  clustered  a day's new photos at the end (0.075%) and an old folder deleted (a run of
             0.025% of the keys): what a nightly collection mostly sees
Stages: the listing spooled by part and each part compared with last night's (the diff:
counts, tonight's images to label, removed keys), then the parts with changes written from
a fabricated labelling of tonight's images (the labelling itself is not measured).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.scale import keys
from pipeline import night_table
from pipeline.night_diff import NightDiff, items_to_label
from pipeline.night_rows import PartRows
from pipeline.night_table import Index, PartWriter
from pipeline.plan_probe import peak_rss_mb
from pipeline.storage import Store
from pipeline.writer import output_schema

CHUNK = 1_000_000
TOP_K = 5
TABLE = "labels.parquet"
ITEMS = ["key", "path", "source_size", "source_version"]


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


def previous_table(work: Path, rows: int) -> Index:
    """Made once (a few minutes at 10^8) into WORK/previous-ROWS/, its index last."""
    folder = work / f"previous-{rows}"
    if (folder / "parts.json").exists():
        return Index.from_dict(json.loads((folder / "parts.json").read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    (folder / TABLE).mkdir(parents=True)
    index, store = Index([]), Store(str(folder))
    schema = labelled(keys(0, 1), pa.array(["v0"])).schema
    for start in range(0, rows, night_table.PART_ROWS):
        stop = min(rows, start + night_table.PART_ROWS)
        name = index.new_name()
        part = PartWriter(store, f"{TABLE}/{name}", schema)  # as a night writes it
        for at in range(start, stop, 65_536):
            end = min(stop, at + 65_536)
            part.write(labelled(keys(at, end), pa.repeat("v0", end - at)))
        index.parts.append(part.close(name, "" if start == 0 else keys(start, start + 1)[0]
                                      .as_py(), "previous"))
    (folder / "parts.json").write_text(json.dumps(index.to_dict()))
    return index


def tonight(rows: int, shape: str):
    """The listing, a million at a time, in the shape asked (the module's docstring)."""
    removed = 0
    gone_from, gone_to = rows // 2, rows // 2 + rows // 4000
    for start in range(0, rows, CHUNK):
        stop = min(rows, start + CHUNK)
        index = np.arange(start, stop)
        if shape == "spread":
            gone = (index % 4000) == 1
            version = np.where(index % 2000 == 0, "v1", "v0")
        else:
            gone = (index >= gone_from) & (index < gone_to)
            version = None
        removed += int(gone.sum())
        keep = ~gone
        yield pa.table({"key": keys(start, stop).filter(pa.array(keep)),
                        "path": pa.repeat("/data/x.jpg", int(keep.sum())),
                        "source_size": pa.array(np.full(int(keep.sum()), 12_345, np.int64)),
                        "source_version": (pa.repeat("v0", int(keep.sum())) if shape != "spread"
                                           else pa.array(version[keep]))})
    new = removed if shape == "spread" else 3 * removed
    yield pa.table({"key": keys(rows, rows + new),
                    "path": pa.repeat("/data/x.jpg", new),
                    "source_size": pa.array(np.full(new, 12_345, np.int64)),
                    "source_version": pa.repeat("v0", new)})


def main(work: str, rows: int, shape: str = "spread") -> dict:
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    previous = previous_table(work_dir, rows)
    figures = {"rows": rows, "shape": shape, "part_rows": night_table.PART_ROWS,
               "make_previous_seconds": round(time.perf_counter() - started, 1)}
    store = Store(str(work_dir / f"previous-{rows}"))
    stage = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal stage
        now = time.perf_counter()
        figures[f"{name}_seconds"] = round(now - stage, 1)
        figures[f"{name}_peak_rss_mb"] = round(peak_rss_mb())  # the peak so far
        stage = now

    with NightDiff(store, tonight(rows, shape), previous, "the listing", TABLE) as diff:
        changes = diff.changes()
        removed = diff.removed()
        path, _ = diff.to_label()
        lap("diff")
        todo = pa.concat_tables(items_to_label(path))
        labels = work_dir / "tonight.parquet"
        pq.write_table(labelled(todo["key"], todo["source_version"]), labels)
        lap("fabricate_tonights_labels")
        template = pq.read_schema(labels)
        written, parts, writer, current = 0, 0, None, None
        staged = Store(str(work_dir / "staged"))
        for number, batch in PartRows(diff, template, str(labels), ITEMS):
            if number != current:
                if writer is not None:
                    writer.close("part", "", None)
                writer, current = PartWriter(staged, f"part-{number:06d}.parquet", template), number
                parts += 1
            writer.write(batch)
            written += batch.num_rows
        if writer is not None:
            writer.close("part", "", None)
        lap("write_changed_parts")
    shutil.rmtree(work_dir / "staged", ignore_errors=True)
    figures.update(changes=changes.__dict__, removed_keys=len(removed),
                   parts=len(previous.parts), parts_written=parts, rows_written=written,
                   bookkeeping_seconds=round(figures["diff_seconds"]
                                             + figures["write_changed_parts_seconds"], 1),
                   peak_rss_mb=round(peak_rss_mb()))
    return figures


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(float(sys.argv[2])),
                          *(sys.argv[3:4] or ["spread"]))))
