"""Listing folders and reading every manifest format into (key, path, kept columns)."""

from __future__ import annotations

import errno
import json
import os
from datetime import datetime

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.errors import UsageError
from pipeline.sources import SourceSpec, read_source
from tests.conftest import FAST, colour_array, read_output


def touch(path, content=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_folder_is_listed_recursively_sorted_case_insensitive_without_hidden(tmp_path):
    for name in ["b.JPG", "a.png", "sub/c.jpeg", "sub/deeper/d.WebP", ".hidden.jpg",
                 ".cache/e.jpg", "notes.txt", "z.tiff", "saved.jfif", "sign.ppm", "canon.HIF"]:
        touch(tmp_path / name)
    (tmp_path / "dir.jpg").mkdir()  # a folder with an image's name is not an image
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")  # listed: becomes an error row
    table = read_source(SourceSpec(str(tmp_path)))
    assert table["key"].to_pylist() == ["a.png", "b.JPG", "broken.jpg", "canon.HIF",
                                        "saved.jfif", "sign.ppm", "sub/c.jpeg",
                                        "sub/deeper/d.WebP", "z.tiff"]
    assert table["path"].to_pylist()[6] == os.path.join(tmp_path, "sub/c.jpeg")


def test_files_passed_over_for_their_names_are_counted_on_stderr(tmp_path, capsys):
    for name in ["a.jpg", "clip.MOV", "sub/clip.mov", "sub/a.xmp", "LICENSE", ".DS_Store",
                 "x.json", "y.md", "z.mp4"]:
        touch(tmp_path / name)
    assert read_source(SourceSpec(str(tmp_path)))["key"].to_pylist() == ["a.jpg"]
    # the commonest first, then by name; hidden files are not counted: they are meant to hide
    assert ("label-images: passed over 7 file(s) not named as images (.mov 2, (no extension) 1, "
            ".json 1, .md 1, .mp4 1, ...); a manifest that lists them has them labelled, "
            "whatever their names") in capsys.readouterr().err
    touch(tmp_path / "images-only" / "b.png")
    touch(tmp_path / "images-only" / ".DS_Store")
    read_source(SourceSpec(str(tmp_path / "images-only")))
    assert "passed over" not in capsys.readouterr().err  # nothing to say, nothing said


def test_a_folder_that_cannot_be_listed_is_named_not_passed_over(tmp_path, monkeypatch,
                                                                  capsys):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "locked" / "b.jpg")
    real_scandir = os.scandir

    def scandir(path):  # as root may read any folder, a folder it may not read is made up
        if isinstance(path, str) and os.path.basename(path) == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert read_source(SourceSpec(str(tmp_path)))["key"].to_pylist() == ["a.jpg"]
    assert (f"label-images: cannot list {tmp_path / 'locked'} (Permission denied): the "
            "images in it, if any, are not in this run") in capsys.readouterr().err


def test_empty_folder_is_refused(tmp_path):
    touch(tmp_path / "readme.md")
    with pytest.raises(UsageError, match="no images in"):
        read_source(SourceSpec(str(tmp_path)))


def write_manifest(path, rows: list[dict]):
    suffix = path.suffix
    frame = pd.DataFrame(rows)
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl"])
def test_every_table_manifest_format(tmp_path, suffix):
    rows = [{"image_path": "imgs/a.jpg", "id": "007", "caption": "first, with comma"},
            {"image_path": "/abs/b.png", "id": "008", "caption": "second"}]
    manifest = write_manifest(tmp_path / f"m{suffix}", rows)
    table = read_source(SourceSpec(str(manifest), id_column="id", keep_columns=("caption",)))
    assert table.column_names == ["key", "path", "caption"]
    assert table["key"].to_pylist() == ["007", "008"]
    assert table["path"].to_pylist() == [str(tmp_path / "imgs/a.jpg"), "/abs/b.png"]
    assert table["caption"].to_pylist() == ["first, with comma", "second"]


def test_kept_timestamps_come_out_as_spark_reads_them(tmp_path):
    # Spark's own Parquet (INT96 timestamps), with the "open end" date Spark tables often use,
    # and ns columns: whole microseconds, and one with a finer part that must not be cut.
    taken = [datetime(2024, 5, 1, 10, 0, 0, 123456), datetime(9999, 12, 31)]
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"],
                             "taken": pa.array(taken, pa.timestamp("us"))}),
                   tmp_path / "spark.parquet", use_deprecated_int96_timestamps=True)
    table = read_source(SourceSpec(str(tmp_path / "spark.parquet"), keep_columns=("taken",)))
    assert table.schema.field("taken").type == pa.timestamp("us")
    assert table["taken"].to_pylist() == taken

    whole, fine = pd.Timestamp("2024-05-01 10:00:00.123456"), pd.Timestamp(1714557600123456789)
    pq.write_table(pa.table({"path": ["a.jpg"],
                             "whole": pa.array([whole.value], pa.int64()).cast(
                                 pa.timestamp("ns", "UTC")),
                             "fine": pa.array([fine.value], pa.int64()).cast(pa.timestamp("ns"))}),
                   tmp_path / "ns.parquet")
    table = read_source(SourceSpec(str(tmp_path / "ns.parquet"), keep_columns=("whole", "fine")))
    assert table.schema.field("whole").type == pa.timestamp("us", "UTC")
    assert table["whole"].cast(pa.int64()).to_pylist() == [whole.value // 1000]
    assert table.schema.field("fine").type == pa.timestamp("ns")
    assert table["fine"].cast(pa.int64()).to_pylist() == [fine.value]


def test_txt_manifest_is_one_path_a_line_resolved_against_root(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text("a.jpg\n\nsub/b c.png\r\ns3://bucket/x.jpg\n")
    table = read_source(SourceSpec(str(manifest), root="/data"))
    assert table["key"].to_pylist() == ["a.jpg", "sub/b c.png", "s3://bucket/x.jpg"]
    assert table["path"].to_pylist() == ["/data/a.jpg", "/data/sub/b c.png", "s3://bucket/x.jpg"]


def test_numeric_ids_from_jsonl_become_text_keys(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"path": "a.jpg", "id": 1},
                                                     {"path": "b.jpg", "id": 2}])
    table = read_source(SourceSpec(str(manifest), id_column="id"))
    assert table["key"].to_pylist() == ["1", "2"]


