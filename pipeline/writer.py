"""Output schema, atomic part files per shard, and the streaming merge into one table; no torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import RunError, UsageError
from pipeline.formats.base import Commit, Format
from pipeline.formats.parquet import parquet_options
from pipeline.storage import Store

# Our columns, optional ones included: a kept manifest column may not take one's name.
OUTPUT_COLUMNS = frozenset({"key", "path", "status", "error", "width", "height", "top1_label",
                            "top1_score", "labels", "scores", "class_ids", "embedding",
                            "source_size", "source_version"})
# Rows gathered before the merge writes a row group: big enough for DuckDB/Spark to scan
# well, small enough to keep memory flat.
MERGE_ROW_GROUP = 65_536

@dataclass
class ShardResult:
    """What the model and loader found for each item of one shard, in plan order."""

    ok: np.ndarray  # bool (n,)
    errors: list[str | None]  # error text, None when ok
    width: np.ndarray  # int32 (n,)
    height: np.ndarray  # int32 (n,)
    class_ids: np.ndarray  # int32 (n, k), best first; rows that are not ok are ignored
    scores: np.ndarray  # float32 (n, k)
    embeddings: np.ndarray | None = None  # float32 (n, d), with --embeddings

    @classmethod
    def empty(cls, n: int, top_k: int, embedding_size: int | None = None) -> ShardResult:
        return cls(
            ok=np.zeros(n, bool), errors=[None] * n,
            width=np.zeros(n, np.int32), height=np.zeros(n, np.int32),
            class_ids=np.zeros((n, top_k), np.int32), scores=np.zeros((n, top_k), np.float32),
            embeddings=(None if embedding_size is None
                        else np.zeros((n, embedding_size), np.float32)),
        )


def output_schema(top_k: int, extra: pa.Schema, metadata: dict[str, str],
                  embedding_size: int | None = None) -> pa.Schema:
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
        # float32, not float16: Spark and Trino refuse a whole file with a Parquet FLOAT16
        # column in it, and DuckDB reads it only since 1.3.
        *([pa.field("embedding", pa.list_(pa.float32(), embedding_size))]
          if embedding_size else []),
        *extra,
    ]
    meta = {**metadata, "label_images.top_k": str(top_k)}
    return pa.schema(fields, metadata={k: str(v) for k, v in meta.items()})


def check_kept_columns(names: tuple[str, ...]) -> None:
    """A kept manifest column named like one of ours is refused: the table cannot hold both."""
    clashing = [name for name in names if name in OUTPUT_COLUMNS]
    if clashing:
        raise UsageError(f"--keep-columns {', '.join(clashing)} would clash with output columns "
                         f"of the same name; rename them in the manifest")


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
    if "embedding" in schema.names:
        size = result.embeddings.shape[1]
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(result.embeddings.ravel(), pa.float32()), size, mask=null_rows)
    for name in schema.names[len(columns):]:
        columns[name] = items[name]
    return pa.table(columns).cast(schema)


def write_part(store: Store, name: str, table: pa.Table) -> None:
    """Commit one shard: the part appears under its final name only when complete."""
    with store.writing(name) as sink:
        pq.write_table(table, sink, **parquet_options(table.schema))


@dataclass(frozen=True)
class MergeCounts:
    rows: int
    ok: int
    errors: int


def merge_parts(store: Store, parts: list[str], fmt: Format,
                expected_rows: list[int] | None = None,
                commit: Commit | None = None, count: bool = True) -> MergeCounts | None:
    """Stream the parts, in shard order, into the final table in `fmt`, committed as one
    (`commit`: what a table format records with it).

    With expected_rows, a part with another row count aborts the merge before the commit:
    the exactly-once check. The counts are of the rows streamed: a table format that takes
    a night's changes only (or finds its commit already made) reads them all the same,
    unless `count` is False (a night, whose index has its counts): then only what the
    format asked for is read, and None is returned.
    """
    try:
        with store.open(parts[0]) as fh:
            schema = pq.read_schema(fh)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _unreadable(store, parts[0], exc) from None
    counts = {"rows": 0, "ok": 0}

    def tables():
        pending: list[pa.Table] = []
        pending_rows = 0
        for part, expected in zip(parts, expected_rows or [None] * len(parts)):
            for table in _row_groups(store, part, expected):
                table = table.cast(schema)
                counts["rows"] += table.num_rows
                counts["ok"] += pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
                pending.append(table)
                pending_rows += table.num_rows
                if pending_rows >= MERGE_ROW_GROUP:
                    yield pa.concat_tables(pending)
                    pending, pending_rows = [], 0
        if pending:
            yield pa.concat_tables(pending)

    streamed = tables()
    fmt.assemble(store, schema, streamed, commit)
    if not count:
        streamed.close()
        return None
    for _ in streamed:  # counted whether or not the format needed them
        pass
    return MergeCounts(rows=counts["rows"], ok=counts["ok"], errors=counts["rows"] - counts["ok"])


def _row_groups(store: Store, part: str, expected_rows: int | None):
    """A part's row groups (one, but a finished table passed for conversion has many).

    A part that cannot be read was damaged outside our commits: its error names it. Errors
    of the code consuming the row groups (writing the output) are not caught here.
    """
    try:
        with store.open(part) as fh:
            source = pq.ParquetFile(fh)
            found = source.metadata.num_rows
            if expected_rows is not None and found != expected_rows:
                raise RunError(f"{store.url(part)} has {found} rows for a shard of "
                               f"{expected_rows}; delete it and run again to redo it")
            for group in range(source.num_row_groups):
                yield source.read_row_group(group)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _unreadable(store, part, exc) from None


def _unreadable(store: Store, part: str, exc: Exception) -> RunError:
    return RunError(f"{store.url(part)} cannot be read ({exc}); delete it and run the same "
                    "command again to redo that shard")


def count_rows(store: Store, fmt: Format) -> MergeCounts:
    """Count rows and statuses of the finished table in `fmt`, streaming."""
    rows = ok = 0
    for statuses in fmt.statuses(store):
        rows += len(statuses)
        ok += pc.sum(pc.equal(statuses, "ok")).as_py() or 0
    return MergeCounts(rows=rows, ok=ok, errors=rows - ok)
