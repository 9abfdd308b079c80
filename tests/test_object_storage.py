"""Images, manifests and run directories on S3: a real S3 API (moto's server) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, read_output, run_subprocess, write_colour_images

s3fs = pytest.importorskip("s3fs")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback; yields (environment for clients, filesystem)."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                               "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
    fs.mkdir("bucket")
    yield env, fs
    server.terminate()
    server.wait(timeout=10)


# What a run over the uploaded folder says of the one file in it that is not an image
PASSED_OVER = "passed over 1 file(s) not named as images (.txt 1)"


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory, colour_checkpoint):
    """A folder uploaded to s3://bucket/images/, and a local run over the same folder."""
    env, fs = s3
    root = tmp_path_factory.mktemp("local")
    folder = root / "images"
    write_colour_images(folder, 30, seed=31)
    (folder / "sub").mkdir()
    write_colour_images(folder / "sub", 3, seed=32)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    (folder / "sub" / "notes.txt").write_text("not an image")
    fs.put(str(folder), "bucket/images", recursive=True)
    local = run_subprocess(*job(folder, root / "run", colour_checkpoint))
    assert local.returncode == 0, local.stderr
    assert PASSED_OVER in local.stderr
    return folder, read_output(root / "run" / "labels.parquet")


def job(source, out, checkpoint, *extra):
    return ["run", str(source), "--out", str(out), "--model", "resnet18", "--weights",
            str(checkpoint), "--top-k", "2", "--shard-size", "5", "--batch-size", "4",
            "--workers", "1", "--resize", "72", "--crop", "64", "--quiet", *extra]


def read_s3_table(fs, key) -> pd.DataFrame:
    with fs.open(key, "rb") as fh:
        return pd.read_parquet(fh)


def assert_matches_local(table, reference):
    assert table["key"].tolist() == reference["key"].tolist()
    assert table["status"].tolist() == reference["status"].tolist()
    assert table["top1_label"].tolist() == reference["top1_label"].tolist()


def test_a_bucket_prefix_labelled_into_a_bucket(s3, uploaded, colour_checkpoint):
    env, fs = s3
    _, reference = uploaded
    done = run_subprocess(*job("s3://bucket/images/", "s3://bucket/runs/one",
                               colour_checkpoint), env=env)
    assert done.returncode == 0, done.stderr
    assert "s3://bucket/runs/one/labels.parquet" in done.stderr
    assert PASSED_OVER in done.stderr  # the bucket's listing says so as the folder's does
    table = read_s3_table(fs, "bucket/runs/one/labels.parquet")
    assert_matches_local(table, reference)
    assert table["path"].iloc[1] == f"s3://bucket/images/{table['key'].iloc[1]}"
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("bucket/runs/one"))
    assert names == ["labels.parquet", "plan", "plan.json", "run.json", "summary.json"]


def test_a_manifest_in_the_bucket_with_relative_paths(s3, uploaded, colour_checkpoint,
                                                       tmp_path):
    env, fs = s3
    _, reference = uploaded
    keys = reference["key"].tolist()
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": [f"images/{k}" for k in keys]}).to_csv(manifest, index=False)
    fs.put(str(manifest), "bucket/manifest.csv")
    done = run_subprocess(*job("s3://bucket/manifest.csv", tmp_path / "run",
                               colour_checkpoint), env=env)
    assert done.returncode == 0, done.stderr
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert table["path"].tolist() == [f"s3://bucket/images/{k}" for k in keys]
    assert table["top1_label"].tolist() == reference["top1_label"].tolist()


def test_an_object_too_large_for_max_pixels_is_an_error_row_not_a_download(
        s3, colour_checkpoint, tmp_path):
    env, fs = s3
    write_colour_images(tmp_path / "odd", 1, seed=33)
    fs.put(str(tmp_path / "odd"), "bucket/odd", recursive=True)
    fs.pipe("bucket/odd/huge.png", os.urandom(2 * 2**20))
    done = run_subprocess(*job("s3://bucket/odd/", tmp_path / "run", colour_checkpoint,
                               "--max-pixels", "100000"), env=env)  # 800 KB of file at most
    assert done.returncode == 0, done.stderr
    table = read_output(tmp_path / "run" / "labels.parquet").set_index("key")
    assert table.loc["huge.png", "error"] == ("OSError: the file is 2.0 MB, more than an "
                                              "image within --max-pixels can take (0.8 MB)")
    assert table.loc["img_0000.jpg", "status"] == "ok"


