"""`label-images report`: terminal summary, a self-contained HTML page, a review export."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import report as reporting
from pipeline.report_page import render_html
from tests.conftest import FAST, invoke, write_colour_images

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, colour_checkpoint):
    root = tmp_path_factory.mktemp("report")
    truth = write_colour_images(root / "imgs", 24, seed=51)
    (root / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "imgs" / "empty.png").write_bytes(b"")
    result = invoke("run", root / "imgs", "--out", root / "run", "--model", "resnet18",
                    "--weights", colour_checkpoint, "--top-k", "2", "--workers", "0", "-q",
                    *FAST)
    assert result.exit_code == 0, result.output
    return root, truth


def test_terminal_summary(cli, finished_run):
    root, truth = finished_run
    result = cli("report", root / "run")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "26 images: 24 ok, 2 errors" in text
    assert "errors by kind: " in text and "empty file 1" in text
    counts = pd.Series(truth).value_counts()
    assert re.search(rf"  {counts.index[0]}\s+{counts.iloc[0]}\n", text)
    assert "top-1 confidence: " in text and "< 0.2" in text and "< 0.8" in text


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href", "srcset", "data", "action")]


def test_html_page_references_nothing_outside_itself(cli, finished_run, tmp_path):
    root, _ = finished_run
    page = tmp_path / "report.html"
    assert cli("report", root / "run", "--html", page).exit_code == 0
    text = page.read_text()
    parser = _Refs()
    parser.feed(text)
    assert parser.refs and all(ref.startswith("data:image/jpeg;base64,") for ref in parser.refs)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "url(" not in text and "@import" not in text and "//" not in re.sub(
        r"data:[^\"]+", "", text).replace("<!doctype html>", "")


def test_contact_sheet_captions_break_between_folders_never_inside_a_name():
    findings = reporting.analyse([pa.table({
        "key": ["2026/12/06/cam07/IMG_0000001234_a_rather_long_name.jpg"], "path": ["x.jpg"],
        "status": ["ok"], "error": pa.array([None], pa.string()), "top1_label": ["red"],
        "top1_score": pa.array([0.9], pa.float32())})])
    page = render_html(findings, "t")
    caption = re.search(r"<figcaption[^>]*>(.*?)<br>", page).group(1)
    assert re.sub(r"<[^>]+>", "", caption) == "2026/12/06/cam07/IMG_0000001234_a_rather_long_name.jpg"
    assert caption.count("<wbr>") == 4  # after each '/', and nowhere else
    assert '<span class="name">IMG_0000001234_a_rather_long_name.jpg</span>' in caption
    assert 'title="2026/12/06/cam07/IMG_0000001234_a_rather_long_name.jpg"' in page
    assert "anywhere" not in page and "break-all" not in page


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_html_page_renders_in_headless_chromium_with_charts_and_thumbnails(
        cli, finished_run, tmp_path):
    root, truth = finished_run
    page = tmp_path / "report.html"
    assert cli("report", root / "run", "--html", page).exit_code == 0
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    labels = re.search(r'<svg class="label-histogram".*?</svg>', dom, re.S).group(0)
    assert labels.count("<rect") == len(set(truth.values()))
    confidence = re.search(r'<svg class="confidence-histogram".*?</svg>', dom, re.S).group(0)
    assert confidence.count("<rect") == 10
    assert dom.count('<img class="thumb"') == 24  # every ok image: fewer than 8 per label
    assert dom.count('<section class="label-group">') == len(set(truth.values()))
    review = re.search(r'<table id="review">.*?</table>', dom, re.S).group(0)
    assert review.count("<tr>") == 25  # header + 24 ok rows, lowest score first
    errors = re.search(r'<table id="errors">.*?</table>', dom, re.S).group(0)
    assert "broken.jpg" in errors and "empty.png" in errors


def test_review_export_lists_low_confidence_rows_lowest_first(cli, finished_run, tmp_path):
    root, _ = finished_run
    table = pd.read_parquet(root / "run" / "labels.parquet")
    threshold = float(table["top1_score"].median())
    export = tmp_path / "review.csv"
    result = cli("report", root / "run", "--review-below", str(threshold), "--export", export)
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(export)
    expected = table[(table["status"] == "ok") & (table["top1_score"] < threshold)]
    assert sorted(rows["key"]) == sorted(expected["key"])
    assert rows["top1_score"].is_monotonic_increasing
    assert list(rows.columns) == ["key", "path", "top1_label", "top1_score"]


def _table(n: int, labels: int = 3) -> pa.Table:
    rng = np.random.default_rng(5)
    errors = rng.random(n) < 0.1
    return pa.table({
        "key": [f"k{i}" for i in range(n)], "path": [f"/p/{i}.jpg" for i in range(n)],
        "status": np.where(errors, "error", "ok").tolist(),
        "error": [f"Kind{i % 3}: broken" if e else None for i, e in enumerate(errors)],
        "top1_label": [f"class_{i % labels}" for i in range(n)],
        # ties on purpose: the lowest are kept in table order
        "top1_score": pa.array(np.round(rng.random(n), 2), pa.float32())})


def test_the_report_in_one_pass_of_batches_is_the_whole_tables(tmp_path):
    """Counts, histogram, the lowest scores and the first errors, as pandas finds them on
    the whole table; the samples drawn from each label's own rows."""
    table = _table(5_000)
    found = reporting.analyse(table.slice(i, 7).combine_chunks()
                              for i in range(0, table.num_rows, 7))
    frame = table.to_pandas()
    ok, bad = frame[frame["status"] == "ok"], frame[frame["status"] == "error"]
    assert (found.rows, found.ok, found.errors) == (5_000, len(ok), len(bad))
    assert found.labels == sorted(ok["top1_label"].value_counts().items(),
                                  key=lambda kv: (-kv[1], kv[0]))
    assert found.error_kinds == sorted(bad["error"].str.split(":").str[0].value_counts()
                                       .items(), key=lambda kv: (-kv[1], kv[0]))
    assert found.histogram == np.histogram(ok["top1_score"], bins=10, range=(0, 1))[0].tolist()
    assert found.confidence["< 0.5"] == int((ok["top1_score"] < 0.5).sum())
    lowest = ok.sort_values("top1_score", kind="stable").head(50)
    assert [r[0] for r in found.review] == lowest["key"].tolist()
    assert [r[0] for r in found.error_rows] == bad["key"].head(100).tolist()
    for label, picks in found.samples.items():
        keys = [key for key, _, _ in picks]
        assert len(keys) == len(set(keys)) == 8
        assert set(keys) <= set(ok[ok["top1_label"] == label]["key"])