def test_an_id_column_not_asked_for_is_said_and_the_paths_stay_the_keys(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"path": "a.jpg", "id": 1},
                                                     {"path": "b.jpg", "id": 2}])
    table = read_source(SourceSpec(str(manifest)))
    assert table["key"].to_pylist() == ["a.jpg", "b.jpg"]
    said = capsys.readouterr().err
    assert "has a column 'id': the keys are the paths of 'path'; pass --id-column id" in said
    read_source(SourceSpec(str(manifest), id_column="id"))
    assert "has a column" not in capsys.readouterr().err


@pytest.mark.parametrize("columns, spec, message", [
    ({"a": ["x.jpg"], "b": ["y"]}, {}, "cannot tell which column"),
    ({"path": ["x.jpg"], "url": ["y"]}, {}, "several columns that could hold the paths"),
    ({"path": ["x.jpg"]}, {"path_column": "file"}, "--path-column 'file' is not a column"),
    ({"path": ["x.jpg"]}, {"id_column": "uid"}, "--id-column 'uid' is not a column"),
    ({"path": ["x.jpg"]}, {"keep_columns": ("caption",)}, "--keep-columns names caption"),
    ({"path": ["x.jpg", "x.jpg", "y.jpg"]}, {}, r"1 path\(s\) appear more than once.*'x.jpg'"),
    ({"path": ["x.jpg", ""]}, {}, "empty path"),
])
def test_bad_manifests_are_refused_with_the_reason(tmp_path, columns, spec, message):
    manifest = tmp_path / "m.csv"
    pd.DataFrame(columns).to_csv(manifest, index=False)
    with pytest.raises(UsageError, match=message):
        read_source(SourceSpec(str(manifest), **spec))


# columns only some runs write too: --embeddings, and --incremental's change stamps
@pytest.mark.parametrize("column", ["status", "embedding", "source_size"])
def test_kept_columns_named_like_ours_are_refused_before_any_work(cli, tmp_path, column):
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": ["x.jpg"], column: ["s"]}).to_csv(manifest, index=False)
    result = cli("run", manifest, "--out", tmp_path / "run", "--keep-columns", column)
    assert result.exit_code == 2 and "would clash" in result.output
    assert not (tmp_path / "run").exists()


def test_duplicates_are_allowed_when_asked(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "x.jpg"}, {"path": "x.jpg"}])
    table = read_source(SourceSpec(str(manifest), allow_duplicates=True))
    assert table.num_rows == 2


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"path\n", "is empty"),
    ("path\nfoto_\u00e9.jpg\n".encode("latin-1"), "not UTF-8"),
])
def test_empty_or_undecodable_manifests_are_refused(tmp_path, content, message):
    manifest = touch(tmp_path / "m.csv", content)
    with pytest.raises(UsageError, match=message):
        read_source(SourceSpec(str(manifest)))


def test_unknown_source_kinds_are_refused(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        read_source(SourceSpec(str(tmp_path / "missing.csv")))
    with pytest.raises(UsageError, match="neither a folder nor a manifest"):
        read_source(SourceSpec(str(touch(tmp_path / "m.xlsx"))))


def test_file_urls_name_the_files_they_percent_encode(cli, tmp_path, colour_checkpoint):
    """As Path.as_uri() writes them, as Spark lists them (file:/...), and with localhost."""
    folder = tmp_path / "my photos"
    folder.mkdir()
    names = ["with space.jpg", "100% red.jpg", "\u00e9t\u00e9.jpg", os.fsdecode(b"caf\xe9.jpg")]
    for i, name in enumerate(names):
        Image.fromarray(colour_array("red", 70, 50, seed=i)).save(folder / name)
    urls = [(folder / names[0]).as_uri(), (folder / names[1]).as_uri(),
            "file:" + (folder / names[2]).as_uri().removeprefix("file://"),  # Spark's form
            "file://localhost" + (folder / names[3]).as_uri().removeprefix("file://")]
    assert all("%" in url for url in urls)  # each one really is encoded
    manifest = write_manifest(tmp_path / "m.csv", [{"path": url} for url in urls])
    result = cli("run", manifest, "--out", tmp_path / "run", "--model", "resnet18",
                 "--weights", colour_checkpoint, "--top-k", "1", "--quiet", *FAST)
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet").set_index("key")
    assert sorted(table.index) == sorted(urls)  # keys and paths stay as the manifest wrote them
    assert (table["status"] == "ok").all(), table["error"].tolist()
    assert (table["top1_label"] == "red").all()