@pytest.mark.parametrize("point", ["part-committed", "part-mid-write", "merge-mid-write"])
def test_killed_on_object_storage_then_resumed_exactly_once(s3, uploaded, colour_checkpoint,
                                                            point):
    env, fs = s3
    _, reference = uploaded
    out = f"s3://bucket/runs/kill-{point}"
    args = job("s3://bucket/images/", out, colour_checkpoint)
    # no rename on object storage: the kills land after an upload, inside one, or mid-merge
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "killpoints.py"), point,
                             "3" if point.startswith("part") else "1", *args],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, **env})
    assert killed.returncode == -9, killed.stderr[-2000:]
    fs.invalidate_cache()
    parts = fs.ls(f"{out[5:]}/parts") if fs.exists(f"{out[5:]}/parts") else []
    assert not fs.exists(f"{out[5:]}/labels.parquet")
    assert all(p.rsplit("/", 1)[1].startswith("part-") for p in parts)  # nothing half-written
    rerun = run_subprocess(*job("s3://bucket/images/", out, colour_checkpoint), env=env)
    assert rerun.returncode == 0, rerun.stderr
    table = read_s3_table(fs, f"{out[5:]}/labels.parquet")
    assert table["key"].is_unique
    assert_matches_local(table, reference)


def test_remote_reads_in_a_worker_overlap(monkeypatch, tmp_path):
    """A batch's object reads run concurrently, so one worker is not bound by latency."""
    from pipeline import loader, plan as planning
    from pipeline.preprocess import Preprocess
    from pipeline.sources import base
    from pipeline.storage import Store
    import pyarrow as pa

    items = pa.table({"key": [f"k{i}" for i in range(8)],
                      "path": [f"s3://bucket/k{i}.jpg" for i in range(8)]})
    plan = planning.freeze(items, Store(str(tmp_path)), shard_size=8)
    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow_read(path, max_bytes=None):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.2)
        with lock:
            in_flight[0] -= 1
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(base, "read_bytes", slow_read)
    source = base.Source(base.SourceSpec("s3://bucket/"))
    samples = loader.PlanItems(plan, source, Preprocess(), 10**8).__getitems__(list(range(8)))
    assert peak[0] == 8
    assert [s["key"] for s in samples] == [f"k{i}" for i in range(8)]
    assert all(s["error"] == "FileNotFoundError: No such file or directory" for s in samples)


def test_incremental_nights_on_a_prefix_use_the_listings_etags(s3, uploaded, colour_checkpoint,
                                                             monkeypatch):
    """Versions come with the listing: no request per object, and an unchanged night is a no-op."""
    env, fs = s3
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from pipeline import sources
    from pipeline.sources import base

    def no_per_object_requests(location):
        raise AssertionError(f"asked about {location} one by one")

    monkeypatch.setattr(base, "_remote_version", no_per_object_requests)
    items = sources.read_source(sources.SourceSpec("s3://bucket/images/"), versions=True)
    etags = {p.removeprefix("bucket/images/"): info["ETag"].strip('"')
             for p, info in fs.find("bucket/images", detail=True).items()}
    assert items["source_version"].to_pylist() == [etags[k] for k in items["key"].to_pylist()]
    out = "s3://bucket/runs/nightly"
    first = run_subprocess(*job("s3://bucket/images/", out, colour_checkpoint, "--incremental"),
                           env=env)
    assert first.returncode == 0, first.stderr
    again = run_subprocess(*job("s3://bucket/images/", out, colour_checkpoint, "--incremental"),
                           env=env)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert "0 new, 0 changed, 34 unchanged, 0 removed" in again.stderr


