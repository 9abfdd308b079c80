"""Hostile and odd input: a correct label or an error row each, never a crash or a hang."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pandas as pd
import pillow_heif
import pytest
import torch
import torchvision
from PIL import Image, features

from tests.conftest import FAST, colour_array, read_output

RED = colour_array("red", 90, 60, seed=1)


def save(path, image: Image.Image, fmt=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)


def huge_png_header(width: int, height: int) -> bytes:
    """A tiny file that claims to be width x height: a decompression bomb's calling card."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17]))
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def scan_bomb(image: Image.Image, scans: int, stray_byte: bool = False) -> bytes:
    """A progressive JPEG with `scans` extra scans of 16 bytes, each a pass over the image.

    Each is a first AC scan of the luma band 1..1 whose data is one end-of-band run over
    every block, Huffman-coded with a one-symbol table defined before them. A stray byte
    after the first segment (which libjpeg skips with a warning) hides the frame header
    from a walk over the segments.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    if stray_byte:
        after_app0 = 4 + int.from_bytes(data[4:6], "big")
        data = data[:after_app0] + b"\x00" + data[after_app0:]
    table = b"\xff\xc4\x00\x14\x11" + bytes([1] + [0] * 15) + b"\xe0"  # AC table 1: EOB14
    scan = b"\xff\xda\x00\x08\x01\x01\x01\x01\x01\x00" + b"\x7f\xff\x00\x7f\xff\x00"
    return data[:-2] + table + scan * scans + b"\xff\xd9"


def sparse_file(path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)  # no blocks written: the file system keeps a hole


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Every odd file we could think of, with what each should become."""
    root = tmp_path_factory.mktemp("zoo")
    red = Image.fromarray(RED)
    expect = {}  # key -> "red" (label), "ok" (any label), or "error"

    def add(name, outcome, writer):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
        expect[name] = outcome

    add("zero.jpg", "error", lambda p: p.write_bytes(b""))
    jpeg = io.BytesIO()
    red.save(jpeg, format="JPEG")
    add("truncated.jpg", "error", lambda p: p.write_bytes(jpeg.getvalue()[:200]))
    add("random.jpg", "error", lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)))
    add("text.png", "error", lambda p: p.write_text("hello, I am text"))
    add("broken-link.jpg", "error", lambda p: os.symlink(root / "nowhere.jpg", p))
    add("bomb.png", "error", lambda p: p.write_bytes(huge_png_header(60_000, 60_000)))
    # Not files to read whole: a pipe would wait for a writer forever, /dev/zero never ends,
    # 500 MB (sparse here) is more than any image within the run's --max-pixels can take.
    add("pipe.jpg", "error", os.mkfifo)
    add("device.jpg", "error", lambda p: os.symlink("/dev/zero", p))
    add("huge.tif", "error", lambda p: sparse_file(p, 500 * 2**20))
    # Decodes fine, given time: each scan of a progressive JPEG costs a pass over the image
    # (about 0.35 ms at 3 MP in PIL, 0.44 in simplejpeg, which tries first: 16 MB of them
    # would take some 13 minutes).
    add("scan-bomb.jpg", "error", lambda p: p.write_bytes(scan_bomb(red, 600)))
    add("scan-bomb-hidden.jpg", "error",
        lambda p: p.write_bytes(scan_bomb(red, 600, stray_byte=True)))
    add("progressive.jpg", "red", lambda p: save(p, red, progressive=True))
    add("grey.png", "ok", lambda p: save(p, red.convert("L")))
    add("palette.png", "red", lambda p: save(p, red.convert("P")))
    add("palette-transparent.gif", "red",
        lambda p: save(p, red.convert("P"), transparency=0))
    add("cmyk.jpg", "red", lambda p: save(p, red.convert("CMYK")))
    add("rgba.png", "red", lambda p: save(p, red.convert("RGBA")))
    add("sixteen-bit.png", "ok", lambda p: save(
        p, Image.fromarray((np.asarray(red.convert("L"), np.uint16) * 257))))
    add("one-pixel.png", "red", lambda p: save(p, Image.new("RGB", (1, 1), (210, 45, 40))))
    add("long-strip.png", "ok", lambda p: save(p, Image.new("RGB", (10_000, 3), (210, 45, 40))))
    frames = [red, Image.new("RGB", red.size, (40, 60, 220))]
    add("animated.gif", "red",
        lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]))
    add("photo.webp", "red", lambda p: save(p, red))
    add("photo.tiff", "red", lambda p: save(p, red))
    add("photo.bmp", "red", lambda p: save(p, red))
    if features.check("avif"):  # Pillow 11.3 and later decode AVIF themselves
        add("photo.avif", "red", lambda p: save(p, red, quality=90))
    exif = Image.Exif()
    exif[0x0112] = 6
    add("rotated.jpg", "red", lambda p: save(p, red, exif=exif.tobytes()))
    # iPhones' HEIC, upright and turned (written as iOS does, with the turn in the file)
    add("iphone.heic", "red", lambda p: pillow_heif.from_pillow(red).save(p, quality=90))
    add("rotated.heic", "red",
        lambda p: pillow_heif.from_pillow(red).save(p, quality=90, exif=exif.tobytes()))
    add("broken.heic", "error", lambda p: p.write_bytes(
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)))
    for name in ["with space.jpg", "comma,name.jpg", 'quote"name.jpg', "it's.jpg",
                 "new\nline.jpg", "n\u00e4me-\u65e5\u672c-\U0001F600.jpg"]:
        add(name, "red", lambda p: save(p, red))
    # Names that are not UTF-8 (Latin-1, from an old archive): keys show the byte as \xNN
    for raw, key in [(b"caf\xe9.jpg", "caf\\xe9.jpg"), (b"d\xfcr/bild.jpg", "d\\xfcr/bild.jpg")]:
        save(root / os.fsdecode(raw), red)
        expect[key] = "red"
    (root / "folder.jpg").mkdir()  # a directory with an image's name: not an image
    (root / "folder.jpg" / "inside.png").write_bytes(b"")
    expect["folder.jpg/inside.png"] = "error"
    return root, expect


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_every_odd_file_gets_a_label_or_an_error_row(cli, tmp_path, zoo, colour_checkpoint,
                                                     fmt):
    root, expect = zoo
    result = cli("run", root, "--out", tmp_path / "run", "--model", "resnet18", "--weights",
                 colour_checkpoint, "--top-k", "2", "--workers", "1", "--batch-size", "4",
                 "--shard-size", "5", "--max-pixels", "50000000", "--format", fmt, "--quiet",
                 *FAST)
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / f"labels.{fmt}").set_index("key")
    assert sorted(table.index) == sorted(expect)  # names round-trip unchanged
    for key, outcome in expect.items():
        row = table.loc[key]
        assert row["path"] == str(root / key)
        if outcome == "error":
            assert row["status"] == "error" and isinstance(row["error"], str), key
        else:
            assert row["status"] == "ok", (key, row["error"])
        if outcome == "red":
            assert row["top1_label"] == "red", key
    assert "--max-pixels" in table.loc["bomb.png", "error"]
    for rotated in ("rotated.jpg", "rotated.heic"):  # as displayed: 90x60 stored sideways
        assert int(table.loc[rotated, "width"]) == 60, rotated
    assert "No such file" in table.loc["broken-link.jpg", "error"]
    for special in ("pipe.jpg", "device.jpg"):
        assert "not a regular file (a pipe, socket or device)" in table.loc[special, "error"]
    assert "more than an image within --max-pixels can take" in table.loc["huge.tif", "error"]
    assert table.loc["broken.heic", "error"] == "not a readable image (unknown or corrupt format)"
    for bomb in ("scan-bomb.jpg", "scan-bomb-hidden.jpg"):
        assert "scans, over the limit of 500" in table.loc[bomb, "error"]