def test_the_samples_are_drawn_evenly_from_the_whole_table():
    """Reservoir sampling: a row late in the table is as likely to be shown as an early one
    (a sample of the first rows only would average around the 8th)."""
    table = _table(1_000, labels=1).drop_columns(["error"]).append_column(
        "error", pa.nulls(1_000, pa.string()))
    table = table.set_column(2, "status", pa.array(["ok"] * 1_000))
    positions = [int(key[1:]) for seed in range(100)
                 for key, _, _ in reporting.analyse(
                     (table.slice(i, 10) for i in range(0, 1_000, 10)), seed=seed
                 ).samples["class_0"]]
    assert len(positions) == 800 and 450 < np.mean(positions) < 550
    assert np.histogram(positions, bins=4, range=(0, 1_000))[0].min() > 150


def test_a_huge_table_gives_a_small_page(cli, tmp_path):
    """200,000 rows and 500 labels: the page stays bounded (samples, never everything)."""
    n = 200_000
    labels = [f"class_{i % 500}" for i in range(n)]
    table = pa.table({
        "key": [f"k{i}" for i in range(n)], "path": [f"/nowhere/{i}.jpg" for i in range(n)],
        "status": ["ok"] * (n - 1000) + ["error"] * 1000,
        "error": [None] * (n - 1000) + ["OSError: gone"] * 1000,
        "top1_label": labels, "top1_score": pa.array([(i % 97) / 97 for i in range(n)],
                                                      pa.float32())})
    (tmp_path / "run").mkdir()
    pq.write_table(table, tmp_path / "run" / "labels.parquet")
    page = tmp_path / "report.html"
    assert cli("report", tmp_path / "run", "--html", page).exit_code == 0
    text = page.read_text()
    assert len(text) < 300_000
    assert text.count("<figure>") == 20 * 8 and text.count("unreadable now") == 160
    assert text.count("<tr>") == 2 + 50 + 100


def test_thumbnails_show_photos_the_way_up_their_exif_says(tmp_path):
    from pipeline.report_page import thumbnail

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated to portrait
    path = tmp_path / "sideways.jpg"
    Image.new("RGB", (400, 200), "red").save(path, exif=exif)
    uri = thumbnail(str(path))
    shown = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert shown.height > shown.width