def test_parquet_with_image_bytes_under_a_prefix(s3, tmp_path, colour_checkpoint):
    """img2dataset's Parquet output in a bucket: the same rows as read from local disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.test_parquet_images import jpeg_bytes

    env, fs = s3
    local = tmp_path / "shards"
    local.mkdir()
    for part in range(2):
        pq.write_table(pa.table({"key": [f"{part}-{i}" for i in range(5)],
                                 "jpg": [jpeg_bytes(part * 5 + i) for i in range(5)]}),
                       local / f"{part:05d}.parquet", row_group_size=2)
    fs.put(str(local), "bucket/shards", recursive=True)
    remote = run_subprocess(*job("s3://bucket/shards/", tmp_path / "remote", colour_checkpoint,
                                 "--id-column", "key"), env=env)
    assert remote.returncode == 0, remote.stderr
    here = run_subprocess(*job(local, tmp_path / "local", colour_checkpoint,
                               "--id-column", "key"))
    assert here.returncode == 0, here.stderr
    remote_rows = read_output(tmp_path / "remote" / "labels.parquet")
    local_rows = read_output(tmp_path / "local" / "labels.parquet")
    assert remote_rows["key"].tolist() == [f"{p}-{i}" for p in range(2) for i in range(5)]
    assert remote_rows["top1_label"].tolist() == local_rows["top1_label"].tolist()
    assert remote_rows["path"][0] == "s3://bucket/shards/00000.parquet#row=0"


def test_tar_shards_under_a_prefix(s3, tmp_path, colour_checkpoint):
    """WebDataset tars in a bucket: listed as a stream, read by span; as from local disk."""
    from tests.test_tar_shards import write_tar

    env, fs = s3
    local = tmp_path / "tars"
    local.mkdir()
    write_tar(local / "00000.tar", 0, 5, without_image=3)
    write_tar(local / "00001.tar", 5, 5)
    fs.put(str(local), "bucket/tars", recursive=True)
    remote = run_subprocess(*job("s3://bucket/tars/", tmp_path / "remote", colour_checkpoint),
                            env=env)
    assert remote.returncode == 0, remote.stderr
    here = run_subprocess(*job(local, tmp_path / "local", colour_checkpoint))
    assert here.returncode == 0, here.stderr
    remote_rows = read_output(tmp_path / "remote" / "labels.parquet")
    local_rows = read_output(tmp_path / "local" / "labels.parquet")
    assert remote_rows["key"].tolist() == [f"{i:09d}" for i in range(10)]
    for column in ("status", "error", "top1_label"):
        assert remote_rows[column].equals(local_rows[column]), column  # NaN on the error row
    # bf16 on this CPU: one run in four here gave scores that differ in the third decimal
    # (cause not pinned down: the loader's batches or oneDNN's kernel choice); the labels and
    # the error row must match exactly
    assert np.allclose(remote_rows["top1_score"], local_rows["top1_score"], atol=5e-3,
                       equal_nan=True)


def test_a_prefix_is_listed_a_page_at_a_time_and_plans_as_a_manifest_of_it(
        s3, tmp_path, monkeypatch):
    """Issue 46: a prefix was listed in one call (fs.find), the whole listing held before
    the first row of the plan. Listed in pages of 100 here, the first batch comes after a
    few pages, and the plan is the one a manifest of the same objects gives."""
    import s3fs

    from pipeline import plan as planning
    from pipeline.sources import folder, listing, open_source
    from pipeline.sources.base import SourceSpec
    from pipeline.storage import Store

    env, fs = s3
    names = [f"many/{i % 7}/img_{i:05d}.jpg" for i in range(2500)]
    fs.pipe({f"bucket/{name}": b"listed, not decoded" for name in names}
            | {"bucket/many/.hidden.jpg": b"x", "bucket/many/notes.txt": b"x"})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a client for this server's endpoint
    monkeypatch.setattr(folder, "LIST_PAGE", 100)
    monkeypatch.setattr(folder, "BATCH_ROWS", 500)
    pages = []
    real_call = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        if method == "list_objects_v2" and kwargs.get("MaxKeys") == 100:  # the listing's
            pages.append(kwargs.get("ContinuationToken"))
        return await real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    batches = listing(open_source(SourceSpec("s3://bucket/many")), versions=True)
    first = next(batches)
    assert first.num_rows == 500 and len(pages) <= 6  # not the whole listing first
    listed = pa_concat([first, *batches])
    assert len(pages) == 26 and len(set(pages)) == 26  # 2,502 objects, 100 a request
    assert listed["path"].to_pylist() == sorted(f"s3://bucket/{n}" for n in names)
    assert listed["key"].to_pylist() == sorted(n.removeprefix("many/") for n in names)
    etag = fs.info(f"bucket/{names[3]}")["ETag"].strip('"')
    row = listed["key"].to_pylist().index(names[3].removeprefix("many/"))
    assert listed["source_version"][row].as_py() == etag
    assert listed["source_size"][row].as_py() == len(b"listed, not decoded")
    # the plan of the prefix and of a manifest of its objects (in another order)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"s3://bucket/{n}\n" for n in reversed(names)))
    plans = {}
    for what, location in (("prefix", "s3://bucket/many"), ("manifest", str(manifest))):
        plans[what] = planning.freeze(listing(open_source(SourceSpec(location))),
                                      Store(str(tmp_path / what)), 100, what=location)
    by_prefix = pa_concat(list(plans["prefix"].batches(["path"])))["path"].to_pylist()
    by_manifest = pa_concat(list(plans["manifest"].batches(["path"])))["path"].to_pylist()
    assert by_prefix == sorted(by_manifest) and plans["prefix"].num_shards == 25
    s3fs.S3FileSystem.clear_instance_cache()


def pa_concat(tables):
    import pyarrow as pa

    return pa.concat_tables(tables)
