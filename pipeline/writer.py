"""Output schema, atomic part files per shard, and the streaming merge into one table; no torch."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

# Rows gathered before the merge writes a row group: big enough for DuckDB/Spark to scan
# well, small enough to keep memory flat.
MERGE_ROW_GROUP = 65_536
TMP_MARK = ".tmp-"


@dataclass
class ShardResult:
    """What the model and loader found for each item of one shard, in plan order."""

    ok: np.ndarray  # bool (n,)
    errors: list[str | None]  # error text, None when ok
    width: np.ndarray  # int32 (n,)
    height: np.ndarray  # int32 (n,)
    class_ids: np.ndarray  # int32 (n, k), best first; rows that are not ok are ignored
    scores: np.ndarray  # float32 (n, k)

    @classmethod
    def empty(cls, n: int, top_k: int) -> ShardResult:
        return cls(
            ok=np.zeros(n, bool), errors=[None] * n,
            width=np.zeros(n, np.int32), height=np.zeros(n, np.int32),
            class_ids=np.zeros((n, top_k), np.int32), scores=np.zeros((n, top_k), np.float32),
        )


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; on success flush it and rename it into place.

    A reader (or a resumed run) sees either the old file or the whole new one, never half.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and a random tag: unique even among hosts sharing one directory
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(directory: Path, owned=lambda name: True) -> None:
    """Delete temporaries a killed run left behind (never a committed file)."""
    if not directory.is_dir():
        return
    for entry in os.scandir(directory):
        if (entry.name.startswith(".") and TMP_MARK in entry.name and entry.is_file()
                and owned(entry.name)):
            os.unlink(entry.path)


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def output_schema(top_k: int, extra: pa.Schema, metadata: dict[str, str]) -> pa.Schema:
    """The Parquet schema of DESIGN.md; top-k lists best first, kept manifest columns last."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("top1_label", pa.string()),
        pa.field("top1_score", pa.float32()),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("class_ids", pa.list_(pa.int32())),
        *extra,
    ]
    meta = {**metadata, "label_images.top_k": str(top_k)}
    return pa.schema(fields, metadata={k: str(v) for k, v in meta.items()})


def part_table(items: pa.Table, result: ShardResult, categories: list[str],
               schema: pa.Schema) -> pa.Table:
    """Join one shard's plan rows with what was found for them, as a table of `schema`."""
    n, k = result.class_ids.shape
    failed = ~result.ok
    names = np.asarray(categories, dtype=object)
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    null_rows = pa.array(failed)

    def top_k_list(values: pa.Array) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, values, mask=null_rows)

    ids = result.class_ids.astype(np.int32)
    columns = {
        "key": items["key"],
        "path": items["path"],
        "status": pa.array(np.where(result.ok, "ok", "error"), pa.string()),
        "error": pa.array(result.errors, pa.string()),
        "width": pa.array(result.width, pa.int32(), mask=failed),
        "height": pa.array(result.height, pa.int32(), mask=failed),
        "top1_label": pa.array(names[ids[:, 0]], pa.string(), mask=failed),
        "top1_score": pa.array(result.scores[:, 0], pa.float32(), mask=failed),
        "labels": top_k_list(pa.array(names[ids.ravel()], pa.string())),
        "scores": top_k_list(pa.array(result.scores.ravel(), pa.float32())),
        "class_ids": top_k_list(pa.array(ids.ravel(), pa.int32())),
    }
    for name in schema.names[len(columns):]:
        columns[name] = items[name]
    return pa.table(columns).cast(schema)


def write_part(path: Path, table: pa.Table) -> None:
    """Commit one shard: the part appears under its final name only when complete."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def csv_schema(schema: pa.Schema) -> pa.Schema:
    """The flat CSV layout: label_1..K, score_1..K, class_id_1..K instead of lists."""
    top_k = int(schema.metadata[b"label_images.top_k"])
    fields = []
    for f in schema:
        if f.name in ("labels", "scores", "class_ids"):
            stem = {"labels": "label", "scores": "score", "class_ids": "class_id"}[f.name]
            fields += [pa.field(f"{stem}_{i}", f.type.value_type) for i in range(1, top_k + 1)]
        else:
            fields.append(f)
    return pa.schema(fields)


def _flatten(batch: pa.RecordBatch, flat: pa.Schema, top_k: int) -> pa.RecordBatch:
    columns = []
    for f in batch.schema:
        column = batch.column(f.name)
        if f.name in ("labels", "scores", "class_ids"):
            columns += [pc.list_element(column, i) for i in range(top_k)]
        else:
            columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=flat)


@dataclass(frozen=True)
class MergeCounts:
    rows: int
    ok: int
    errors: int


def merge_parts(parts: list[Path], out_path: Path, fmt: str) -> MergeCounts:
    """Stream the parts, in shard order, into one Parquet or CSV file, committed atomically."""
    schema = pq.read_schema(parts[0])
    top_k = int(schema.metadata[b"label_images.top_k"])
    rows = ok = 0
    with atomic_path(out_path) as tmp:
        if fmt == "parquet":
            sink = pq.ParquetWriter(tmp, schema)
            write = sink.write_table
        else:
            flat = csv_schema(schema)
            sink = pacsv.CSVWriter(tmp, flat)

            def write(table: pa.Table) -> None:
                for batch in table.to_batches():
                    sink.write_batch(_flatten(batch, flat, top_k))
        try:
            pending: list[pa.Table] = []
            pending_rows = 0
            for part in parts:
                table = pq.read_table(part, schema=schema)
                rows += table.num_rows
                ok += pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
                pending.append(table)
                pending_rows += table.num_rows
                if pending_rows >= MERGE_ROW_GROUP:
                    write(pa.concat_tables(pending))
                    pending, pending_rows = [], 0
            if pending:
                write(pa.concat_tables(pending))
        finally:
            sink.close()
    return MergeCounts(rows=rows, ok=ok, errors=rows - ok)


def count_rows(path: Path) -> MergeCounts:
    """Count rows and statuses of a finished output file, streaming (Parquet or CSV)."""
    rows = ok = 0
    if path.suffix == ".parquet":
        batches = pq.ParquetFile(path).iter_batches(columns=["status"])
    else:
        batches = pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(
            include_columns=["status"]))
    for batch in batches:
        rows += batch.num_rows
        ok += pc.sum(pc.equal(batch.column(0), "ok")).as_py() or 0
    return MergeCounts(rows=rows, ok=ok, errors=rows - ok)
