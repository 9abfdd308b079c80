"""An S3 Inventory report as the source, on a real S3 API (moto's server on 127.0.0.1): the
report's manifest.json and its CSV.gz or Parquet files, as the store writes them."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import urllib.parse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import read_output, run_subprocess, write_colour_images
from tests.test_object_storage import job, s3  # noqa: F401 (the moto server fixture)

CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag"


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory):  # noqa: F811
    """Photos in s3://photos-src (names with spaces, a plus and a per cent sign), and the
    same folder here."""
    env, fs = s3
    folder = tmp_path_factory.mktemp("inventory") / "photos"
    write_colour_images(folder, 6, seed=61)
    names = sorted(p.name for p in folder.iterdir())
    (folder / names[0]).rename(folder / f"a b+{names[0]}")
    (folder / names[1]).rename(folder / f"50% off+more {names[1]}")
    (folder / "notes.txt").write_text("not an image")
    fs.mkdir("photos-src")
    fs.mkdir("inventory")
    for path in folder.iterdir():
        fs.put(str(path), f"photos-src/2026/{path.name}")
    return folder


def rows(fs, extra=()):
    """The report's rows for what is in the bucket now, plus `extra` rows."""
    found = []
    for path, info in sorted(fs.find("photos-src", detail=True).items()):
        key = path.split("/", 1)[1]
        found.append({"key": key, "version_id": "v1", "is_latest": True,
                      "is_delete_marker": False, "size": info["size"],
                      "e_tag": info["ETag"].strip('"')})
    return found + list(extra)


def write_report(fs, report_rows, form: str, date: str, config: str = "daily") -> str:
    """manifest.json and one data file, where and as S3 Inventory writes them."""
    folder = f"inventory/photos-src/{config}/{date}"
    if form == "CSV":
        text = io.StringIO()
        writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
        for row in report_rows:  # CSV reports URL-encode the keys, a space as "+"
            writer.writerow(["photos-src", urllib.parse.quote_plus(row["key"], safe="/"),
                             row["version_id"],
                             str(row["is_latest"]).lower(), str(row["is_delete_marker"]).lower(),
                             row["size"], "2026-12-05T10:00:00.000Z", row["e_tag"]])
        data, name, schema = gzip.compress(text.getvalue().encode()), "data/r1.csv.gz", \
            CSV_SCHEMA
    else:
        table = pa.Table.from_pylist([{"bucket": "photos-src", **row} for row in report_rows])
        sink = io.BytesIO()
        pq.write_table(table, sink)
        data, name = sink.getvalue(), "data/r1.parquet"
        schema = ("message s3.inventory { required binary bucket (UTF8); required binary key "
                  "(UTF8); optional binary version_id (UTF8); optional boolean is_latest; "
                  "optional boolean is_delete_marker; optional int64 size; optional binary "
                  "e_tag (UTF8);}")
    key = f"{folder}/{name}"
    fs.pipe(f"inventory/{key}", data)
    manifest = {"sourceBucket": "photos-src", "destinationBucket": "arn:aws:s3:::inventory",
                "version": "2016-11-30", "creationTimestamp": "1765000000000",
                "fileFormat": form, "fileSchema": schema,
                "files": [{"key": key, "size": len(data),
                           "MD5checksum": hashlib.md5(data).hexdigest()}]}
    fs.pipe(f"inventory/{folder}/manifest.json", json.dumps(manifest).encode())
    return f"s3://inventory/{folder}/manifest.json"


def labels(table):
    return dict(zip(table["key"], table["top1_label"]))


@pytest.mark.parametrize("form", ["CSV", "Parquet"])
def test_an_inventory_lists_the_bucket_as_its_objects_are_now(s3, bucket, colour_checkpoint,  # noqa: F811
                                                              tmp_path, form):
    env, fs = s3
    gone = {"key": "2026/deleted.jpg", "version_id": "v2", "is_latest": True,
            "is_delete_marker": True, "size": 0, "e_tag": ""}
    older = {**rows(fs)[0], "version_id": "v0", "is_latest": False, "e_tag": "old"}
    manifest = write_report(fs, rows(fs, [gone, older]), form, "2026-12-06T01-00Z",
                            config=f"by-hand-{form}")
    done = run_subprocess(*job(manifest, tmp_path / "run", colour_checkpoint), env=env)
    assert done.returncode == 0, done.stderr
    assert "passed over 1 file(s) not named as images (.txt 1)" in done.stderr
    table = read_output(tmp_path / "run" / "labels.parquet")
    local = run_subprocess(*job(bucket, tmp_path / "local", colour_checkpoint))
    assert local.returncode == 0, local.stderr
    reference = read_output(tmp_path / "local" / "labels.parquet")
    # each current object once, keys decoded, read from the source bucket
    assert sorted(table["key"]) == sorted(f"2026/{k}" for k in reference["key"])
    assert all(p == f"s3://photos-src/{k}" for k, p in zip(table["key"], table["path"]))
    assert labels(table) == {f"2026/{k}": v for k, v in labels(reference).items()}


def test_a_night_takes_sizes_and_etags_from_the_inventory_not_the_store(
        s3, bucket, colour_checkpoint, tmp_path):  # noqa: F811
    env, fs = s3
    report = rows(fs)
    write_report(fs, report, "CSV", "2026-12-06T01-00Z")
    # each night names the configuration's folder: its newest report is the listing
    night = job("s3://inventory/inventory/photos-src/daily/", tmp_path / "run",
                colour_checkpoint, "--incremental")
    first = run_subprocess(*night, env=env)
    assert first.returncode == 0, first.stderr
    images = [r for r in report if not r["key"].endswith(".txt")]
    # tonight: one object rewritten (its ETag in the report changes), one removed from the
    # report; and one unchanged object deleted from the bucket without the report knowing:
    # a night that asked the store would see it changed, one that trusts the report does not
    changed, removed, untouched = images[1], images[2], images[3]
    tonight = [dict(r, e_tag="0" * 32) if r is changed else r for r in report if r is not removed]
    fs.rm(f"photos-src/{untouched['key']}")
    write_report(fs, tonight, "CSV", "2026-12-07T01-00Z")
    second = run_subprocess(*night, env=env)
    assert second.returncode == 0, second.stderr
    assert "the newest inventory report in s3://inventory/inventory/photos-src/daily/: " \
           "2026-12-07T01-00Z" in second.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["changes"] == {"new": 0, "changed": 1, "unchanged": len(images) - 2,
                                  "removed": 1}
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert sorted(table["key"]) == sorted(r["key"] for r in images if r is not removed)
    assert table.set_index("key").loc[changed["key"], "source_version"] == "0" * 32
