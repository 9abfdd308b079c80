"""--format delta and iceberg: one table commit per run or night, read back by pandas, DuckDB
and Polars as the Parquet output's rows; exactly once through a kill after the commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import duckdb
import pandas as pd
import pyarrow as pa
import pytest

from tests.conftest import REPO, read_output, write_colour_images

deltalake = pytest.importorskip("deltalake")
pyiceberg = pytest.importorskip("pyiceberg")
polars = pytest.importorskip("polars")
# Polars plans an Iceberg scan with PyIceberg unless its own planner plugin is installed, and
# says so in a warning: the plugin is not what is under test
os.environ.setdefault("POLARS_ICEBERG_PLANNER", "pyiceberg")

from pyiceberg.catalog import load_catalog  # noqa: E402

from pipeline.formats.lakehouse import COMMIT_KEY  # noqa: E402
from tests.test_object_storage import s3  # noqa: E402,F401  (the S3 server on loopback)


def job(folder, out, checkpoint, *extra):
    return ["run", str(folder), "--out", str(out), "--model", "resnet18", "--weights",
            str(checkpoint), "--top-k", "2", "--shard-size", "4", "--batch-size", "4",
            "--workers", "0", "--resize", "72", "--crop", "64", "--runtime", "torch",
            "--quiet", *extra]


def sorted_rows(table) -> pd.DataFrame:
    """A table's rows as plain Python values, by key (a table has no row order)."""
    frame = table if isinstance(table, pd.DataFrame) else table.to_pandas()
    frame = frame.sort_values("key").reset_index(drop=True)
    return frame.map(lambda v: v.tolist() if hasattr(v, "tolist") else v)


def iceberg_table(out, name="label_images.labels", catalog=None):
    uri = catalog or f"sqlite:///{out}/catalog.db"
    return load_catalog("label_images", type="sql", uri=uri,
                        warehouse=f"file://{os.path.dirname(uri.removeprefix('sqlite:///'))}"
                                  "/warehouse").load_table(name)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, colour_checkpoint):
    """A folder with a broken file, and the Parquet output of a run over it: the reference."""
    root = tmp_path_factory.mktemp("tables")
    folder = root / "photos"
    write_colour_images(folder, 10, seed=51)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    return folder, root


def parquet_reference(cli, folder, out, checkpoint, *extra):
    done = cli(*job(folder, out, checkpoint, *extra))
    assert done.exit_code == 0, done.output
    return read_output(out / "labels.parquet")


def test_a_delta_table_holds_the_parquet_rows_for_every_reader(cli, tmp_path, photos,
                                                               colour_checkpoint):
    folder, _ = photos
    reference = sorted_rows(parquet_reference(cli, folder, tmp_path / "ref", colour_checkpoint))
    done = cli(*job(folder, tmp_path / "run", colour_checkpoint, "--format", "delta"))
    assert done.exit_code == 0, done.output
    where = tmp_path / "run" / "labels.delta"
    table = deltalake.DeltaTable(str(where))
    # a run is one table version, and table.json names it
    assert table.version() == 0 and [h["operation"] for h in table.history()] == ["WRITE"]
    assert json.loads((tmp_path / "run" / "table.json").read_text())["version"] == 0
    columns = list(reference.columns)
    pd.testing.assert_frame_equal(sorted_rows(table.to_pandas())[columns], reference)
    arrow = table.to_pyarrow_dataset()  # DuckDB reads it through Arrow
    pd.testing.assert_frame_equal(
        sorted_rows(duckdb.sql("select * from arrow").to_arrow_table())[columns], reference)
    pd.testing.assert_frame_equal(
        sorted_rows(polars.read_delta(str(where)).to_pandas())[columns], reference)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    last = table.history()[0]
    assert last[COMMIT_KEY] == run["run_id"] and last["label_images.fingerprint"]
    assert last["label_images.model"] == "resnet18" and last["label_images.weights"]
    # the types readers see are the Parquet output's: a list of strings, int32, float32
    schema = pa.schema(table.schema().to_arrow())
    assert schema.field("width").type == pa.int32()
    assert schema.field("top1_score").type == pa.float32()
    # the HTML report reads the table where the run put it
    from pipeline import report

    shown = pa.concat_tables(report.read_batches(str(tmp_path / "run")))
    assert sorted(shown["key"].to_pylist()) == sorted(reference["key"])


