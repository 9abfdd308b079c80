"""WebDataset tar shards: img2dataset's tars, samples without images, truncated tars."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import FAST, REPO, read_output, run_subprocess
from tests.test_parquet_images import jpeg_bytes

PER_TAR = 6


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_tar(path, first: int, count: int, *, without_image: int | None = None,
              corrupt: int | None = None) -> None:
    """As img2dataset writes a shard: NNNNNNNNN.jpg, .json and .txt per sample."""
    with tarfile.open(path, "w") as archive:
        for i in range(first, first + count):
            key = f"{i:09d}"
            if i != without_image:
                add(archive, f"{key}.jpg", b"\xff\xd8\xff garbage" if i == corrupt
                    else jpeg_bytes(i))
            add(archive, f"{key}.json", json.dumps({"key": key}).encode())
            add(archive, f"{key}.txt", f"caption {i}".encode())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_tar(folder / "00000.tar", 0, PER_TAR, without_image=2)
    write_tar(folder / "00001.tar", PER_TAR, PER_TAR, corrupt=PER_TAR + 1)
    return folder


def job(source, out, checkpoint, *extra):
    return ["run", str(source), "--out", str(out), "--model", "resnet18", "--weights",
            str(checkpoint), "--top-k", "2", "--batch-size", "4", "--workers", "0",
            "--shard-size", "5", "--quiet", *FAST, *extra]


def test_img2dataset_tars_are_labelled_as_their_images_are(cli, tmp_path, shards,
                                                           colour_checkpoint):
    result = cli(*job(shards, tmp_path / "run", colour_checkpoint))
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet").set_index("key")
    assert list(table.index) == [f"{i:09d}" for i in range(2 * PER_TAR)]  # once, in order
    assert table.loc["000000002", "error"] == "no image in this sample (members: json, txt)"
    assert table.loc[f"{PER_TAR + 1:09d}", "status"] == "error"  # a corrupt image member
    assert table.loc["000000004", "path"].split("#")[1].startswith("000000004.jpg@")
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in (0, 1, 3, 4, 5, PER_TAR, PER_TAR + 2):
        (loose / f"{i:09d}.jpg").write_bytes(jpeg_bytes(i))
    assert cli(*job(loose, tmp_path / "files", colour_checkpoint)).exit_code == 0
    files = read_output(tmp_path / "files" / "labels.parquet")
    files = files.set_index(files["key"].str.removesuffix(".jpg"))
    for key in files.index:
        assert table.loc[key, "top1_label"] == files.loc[key, "top1_label"]
        assert table.loc[key, "top1_score"] == files.loc[key, "top1_score"]


def test_a_truncated_tar_labels_what_it_holds_and_names_the_rest(cli, tmp_path,
                                                                 colour_checkpoint):
    whole = tmp_path / "whole.tar"
    write_tar(whole, 0, PER_TAR)
    cut = tmp_path / "shards" / "cut.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    result = cli(*job(cut.parent, tmp_path / "run", colour_checkpoint))
    assert result.exit_code == 0, result.output
    assert "is truncated or damaged after" in result.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert table["key"].iloc[-1] == "cut.tar#unreadable"
    assert table["status"].iloc[-1] == "error"
    assert (table["status"] == "ok").sum() >= 1


def test_killed_mid_run_then_resumed_labels_every_sample_once(tmp_path, shards,
                                                              colour_checkpoint):
    args = job(shards, tmp_path / "run", colour_checkpoint)
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "killpoints.py"),
                             "part-after-rename", "1", *args], cwd=REPO, capture_output=True,
                            text=True)
    assert killed.returncode == -9, killed.stderr
    resumed = run_subprocess(*args)
    assert resumed.returncode == 0, resumed.stderr
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert table["key"].tolist() == [f"{i:09d}" for i in range(2 * PER_TAR)]


def test_incremental_nights_follow_each_tars_version(cli, tmp_path, colour_checkpoint):
    """A tar is a sample's version: a rewritten tar relabels its samples, a new one adds,
    a removed one removes, and each night's table equals a from-scratch run's."""
    from tests.test_incremental import assert_equals_scratch, night

    folder, out = tmp_path / "shards", tmp_path / "nightly"
    folder.mkdir()
    write_tar(folder / "00000.tar", 0, PER_TAR)
    write_tar(folder / "00001.tar", PER_TAR, PER_TAR)
    summary, _ = night(cli, folder, out, colour_checkpoint)
    assert summary["changes"] == {"new": 12, "changed": 0, "unchanged": 0, "removed": 0}

    # night 2: 00001 rewritten (one image now corrupt), 00002 new, 00000 gone
    before = (folder / "00001.tar").stat()
    write_tar(folder / "00001.tar", PER_TAR, PER_TAR, corrupt=PER_TAR + 3)
    os.utime(folder / "00001.tar", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    write_tar(folder / "00002.tar", 2 * PER_TAR, PER_TAR)
    (folder / "00000.tar").unlink()
    summary, _ = night(cli, folder, out, colour_checkpoint)
    assert summary["changes"] == {"new": 6, "changed": 6, "unchanged": 0, "removed": 6}
    assert summary["labelled_now"] == 12
    table = read_output(out / "labels.parquet").set_index("key")
    assert table.loc[f"{PER_TAR + 3:09d}", "status"] == "error"
    assert_equals_scratch(cli, tmp_path, folder, out, colour_checkpoint, "2")

    result = cli(*job(folder, out, colour_checkpoint, "--incremental"))
    assert result.exit_code == 0 and "0 new, 0 changed, 12 unchanged, 0 removed" in result.output


def test_a_key_in_two_tars_is_refused(cli, tmp_path, colour_checkpoint):
    folder = tmp_path / "dupes"
    folder.mkdir()
    write_tar(folder / "a.tar", 0, 2)
    write_tar(folder / "b.tar", 1, 2)
    result = cli(*job(folder, tmp_path / "run", colour_checkpoint))
    assert result.exit_code == 2 and "appear more than once" in result.output


def test_a_brace_pattern_names_the_tars_and_a_missing_one_is_an_error_row(
        cli, tmp_path, shards, colour_checkpoint):
    pattern = f"{shards}/{{00000..00002}}.tar"  # 00002.tar does not exist
    result = cli(*job(pattern, tmp_path / "run", colour_checkpoint))
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert table["key"].tolist() == [f"{i:09d}" for i in range(2 * PER_TAR)] + [
        "00002.tar#unreadable"]
    assert table["status"].iloc[-1] == "error"


def test_kept_columns_come_from_the_samples_txt_cls_and_json(cli, tmp_path, colour_checkpoint):
    folder = tmp_path / "kept"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as archive:
        for i in range(3):
            key = f"{i:09d}"
            add(archive, f"{key}.jpg", jpeg_bytes(i))
            add(archive, f"{key}.txt", f"a photo {i}\n".encode())
            add(archive, f"{key}.cls", str(i % 2).encode())
            add(archive, f"{key}.json", json.dumps(
                {"url": f"http://example.invalid/{i}.jpg", "original_width": 70 + i}).encode())
    result = cli(*job(folder, tmp_path / "run", colour_checkpoint,
                      "--keep-columns", "txt,cls,url,original_width,absent"))
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert table["txt"].tolist() == [f"a photo {i}" for i in range(3)]
    assert table["cls"].tolist() == ["0", "1", "0"]
    assert table["url"].tolist() == [f"http://example.invalid/{i}.jpg" for i in range(3)]
    assert table["original_width"].tolist() == ["70", "71", "72"]
    assert table["absent"].isna().all()


def test_tars_are_listed_one_at_a_time_into_the_plan(shards, monkeypatch):
    """Issue 46: every tar was read before the plan's first row; now a tar's samples are a
    batch, so a collection of thousands of shards plans as it is read."""
    from pipeline.sources import listing, open_source, tar_shards
    from pipeline.sources.base import SourceSpec

    read = []
    real_samples = tar_shards._samples
    monkeypatch.setattr(tar_shards, "_samples",
                        lambda tar, *a: read.append(tar) or real_samples(tar, *a))
    batches = listing(open_source(SourceSpec(str(shards))))
    first = next(batches)
    assert len(read) == 1 and first.num_rows == PER_TAR  # the first tar only, so far
    rest = list(batches)
    assert len(read) == 2 and [t.num_rows for t in rest] == [PER_TAR]
