"""The output table as our users open it: pandas, DuckDB and Spark, every optional column on.

The manifest stores its timestamps as Spark does (INT96), with the "open end" date Spark
tables often use; the run keeps them and writes embeddings. Spark needs Java and pyspark,
which `make test-slow` installs: it is behind the `slow` marker.
"""

from __future__ import annotations

import datetime as dt
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import FAST, read_output, write_colour_images

TAKEN = [dt.datetime(2024, 5, 1, 10, 0, 0, 123456), dt.datetime(9999, 12, 31)]


@pytest.fixture(scope="module")
def labels(tmp_path_factory, colour_checkpoint):
    """labels.parquet of a run with kept Spark-written timestamps and embeddings."""
    root = tmp_path_factory.mktemp("readers")
    names = sorted(write_colour_images(root / "imgs", 6))
    (root / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    paths = [str(root / "imgs" / n) for n in [*names, "broken.jpg"]]
    taken = [TAKEN[i % 2] for i in range(len(paths))]
    pq.write_table(pa.table({"path": paths, "taken": pa.array(taken, pa.timestamp("us"))}),
                   root / "manifest.parquet", use_deprecated_int96_timestamps=True)
    result = CliRunner().invoke(app, [
        "run", str(root / "manifest.parquet"), "--out", str(root / "run"), "--model", "resnet18",
        "--weights", str(colour_checkpoint), "--top-k", "2", "--embeddings", "--keep-columns",
        "taken", "--workers", "0", "-q", *FAST])
    assert result.exit_code == 0, result.output
    return root / "run" / "labels.parquet", dict(zip(paths, taken))


def test_pandas_reads_every_column(labels):
    path, taken = labels
    table = read_output(path)
    assert len(table) == len(taken) and (table["status"] == "ok").sum() == len(taken) - 1
    assert [t.to_pydatetime() for t in table["taken"]] == [taken[p] for p in table["path"]]
    embedding = table.loc[table["status"] == "ok", "embedding"].iloc[0]
    assert len(embedding) == 512


def test_duckdb_reads_every_column(labels):
    duckdb = pytest.importorskip("duckdb")
    path, taken = labels
    rows = duckdb.sql(f"select path, status, taken, len(embedding), top1_label "
                      f"from '{path}' order by path").fetchall()
    assert [(r[0], r[2]) for r in rows] == sorted(taken.items())
    assert {(r[1], r[3]) for r in rows} == {("ok", 512), ("error", None)}
    assert all((r[4] is None) == (r[1] == "error") for r in rows)


def java() -> bool:
    return shutil.which("java") is not None


@pytest.mark.slow
# pyspark's gateway to the JVM leaves its sockets to the garbage collector.
@pytest.mark.filterwarnings("ignore::ResourceWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.skipif(not java(), reason="Spark needs Java")
def test_spark_reads_every_column(labels):
    pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession
    path, taken = labels
    spark = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
             .config("spark.sql.session.timeZone", "UTC").getOrCreate())
    try:
        frame = spark.read.parquet(str(path))
        rows = frame.selectExpr("path", "status", "taken", "if(embedding is null, null, size(embedding)) as size",
                                "labels[0] as first").orderBy("path").collect()
    finally:
        spark.stop()
    assert [(r["path"], r["taken"]) for r in rows] == sorted(taken.items())
    assert {(r["status"], r["size"]) for r in rows} == {("ok", 512), ("error", None)}
    assert all((r["first"] is None) == (r["status"] == "error") for r in rows)