def test_embeddings_go_into_a_delta_table_as_float_lists(cli, tmp_path, photos,
                                                         colour_checkpoint):
    folder, _ = photos
    reference = sorted_rows(parquet_reference(cli, folder, tmp_path / "ref", colour_checkpoint,
                                              "--embeddings"))
    done = cli(*job(folder, tmp_path / "run", colour_checkpoint, "--format", "delta",
                    "--embeddings"))
    assert done.exit_code == 0, done.output
    found = sorted_rows(deltalake.DeltaTable(str(tmp_path / "run" / "labels.delta")).to_pandas())
    assert found["embedding"].tolist() == reference["embedding"].tolist()
    assert len(next(e for e in found["embedding"] if e is not None)) == 512  # not the error row


def test_an_iceberg_table_in_the_default_catalog_holds_the_parquet_rows(cli, tmp_path, photos,
                                                                       colour_checkpoint):
    folder, _ = photos
    reference = sorted_rows(parquet_reference(cli, folder, tmp_path / "ref", colour_checkpoint))
    done = cli(*job(folder, tmp_path / "run", colour_checkpoint, "--format", "iceberg"))
    assert done.exit_code == 0, done.output
    table = iceberg_table(tmp_path / "run")
    assert len(table.snapshots()) == 1
    columns = list(reference.columns)
    arrow = table.scan().to_arrow()
    pd.testing.assert_frame_equal(sorted_rows(arrow)[columns], reference)
    pd.testing.assert_frame_equal(
        sorted_rows(duckdb.sql("select * from arrow").to_arrow_table())[columns], reference)
    pd.testing.assert_frame_equal(
        sorted_rows(polars.scan_iceberg(table).collect().to_pandas())[columns], reference)
    assert table.properties["label_images.weights"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert table.current_snapshot().summary[COMMIT_KEY] == run["run_id"]


# A run killed after the table's commit, before the run directory says it is finished.
_KILLED_AFTER_COMMIT = """
import os, sys
from pipeline.formats.delta import DeltaFormat
from pipeline.formats.iceberg import IcebergFormat
def dies_after(replace):
    def committed_then_killed(*args):
        replace(*args)
        os._exit(9)
    return committed_then_killed
for kind in (DeltaFormat, IcebergFormat):
    kind.replace = dies_after(kind.replace)
sys.argv = ["label-images", *sys.argv[1:]]
from pipeline.cli import main
main()
"""


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_killed_between_the_table_commit_and_the_end_then_rerun_commits_once(
        cli, tmp_path, photos, colour_checkpoint, fmt):
    folder, _ = photos
    args = job(folder, tmp_path / "run", colour_checkpoint, "--format", fmt)
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_COMMIT, *args], cwd=REPO,
                            capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    assert not (tmp_path / "run" / "table.json").exists()
    assert (tmp_path / "run" / "parts").exists()
    again = cli(*args)
    assert again.exit_code == 0, again.output
    if fmt == "delta":
        table = deltalake.DeltaTable(str(tmp_path / "run" / "labels.delta"))
        commits = table.history()
        rows = table.to_pandas()
    else:
        table = iceberg_table(tmp_path / "run")
        commits = table.snapshots()
        rows = table.scan().to_pandas()
    assert len(commits) == 1
    assert sorted(rows["key"]) == sorted(p.name for p in folder.iterdir())
    assert not (tmp_path / "run" / "parts").exists()


