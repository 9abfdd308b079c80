"""An incremental night over a fabricated nightly table: `python -m benchmarks.night WORK
ROWS [spread|clustered]`. Prints each stage's seconds and this process's peak RSS as JSON.

Last night's table has ROWS rows of the output schema (top-5 lists, versions) in parts of
night_table.PART_ROWS in key order, as nights leave it. Tonight's listing, streamed as a
source would, has 0.1% of them changed, in one of two shapes:
  spread     every 2,000th image rewritten (a new version), every 4,000th removed, as many
             new keys as removed at the end: changes in every part (the worst case)
  clustered  a day's new photos at the end (0.075%) and an old folder deleted (a run of
             0.025% of the keys): what a nightly collection mostly sees
Tonight's listing is made once into WORK and streamed from there (a source's own listing
cost is measured with planning, not here). Stages: the listing spooled by part and each
part compared with last night's (the diff: counts, tonight's images to label, removed
keys), then the parts with changes written from a fabricated labelling of tonight's images
(the labelling itself is not measured).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


CLASSES = pa.array([f"imagenet class {number}" for number in range(1000)])


def items(index: np.ndarray, changed: np.ndarray | None = None) -> pa.Table:
    """A listing's rows for these image numbers: a key, a path, a size and a version each,
    all distinct as a bucket's are; `changed` images have another version."""
    names = (keys(int(index[0]), int(index[-1]) + 1).take(pa.array(index - index[0]))
             if len(index) else pa.array([], pa.string()))
    version = 1_733_000_000_000_000 + index * 1000 + (0 if changed is None else changed)
    return pa.table({"key": names,
                     "path": pc.binary_join_element_wise("s3://photos/", names, ""),
                     "source_size": pa.array(200_000 + (index * 7919) % 3_000_000),
                     "source_version": pc.cast(pa.array(version), pa.string())})


def labelled(listed: pa.Table) -> pa.Table:
    """Rows of the output schema for these images: top-5 of a thousand classes and scores
    drawn at random (as varied as a model's, which is what Parquet's encoder sees)."""
    n = len(listed)
    draw = np.random.default_rng(n)
    ids = draw.integers(0, len(CLASSES), (n, TOP_K)).astype(np.int32)
    scores = np.sort(draw.random((n, TOP_K), np.float32), axis=1)[:, ::-1]
    offsets = pa.array(np.arange(0, (n + 1) * TOP_K, TOP_K, dtype=np.int32))
    schema = output_schema(TOP_K, pa.schema([pa.field("source_size", pa.int64()),
                                             pa.field("source_version", pa.string())]), {})
    columns = {
        "key": listed["key"], "path": listed["path"],
        "status": pa.repeat("ok", n), "error": pa.nulls(n, pa.string()),
        "width": pa.array(draw.choice([640, 1024, 4032], n).astype(np.int32)),
        "height": pa.array(draw.choice([480, 768, 3024], n).astype(np.int32)),
        "top1_label": CLASSES.take(pa.array(ids[:, 0])),
        "top1_score": pa.array(scores[:, 0]),
        "labels": pa.ListArray.from_arrays(offsets, CLASSES.take(pa.array(ids.ravel()))),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(scores.ravel())),
        "class_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.ravel())),
        "source_size": listed["source_size"], "source_version": listed["source_version"]}
    return pa.table(columns).cast(schema)


def previous_table(work: Path, rows: int) -> Index:
    """Made once (a few minutes at 10^8) into WORK/previous-ROWS/, its index last."""
    folder = work / f"previous-{rows}"
    if (folder / "parts.json").exists():
        return Index.from_dict(json.loads((folder / "parts.json").read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    (folder / TABLE).mkdir(parents=True)
    index, store = Index([]), Store(str(folder))
    schema = labelled(items(np.arange(1))).schema
    for start in range(0, rows, night_table.PART_ROWS):
        stop = min(rows, start + night_table.PART_ROWS)
        name = index.new_name()
        part = PartWriter(store, f"{TABLE}/{name}", schema)  # as a night writes it
        for at in range(start, stop, 65_536):
            part.write(labelled(items(np.arange(at, min(stop, at + 65_536)))))
        index.parts.append(part.close(name, "" if start == 0 else keys(start, start + 1)[0]
                                      .as_py(), "previous"))
    (folder / "parts.json").write_text(json.dumps(index.to_dict()))
    return index


def tonight(work: Path, rows: int, shape: str):
    """Tonight's listing, a million at a time, streamed from WORK/tonight-ROWS-SHAPE.arrow
    (made once by `fabricate`), as a source streams a listing it has stored: making the
    keys in Python is not the night's work (it took 26 s at 10^8)."""
    path = work / f"tonight-{rows}-{shape}.arrow"
    if not path.exists():
        partial = path.with_suffix(".partial")
        with night_table.spool_writer(str(partial), next(fabricate(1, shape)).schema) as out:
            for table in fabricate(rows, shape):
                out.write_table(table)
        partial.rename(path)
    with pa.OSFile(str(path)) as source:  # read, not mapped: mapped pages would count as RSS
        reader = pa.ipc.open_file(source)
        for number in range(reader.num_record_batches):
            yield pa.Table.from_batches([reader.get_batch(number)])


def fabricate(rows: int, shape: str):
    """The listing, a million at a time, in the shape asked (the module's docstring)."""
    removed = 0
    gone_from, gone_to = rows // 2, rows // 2 + rows // 4000
    for start in range(0, rows, CHUNK):
        index = np.arange(start, min(rows, start + CHUNK))
        if shape == "spread":
            gone, changed = (index % 4000) == 1, index % 2000 == 0
        else:
            gone, changed = (index >= gone_from) & (index < gone_to), None
        removed += int(gone.sum())
        yield items(index[~gone], None if changed is None else changed[~gone])
    new = removed if shape == "spread" else 3 * removed
    yield items(np.arange(rows, rows + new))


def main(work: str, rows: int, shape: str = "spread") -> dict:
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    previous = previous_table(work_dir, rows)
    figures = {"rows": rows, "shape": shape, "part_rows": night_table.PART_ROWS,
               "make_previous_seconds": round(time.perf_counter() - started, 1)}
    store = Store(str(work_dir / f"previous-{rows}"))
    stage, cpu = time.perf_counter(), time.process_time()

    def lap(name: str) -> None:
        nonlocal stage, cpu
        now, cpu_now = time.perf_counter(), time.process_time()
        figures[f"{name}_seconds"] = round(now - stage, 1)
        figures[f"{name}_cpu_seconds"] = round(cpu_now - cpu, 1)  # of all threads: 2 cores
        figures[f"{name}_peak_rss_mb"] = round(peak_rss_mb())  # the peak so far
        stage, cpu = now, cpu_now

    listing = tonight(work_dir, rows, shape)
    with NightDiff(store, listing, previous, "the listing", TABLE) as diff:
        changes = diff.changes()
        removed = diff.removed()
        path, _ = diff.to_label()
        lap("diff")
        todo = pa.concat_tables(items_to_label(path))
        labels = work_dir / "tonight.parquet"
        pq.write_table(labelled(todo), labels)
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