def test_max_pixels_is_configurable(cli, tmp_path, colour_checkpoint):
    save(tmp_path / "imgs" / "big.png", Image.fromarray(colour_array("red", 2000, 1000, 0)))
    result = cli("run", tmp_path / "imgs", "--out", tmp_path / "run", "--model", "resnet18",
                 "--weights", colour_checkpoint, "--top-k", "1", "--max-pixels", "1000000",
                 "--workers", "0", "-q", *FAST)
    assert result.exit_code == 0
    row = read_output(tmp_path / "run" / "labels.parquet").iloc[0]
    assert row["status"] == "error" and "2000x1000" in row["error"]


def test_manifest_paths_are_never_run_by_a_shell(cli, tmp_path, colour_checkpoint):
    marker = tmp_path / "pwned"
    (tmp_path / "a-folder.jpg").mkdir()
    hostile = [f"$(touch {marker})", f"`touch {marker}`", f"x.jpg; touch {marker}",
               f"| touch {marker}", "../../../../etc/passwd", "missing.jpg", "a-folder.jpg"]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": hostile}).to_csv(manifest, index=False)
    result = cli("run", manifest, "--out", tmp_path / "run", "--model", "resnet18",
                 "--weights", colour_checkpoint, "--top-k", "1", "--workers", "0", "-q", *FAST)
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert (table["status"] == "error").all() and table["key"].tolist() == hostile
    assert table["error"].iloc[-1] == "IsADirectoryError: Is a directory"
    assert not marker.exists()


@pytest.fixture(scope="module")
def resnet18_4_classes(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "four.pth"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), path)
    return path


@pytest.mark.parametrize("case", [
    "no path column", "ambiguous path column", "empty manifest", "duplicate keys",
    "unknown keep column", "not utf-8", "weights not a checkpoint", "labels do not match",
    "unknown model", "top-k too large", "unknown config key",
])
def test_bad_manifests_and_configuration_exit_2_in_one_line_before_any_work(
        cli, tmp_path, resnet18_4_classes, case):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,note\na.jpg,x\nb.jpg,y\n")
    args = {"--model": "resnet18", "--weights": str(resnet18_4_classes), "--top-k": "2"}
    extra = []
    if case == "no path column":
        manifest.write_text("a,b\nx.jpg,y\n")
    elif case == "ambiguous path column":
        manifest.write_text("path,url\nx.jpg,y\n")
    elif case == "empty manifest":
        manifest.write_text("path\n")
    elif case == "duplicate keys":
        manifest.write_text("path\na.jpg\nb.jpg\na.jpg\n")
    elif case == "unknown keep column":
        extra = ["--keep-columns", "caption"]
    elif case == "not utf-8":
        manifest.write_bytes("path\nf\u00f6to.jpg\n".encode("latin-1"))
    elif case == "weights not a checkpoint":
        (tmp_path / "w.pth").write_text("not weights")
        args["--weights"] = str(tmp_path / "w.pth")
    elif case == "labels do not match":
        (tmp_path / "labels.txt").write_text("a\nb\nc\n")
        extra = ["--labels", str(tmp_path / "labels.txt")]
    elif case == "unknown model":
        args["--model"] = "resnet5000"
    elif case == "top-k too large":
        args["--top-k"] = "5"
    elif case == "unknown config key":
        (tmp_path / "c.toml").write_text("modle = 'resnet18'\n")
        extra = ["--config", str(tmp_path / "c.toml")]
    flat = [x for pair in args.items() for x in pair]
    result = cli("run", manifest, "--out", tmp_path / "run", *flat, *extra)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("label-images: error: "), result.output
    assert not (tmp_path / "run").exists()  # refused before any work