def _night(cli, folder, out, checkpoint, *extra):
    done = cli(*job(folder, out, checkpoint, "--incremental", *extra))
    assert done.exit_code == 0, done.output
    return json.loads((out / "table.json").read_text())


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_three_nights_equal_three_scratch_runs_and_night_one_is_still_readable(
        cli, tmp_path, colour_checkpoint, fmt):
    from PIL import Image

    from tests.conftest import colour_array

    folder, out = tmp_path / "photos", tmp_path / "nightly"
    truth = write_colour_images(folder, 9, seed=61)

    def read(version=None):
        if fmt == "delta":
            return deltalake.DeltaTable(str(out / "labels.delta"), version=version).to_pandas()
        table = iceberg_table(out)
        return table.scan(snapshot_id=version).to_pandas()

    def scratch(name):
        reference = parquet_reference(cli, folder, tmp_path / f"scratch-{name}",
                                      colour_checkpoint)
        found = sorted_rows(read())
        columns = [c for c in reference.columns if c not in ("source_size", "source_version")]
        pd.testing.assert_frame_equal(found[columns], sorted_rows(reference)[columns])
        return found

    night_one = _night(cli, folder, out, colour_checkpoint, "--format", fmt)
    first = scratch("1")
    # night 2: two new images, one changed (now blue), one removed
    write_colour_images(folder / "new", 2, seed=62)
    changed = sorted(truth)[1]
    stat = os.stat(folder / changed)
    Image.fromarray(colour_array("blue", 80, 60, seed=8)).save(folder / changed)
    os.utime(folder / changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    os.unlink(folder / sorted(truth)[6])
    night_two = _night(cli, folder, out, colour_checkpoint, "--format", fmt)
    assert night_two["version"] != night_one["version"]
    second = scratch("2")
    if fmt == "iceberg":  # the night's changes only: the new and the changed image's rows
        assert iceberg_table(out).current_snapshot().summary["added-records"] == "3"
    assert second.set_index("key").loc[changed, "top1_label"] == "blue"
    # night 3: one more removed, nothing else
    os.unlink(folder / sorted(truth)[0])
    _night(cli, folder, out, colour_checkpoint, "--format", fmt)
    scratch("3")
    # night 1, by time travel
    pd.testing.assert_frame_equal(sorted_rows(read(night_one["version"])), first)
    if fmt == "delta":  # a night is one merge, and nothing else
        history = deltalake.DeltaTable(str(out / "labels.delta")).history()
        assert [h["operation"] for h in history] == ["MERGE", "MERGE", "WRITE"]
        assert all(h[COMMIT_KEY] for h in history)
    # a night with nothing changed commits nothing
    before = read()
    _night(cli, folder, out, colour_checkpoint, "--format", fmt)
    pd.testing.assert_frame_equal(sorted_rows(read()), sorted_rows(before))


def test_a_table_that_is_not_ours_is_refused_before_anything_is_written(
        cli, tmp_path, photos, colour_checkpoint):
    folder, _ = photos
    where = tmp_path / "theirs"
    deltalake.write_deltalake(str(where), pa.table({"key": ["a"], "label": ["x"]}))
    done = cli(*job(folder, tmp_path / "run", colour_checkpoint, "--format", "delta",
                    "--table", str(where)))
    assert done.exit_code == 2
    line, = done.output.strip().splitlines()
    assert f"{where} is not a label-images table: path (missing)" in line
    assert not (tmp_path / "run" / "parts").exists()
    assert deltalake.DeltaTable(str(where)).version() == 0


def test_a_catalog_that_does_not_answer_is_one_line(cli, tmp_path, photos, colour_checkpoint):
    folder, _ = photos
    done = cli(*job(folder, tmp_path / "run", colour_checkpoint, "--format", "iceberg",
                    "--catalog", "http://127.0.0.1:9/catalog"))
    assert done.exit_code == 2
    line, = done.output.strip().splitlines()
    assert "the Iceberg catalog at http://127.0.0.1:9/catalog cannot be reached" in line
    assert not (tmp_path / "run" / "parts").exists()


def test_table_options_belong_to_the_table_formats(cli, tmp_path, photos, colour_checkpoint):
    folder, _ = photos
    done = cli(*job(folder, tmp_path / "run", colour_checkpoint, "--table", "x"))
    assert done.exit_code == 2 and "--table is for --format delta or iceberg" in done.output
    done = cli(*job(folder, tmp_path / "run", colour_checkpoint, "--format", "iceberg",
                    "--table", "nodots"))
    assert done.exit_code == 2 and "an Iceberg table is NAMESPACE.NAME" in done.output


def test_a_delta_table_on_object_storage(tmp_path, photos, colour_checkpoint, s3):
    """The run directory and the table on the test S3 server, read back by delta-rs."""
    env, fs = s3
    folder, _ = photos
    environment = {**os.environ, **env, "AWS_ALLOW_HTTP": "true"}
    args = job(folder, "s3://bucket/tables/run", colour_checkpoint, "--format", "delta",
               "--table", "s3://bucket/lake/labels")
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "-> s3://bucket/lake/labels" in done.stderr
    table = deltalake.DeltaTable("s3://bucket/lake/labels", storage_options={
        "AWS_ENDPOINT_URL": env["AWS_ENDPOINT_URL"], "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1"})
    assert sorted(table.to_pandas()["key"]) == sorted(p.name for p in folder.iterdir())
    assert fs.exists("bucket/tables/run/table.json")


# Another writer commits to the table after this night read it and before its commit.
_ANOTHER_WRITER = """
import sys
import deltalake, pyarrow as pa
from pipeline.formats.delta import DeltaFormat
read = DeltaFormat.last_commit
def read_then_another_writer_commits(self, table):
    found = read(self, table)
    rows = deltalake.DeltaTable(table.table_uri).to_pyarrow_table().slice(0, 1)
    deltalake.write_deltalake(table.table_uri, rows, mode="append")  # a duplicate key
    return found
DeltaFormat.last_commit = read_then_another_writer_commits
sys.argv = ["label-images", *sys.argv[1:]]
from pipeline.cli import main
main()
"""


def test_a_table_that_moved_on_under_the_night_is_refused_then_replaced_on_the_rerun(
        cli, tmp_path, colour_checkpoint):
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    write_colour_images(folder, 6, seed=71)
    _night(cli, folder, out, colour_checkpoint, "--format", "delta")
    write_colour_images(folder / "new", 2, seed=72)
    args = job(folder, out, colour_checkpoint, "--incremental", "--format", "delta")
    raced = subprocess.run([sys.executable, "-c", _ANOTHER_WRITER, *args], cwd=REPO,
                           capture_output=True, text=True)
    assert raced.returncode == 1, raced.stderr
    line, = raced.stderr.strip().splitlines()
    assert "moved on while this run committed to it (another writer)" in line
    table = deltalake.DeltaTable(str(out / "labels.delta"))
    assert table.to_pandas()["key"].duplicated().sum() == 1  # theirs, nothing of tonight's
    night = _night(cli, folder, out, colour_checkpoint, "--format", "delta")
    rows = deltalake.DeltaTable(str(out / "labels.delta")).to_pandas()
    assert sorted(rows["key"]) == sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())  # each once
    assert night["commit"]


