"""Parquet files holding the images' bytes: img2dataset's folders, Hugging Face's Image struct."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import (FAST, REPO, colour_array, read_output, run_subprocess,
                            write_colour_images)

ROWS = 30


def jpeg_bytes(i: int) -> bytes:
    colour = ["red", "green", "blue", "grey"][i % 4]
    buffer = io.BytesIO()
    Image.fromarray(colour_array(colour, 70 + i % 9, 60, seed=500 + i)).save(buffer, "JPEG",
                                                                             quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def img2dataset_folder(tmp_path_factory):
    """As img2dataset writes it: NNNNN.parquet with key, jpg, caption; a failed download
    kept as a row whose jpg is null; _stats.json files beside."""
    folder = tmp_path_factory.mktemp("img2dataset")
    for part in range(2):
        rows = range(part * ROWS // 2, (part + 1) * ROWS // 2)
        pq.write_table(pa.table({
            "key": [f"{i:09d}" for i in rows],
            "jpg": pa.array([None if i == 7 else jpeg_bytes(i) for i in rows], pa.binary()),
            "caption": [f"photo {i}" for i in rows],
        }), folder / f"{part:05d}.parquet", row_group_size=4)
        (folder / f"{part:05d}_stats.json").write_text(json.dumps({"count": len(rows)}))
    return folder


def job(source, out, checkpoint, *extra):
    return ["run", str(source), "--out", str(out), "--model", "resnet18", "--weights",
            str(checkpoint), "--top-k", "2", "--batch-size", "4", "--workers", "0",
            "--shard-size", "6", "--quiet", *FAST, *extra]


def test_an_img2dataset_folder_is_labelled_as_its_images_are(
        cli, tmp_path, img2dataset_folder, colour_checkpoint):
    result = cli(*job(img2dataset_folder, tmp_path / "run", colour_checkpoint,
                      "--id-column", "key", "--keep-columns", "caption"))
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet").set_index("key")
    assert list(table.index) == [f"{i:09d}" for i in range(ROWS)]  # each row once, in order
    failed = table.loc["000000007"]
    assert failed["status"] == "error" and failed["error"] == "no image bytes in this row"
    assert table.loc["000000012", "caption"] == "photo 12"
    assert table.loc["000000012", "path"].endswith("00000.parquet#row=12")
    # the same images as files, labelled the usual way: the same labels and scores
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(ROWS):
        if i != 7:
            (loose / f"{i:09d}.jpg").write_bytes(jpeg_bytes(i))
    assert cli(*job(loose, tmp_path / "files", colour_checkpoint)).exit_code == 0
    files = read_output(tmp_path / "files" / "labels.parquet")
    files["key"] = files["key"].str.removesuffix(".jpg")
    files = files.set_index("key")
    ok = table[table["status"] == "ok"]
    assert ok["top1_label"].equals(files.loc[ok.index, "top1_label"])
    assert (ok["top1_score"] - files.loc[ok.index, "top1_score"]).abs().max() == 0


def test_a_hugging_face_image_column_and_keys_from_the_file(cli, tmp_path, colour_checkpoint):
    source = tmp_path / "train.parquet"
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "image": pa.array([{"bytes": jpeg_bytes(i), "path": f"{i}.jpg"} for i in range(5)],
                          image),
        "label": list(range(5)),
    }), source)
    result = cli(*job(source, tmp_path / "run", colour_checkpoint))
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert table["key"].tolist() == [f"train.parquet#{i}" for i in range(5)]
    assert set(table["status"]) == {"ok"}


def test_two_image_columns_ask_which(cli, tmp_path, colour_checkpoint):
    source = tmp_path / "two.parquet"
    pq.write_table(pa.table({"jpg": [jpeg_bytes(0)], "png": [jpeg_bytes(1)]}), source)
    refused = cli(*job(source, tmp_path / "run", colour_checkpoint))
    assert refused.exit_code == 2 and "pass --image-column" in refused.output
    chosen = cli(*job(source, tmp_path / "run", colour_checkpoint, "--image-column", "png"))
    assert chosen.exit_code == 0, chosen.output


def test_killed_mid_run_then_resumed_labels_every_row_once(tmp_path, img2dataset_folder,
                                                           colour_checkpoint):
    args = job(img2dataset_folder, tmp_path / "run", colour_checkpoint, "--id-column", "key")
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "killpoints.py"),
                             "part-after-rename", "2", *args], cwd=REPO, capture_output=True,
                            text=True)
    assert killed.returncode == -9, killed.stderr
    assert len(list((tmp_path / "run" / "parts").iterdir())) == 2
    resumed = run_subprocess(*args)
    assert resumed.returncode == 0, resumed.stderr
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert table["key"].tolist() == [f"{i:09d}" for i in range(ROWS)]


def test_incremental_nights_follow_each_files_version(cli, tmp_path, img2dataset_folder,
                                                     colour_checkpoint):
    """A file is its rows' version: a rewritten file relabels its rows, a new one adds, a
    removed one removes, and each night's table equals a from-scratch run's."""
    from tests.test_incremental import assert_equals_scratch, night

    folder, out = tmp_path / "parquet", tmp_path / "nightly"
    shutil.copytree(img2dataset_folder, folder)
    summary, _ = night(cli, folder, out, colour_checkpoint)
    assert summary["changes"] == {"new": ROWS, "changed": 0, "unchanged": 0, "removed": 0}

    # night 2: 00001 rewritten (its first image now a failed download), 00002 new, 00000 gone
    rewritten = pq.read_table(folder / "00001.parquet")
    images = rewritten["jpg"].to_pylist()
    images[0] = None
    pq.write_table(rewritten.set_column(1, "jpg", pa.array(images, pa.binary())),
                   folder / "00001.parquet")
    pq.write_table(pa.table({"key": ["new0", "new1"], "jpg": [jpeg_bytes(1), jpeg_bytes(2)]}),
                   folder / "00002.parquet")
    (folder / "00000.parquet").unlink()
    summary, _ = night(cli, folder, out, colour_checkpoint)
    half = ROWS // 2
    assert summary["changes"] == {"new": 2, "changed": half, "unchanged": 0, "removed": half}
    assert summary["labelled_now"] == half + 2
    table = read_output(out / "labels.parquet")
    assert (table["status"] == "error").sum() == 1
    assert_equals_scratch(cli, tmp_path, folder, out, colour_checkpoint, "2")


def test_a_folder_of_images_is_still_a_folder(cli, tmp_path, colour_checkpoint):
    """A Parquet file beside the images that holds no bytes (a manifest) changes nothing."""
    folder = tmp_path / "imgs"
    write_colour_images(folder, 4)
    pq.write_table(pa.table({"path": ["img_0000.jpg"]}), folder / "listing.parquet")
    result = cli(*job(folder, tmp_path / "run", colour_checkpoint))
    assert result.exit_code == 0, result.output
    assert len(read_output(tmp_path / "run" / "labels.parquet")) == 4


def test_parquet_files_are_listed_one_at_a_time_into_the_plan(img2dataset_folder):
    """Issue 46: every file's rows were listed before the plan's first; now a file at a
    time."""
    from pipeline.sources import listing, open_source
    from pipeline.sources.base import SourceSpec

    batches = listing(open_source(SourceSpec(str(img2dataset_folder))))
    first = next(batches)
    assert first["key"].to_pylist() == [f"00000.parquet#{i}" for i in range(ROWS // 2)]
    assert [t.num_rows for t in batches] == [ROWS // 2]
