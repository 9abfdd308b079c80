"""The output table as our users open it: pandas, DuckDB and Spark, every optional column on.

The manifest stores its timestamps as Spark does (INT96), with the "open end" date Spark
tables often use; the run keeps them and writes embeddings. Spark (pyspark 3.5, a test
extra; Java 17 runs it) also reads a CSV output with the options the README gives. Spark's
Iceberg and Delta readers are jars fetched from Maven, which this machine cannot reach (the
one Iceberg runtime on PyPI, in snowpark-connect-deps-iceberg, lacks its shaded Jackson), so
Iceberg and Delta are read by their own Python readers, DuckDB and Polars (test_tables.py).
Starting the JVM makes these slow.
"""

from __future__ import annotations

import datetime as dt
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import FAST, invoke, read_output, write_colour_images

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
    result = invoke("run", root / "manifest.parquet", "--out", root / "run", "--model",
                    "resnet18", "--weights", colour_checkpoint, "--top-k", "2", "--embeddings",
                    "--keep-columns", "taken", "--workers", "0", "-q", *FAST)
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


@pytest.fixture(scope="module")
def spark():
    if not java():
        pytest.skip("Spark needs Java")
    pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession
    session = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
               .config("spark.sql.session.timeZone", "UTC").getOrCreate())
    yield session
    session.stop()


# pyspark's gateway to the JVM leaves its sockets to the garbage collector.
SPARK_SOCKETS = pytest.mark.filterwarnings("ignore::ResourceWarning",
                                           "ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.slow
@SPARK_SOCKETS
def test_spark_reads_every_column(spark, labels):
    path, taken = labels
    rows = spark.read.parquet(str(path)).selectExpr(
        "path", "status", "taken", "if(embedding is null, null, size(embedding)) as size",
        "labels[0] as first").orderBy("path").collect()
    assert [(r["path"], r["taken"]) for r in rows] == sorted(taken.items())
    assert {(r["status"], r["size"]) for r in rows} == {("ok", 512), ("error", None)}
    assert all((r["first"] is None) == (r["status"] == "error") for r in rows)


@pytest.mark.slow
@SPARK_SOCKETS
def test_spark_reads_csv_with_odd_names_as_the_readme_says(spark, cli, tmp_path,
                                                           colour_checkpoint):
    names = ["comma,name.jpg", 'quote"name.jpg', "new\nline.jpg", "plain.jpg"]
    for name in names:
        Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / name)
    result = cli("run", tmp_path, "--out", tmp_path / "run", "--format", "csv", "--model",
                 "resnet18", "--weights", colour_checkpoint, "--top-k", "2", "--workers", "0",
                 "-q", *FAST)
    assert result.exit_code == 0, result.output
    frame = spark.read.csv(str(tmp_path / "run" / "labels.csv"), header=True, multiLine=True,
                           escape='"')
    assert sorted(r["key"] for r in frame.select("key").collect()) == sorted(names)


@SPARK_SOCKETS
def test_spark_reads_a_nightly_table_of_parts(spark, tmp_path, colour_checkpoint, monkeypatch):
    from pipeline import night_table

    monkeypatch.setattr(night_table, "PART_ROWS", 2)  # six images, three parts
    names = sorted(write_colour_images(tmp_path / "imgs", 6))
    result = invoke("run", tmp_path / "imgs", "--out", tmp_path / "run", "--model", "resnet18",
                    "--weights", colour_checkpoint, "--incremental", "--workers", "0", "-q",
                    *FAST)
    assert result.exit_code == 0, result.output
    table = tmp_path / "run" / "labels.parquet"
    assert len(list(table.iterdir())) == 3
    rows = spark.read.parquet(str(table)).select("key", "status").orderBy("key").collect()
    assert [(r["key"], r["status"]) for r in rows] == [(n, "ok") for n in names]
    from tests.test_night_table import readme_readers

    line = readme_readers()[3].replace("runs/photos", str(tmp_path / "run"))
    assert eval(line, {"spark": spark}).count() == 6  # the README's line, as written