def test_an_iceberg_table_that_is_not_ours_is_refused_before_anything_is_written(
        cli, tmp_path, photos, colour_checkpoint):
    folder, _ = photos
    uri = f"sqlite:///{tmp_path}/lake.db"
    catalog = load_catalog("label_images", type="sql", uri=uri,
                           warehouse=f"file://{tmp_path}/warehouse")
    catalog.create_namespace("shop")
    catalog.create_table("shop.orders", schema=pa.schema([("key", pa.string()),
                                                          ("status", pa.int64())]))
    done = cli(*job(folder, tmp_path / "run", colour_checkpoint, "--format", "iceberg",
                    "--catalog", uri, "--table", "shop.orders"))
    assert done.exit_code == 2
    line, = done.output.strip().splitlines()
    assert "is not a label-images table: path (missing), status (int64, not string)" in line
    assert not (tmp_path / "run" / "parts").exists()
    assert catalog.load_table("shop.orders").current_snapshot() is None


def test_slices_of_an_array_job_merge_into_one_delta_commit(cli, tmp_path, photos,
                                                           colour_checkpoint):
    folder, _ = photos
    out, table = tmp_path / "run", tmp_path / "lake" / "labels"
    for index in ("0", "1"):
        done = cli(*job(folder, out, colour_checkpoint, "--format", "delta", "--table",
                        str(table), "--num-slices", "2", "--slice-index", index))
        assert done.exit_code == 0, done.output
    assert not table.exists()  # the slices commit parts; only the merge makes the table
    merged = cli("merge", str(out))
    assert merged.exit_code == 0, merged.output
    rows = deltalake.DeltaTable(str(table)).to_pandas()
    assert sorted(rows["key"]) == sorted(p.name for p in folder.iterdir())
    commits = deltalake.DeltaTable(str(table)).history()
    assert [h["operation"] for h in commits] == ["WRITE"]


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_a_night_reads_only_the_parts_it_rewrites(cli, tmp_path, colour_checkpoint,
                                                   monkeypatch, fmt):
    """A Delta or Iceberg night commits tonight's rows and removed keys: the run
    directory's parts it did not rewrite are not read (one is made unreadable before the
    night; reading it, to count rows say, would end the night naming it)."""
    from pipeline import night_table
    from tests.test_night_table import touch_up

    monkeypatch.setattr(night_table, "PART_ROWS", 3)
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    truth = write_colour_images(folder, 12, seed=71)
    _night(cli, folder, out, colour_checkpoint, "--format", fmt)
    state = out / "labels.parquet"
    names = sorted(os.listdir(state))
    assert len(names) == 4
    touch_up(folder, sorted(truth)[4])  # in the second part
    (state / names[2]).write_bytes(b"not Parquet any more")  # the third: not tonight's
    _night(cli, folder, out, colour_checkpoint, "--format", fmt)
    rows = (deltalake.DeltaTable(str(out / "labels.delta")).to_pandas() if fmt == "delta"
            else iceberg_table(out).scan().to_pandas())
    assert sorted(rows["key"]) == sorted(truth)
    assert rows.set_index("key").loc[sorted(truth)[4], "top1_label"] == "blue"
    assert (state / names[2]).read_bytes() == b"not Parquet any more"
