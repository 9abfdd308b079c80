"""Which rows of a finished run go to people: all of them, the review list (a low top-1 score,
or a small margin between the first two), the review list spread over the embedding space
(the images that teach a fit most), or a DuckDB filter (`top1_score < 0.6`). Streamed: the
ok rows are spooled to local disk and DuckDB filters and sorts them there."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import keys
from pipeline.errors import UsageError
from pipeline.review.base import REVIEW_BELOW, REVIEW_MARGIN, Run
from pipeline.rundir import finished_run, finished_table
from pipeline.sources import open_source

COLUMNS = ["key", "path", "top1_label", "top1_score", "labels", "scores"]
BATCH_ROWS = 65_536
ROWS = ("review", "spread", "all")
SPREAD_POOL = 20_000  # the lowest-scored review rows k-center chooses among
SPREAD_DEFAULT = 100  # rows --rows spread picks without --limit


@dataclass(frozen=True)
class Selection:
    rows: str = "review"  # "review" (lowest first), "spread" (k-center) or "all" (in order)
    where: str | None = None  # a DuckDB condition on the table's columns, ANDed
    below: float = REVIEW_BELOW
    margin: float = REVIEW_MARGIN
    limit: int | None = None

    def condition(self) -> str:
        parts = ["status = 'ok'"]
        if self.rows in ("review", "spread"):
            parts.append(f"(top1_score < {float(self.below)!r} OR (len(scores) > 1 AND "
                         f"scores[1] - scores[2] < {float(self.margin)!r}))")
        elif self.rows != "all":
            raise UsageError(f"--rows must be one of {', '.join(ROWS)}, got {self.rows!r}")
        if self.where:
            parts.append(f"({self.where})")
        return " AND ".join(parts)


def run_of(out: str) -> Run:
    """The run a finished table came from: its model, weights, whether its images are files."""
    record = finished_run(out)
    config = record.config
    from pipeline.config import RunConfig  # the run's source, opened (not listed) to ask

    fields = {k: v for k, v in config.items() if k in RunConfig.__dataclass_fields__}
    fields["keep_columns"] = tuple(fields.get("keep_columns") or ())
    try:
        holds_files = open_source(RunConfig(**fields).source_spec()).holds_files
    except UsageError:  # the source has gone since: its paths are still what the table says
        holds_files = True
    fingerprint = record.fingerprint
    return Run(out=out, model=fingerprint.get("model") or config.get("model", ""),
               weights=fingerprint.get("weights") or config.get("weights", ""),
               holds_files=holds_files, embeddings=bool(config.get("embeddings")))


@contextmanager
def chosen(out: str, selection: Selection, embeddings: bool = False):
    """(the chosen rows as a stream of tables, how many, every label among their top-k)."""
    store, fmt = finished_table(out)
    columns = COLUMNS + ["status"] + (["embedding"] if embeddings else [])
    spooled = columns + (["embedding"] if selection.rows == "spread" and not embeddings else [])
    folder = keys.spill_folder()
    con = None
    try:
        spool = os.path.join(folder, "rows.parquet")
        writer = None
        for table in fmt.batches(store, spooled):
            if selection.rows == "spread" and "embedding" not in table.column_names:
                raise UsageError(f"--rows spread chooses by the images' embeddings: {out} "
                                 "has none (label it with --embeddings)")
            table = table.filter(pc.equal(table["status"], "ok"))
            writer = writer or pq.ParquetWriter(spool, table.schema)
            writer.write_table(table)
        if writer is None:
            yield iter(()), 0, []
            return
        writer.close()
        con = keys.connect(folder)
        con.execute(f"CREATE VIEW rows AS SELECT * FROM read_parquet('{_quoted(spool)}', "
                    "file_row_number = true)")
        order = ("top1_score, file_row_number" if selection.rows == "review"
                 else "file_row_number")
        limit = f" LIMIT {int(selection.limit)}" if selection.limit else ""
        if selection.rows == "spread":  # the pool, lowest first; k-center picks from it
            limit = f" LIMIT {SPREAD_POOL}"
            order = "top1_score, file_row_number"
        query = (f"SELECT * FROM rows WHERE {selection.condition()} ORDER BY {order}{limit}")
        try:
            con.execute(f"CREATE TABLE picked AS SELECT file_row_number FROM ({query})")
        except Exception as exc:  # noqa: BLE001 - DuckDB's parser and binder errors alike
            raise UsageError(f"--where {selection.where!r}: "
                             f"{str(exc).splitlines()[0]}") from None
        if selection.rows == "spread":
            _spread(con, selection.limit or SPREAD_DEFAULT)
            order = "pick"
        count = con.sql("SELECT count(*) FROM picked").fetchall()[0][0]
        labels = [row[0] for row in con.sql(
            "SELECT DISTINCT unnest(labels) AS label FROM rows JOIN picked "
            "USING (file_row_number) ORDER BY label").fetchall()]
        names = ", ".join(c for c in columns if c != "status")
        reader = con.sql(f"SELECT {names} FROM rows JOIN picked USING (file_row_number) "
                         f"ORDER BY {order}").to_arrow_reader(BATCH_ROWS)
        yield (pa.Table.from_batches([b]) for b in reader), count, labels
    finally:
        if con is not None:
            con.close()
        shutil.rmtree(folder, ignore_errors=True)


def _spread(con, count: int) -> None:
    """Replace `picked` (the pool) by `count` of its rows spread over the embedding space:
    greedy k-center (farthest first) on unit-length embeddings, from the lowest-scored
    row; each pick is the pool's row farthest from every row picked so far, so a hundred
    answers cover the classes and the odd corners instead of a hundred near-copies.
    `pick` is the order of choice."""
    import numpy as np

    pool = con.sql("SELECT file_row_number, embedding FROM rows JOIN picked USING "
                   "(file_row_number) ORDER BY top1_score, file_row_number").to_arrow_table()
    numbers = pool["file_row_number"].to_numpy()
    if not len(numbers):
        con.execute("CREATE OR REPLACE TABLE picked AS SELECT file_row_number, 0 AS pick "
                    "FROM picked")
        return
    embedding = pool["embedding"].combine_chunks()
    vectors = embedding.flatten().to_numpy(zero_copy_only=False).reshape(
        len(numbers), -1).astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    chosen = [0]
    distance = 1 - vectors @ vectors[0]
    for _ in range(min(count, len(numbers)) - 1):
        far = int(np.argmax(distance))
        if distance[far] <= 0:  # the rest are copies of what is picked
            break
        chosen.append(far)
        distance = np.minimum(distance, 1 - vectors @ vectors[far])
    con.register("spread", pa.table({"file_row_number": pa.array(numbers[chosen]),
                                     "pick": pa.array(range(len(chosen)), pa.int64())}))
    con.execute("CREATE OR REPLACE TABLE picked AS SELECT * FROM spread")


def _quoted(path: str) -> str:
    return path.replace("'", "''")
