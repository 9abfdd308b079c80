"""How far the scores can be trusted (issue 47): the calibration error before and after a
calibration fitted on people's answers, and the score that reaches a precision."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.review import calibration
from pipeline.review.base import REVIEW_SCHEMA
from pipeline.review.reviews import record
from tests.conftest import FAST, read_output, write_colour_images


def test_ece_platt_and_the_threshold_against_hand_figures():
    # two bins: scores 0.95 right 9 of 10 times, scores 0.55 right 3 of 10 times
    scores = np.r_[np.full(10, 0.95), np.full(10, 0.55)]
    right = np.r_[np.arange(10) < 9, np.arange(10) < 3]
    assert calibration.ece(scores, right) == pytest.approx(
        0.5 * abs(0.95 - 0.9) + 0.5 * abs(0.55 - 0.3))
    a, b = calibration.platt(scores, right)
    after = calibration.calibrated(scores, a, b)
    # fitted on these answers, each group's calibrated score is its accuracy
    assert after[0] == pytest.approx(0.9, abs=0.02) and after[-1] == pytest.approx(0.3, abs=0.02)
    assert calibration.ece(after, right) < calibration.ece(scores, right)
    # 90% precision holds for the 0.95 group alone; 60% (12 of 20) for both
    assert calibration.threshold(scores, right, 0.9) == 0.95
    assert calibration.threshold(scores, right, 0.6) == 0.55
    assert calibration.threshold(scores, right, 0.95) is None


def test_the_report_says_the_threshold_for_a_precision_and_what_it_covers(
        cli, tmp_path, colour_checkpoint):
    folder, out = tmp_path / "imgs", tmp_path / "run"
    write_colour_images(folder, 40, seed=11)
    assert cli("run", folder, "--out", out, "--model", "resnet18", "--weights",
               colour_checkpoint, "--top-k", "2", "--workers", "0", "-q",
               "--runtime", "torch", *FAST).exit_code == 0
    table = read_output(out / "labels.parquet").sort_values("top1_score", ascending=False)
    # people agree with the 24 best-scored images and correct the 16 others
    keys = list(table["key"])
    labels = [label if i < 24 else "other" for i, label in enumerate(table["top1_label"])]
    record(str(out), [pa.table({
        "key": keys, "label": labels, "reviewer": ["ann"] * 40,
        "reviewed_at": pa.nulls(40, pa.timestamp("us", tz="UTC")), "tool": ["sheet"] * 40,
        "path": pa.nulls(40, pa.string())}, schema=REVIEW_SCHEMA)])
    report = cli("report", out, "--precision", "0.9", "--html", tmp_path / "page.html")
    assert report.exit_code == 0, report.output
    line, = [x for x in report.output.splitlines() if x.startswith("scores on the 40")]
    # by hand: the lowest score whose images and all better-scored ones are 90% right
    scores = table["top1_score"].to_numpy()
    right = np.arange(40) < 24
    cut = min(s for i, s in enumerate(scores)
              if right[:i + 1].mean() >= 0.9 and (i == 39 or scores[i + 1] < s))
    share = (scores >= cut).mean()  # every ok row was reviewed here
    assert f"top-1 >= {cut:.2f}: 90% precise on the reviewed images, {share:.0%} of the " \
           "collection" in line
    before, after = (float(x) for x in line.split("(ECE) ")[1].split(" once")[0].split(", "))
    assert after < before
    page = (tmp_path / "page.html").read_text()
    assert 'id="calibration"' in page and 'class="reliability"' in page


def test_export_keeps_labels_above_a_precision_and_sends_the_rest(cli, tmp_path,
                                                                   colour_checkpoint):
    """An option keeps a label only above a precision target and marks the rest for
    review: export --precision sends the rows below the score that reaches it."""
    folder, out = tmp_path / "imgs", tmp_path / "run"
    write_colour_images(folder, 30, seed=12)
    assert cli("run", folder, "--out", out, "--model", "resnet18", "--weights",
               colour_checkpoint, "--top-k", "2", "--workers", "0", "-q",
               "--runtime", "torch", *FAST).exit_code == 0
    refused = cli("export", out, "--to", "label-studio", "--precision", "0.9", "--file",
                  tmp_path / "none.json")
    assert refused.exit_code == 2 and "needs at least 20 reviews" in refused.output
    table = read_output(out / "labels.parquet").sort_values("top1_score", ascending=False)
    keys = list(table["key"])
    labels = [label if i < 20 else "other" for i, label in enumerate(table["top1_label"])]
    record(str(out), [pa.table({
        "key": keys, "label": labels, "reviewer": ["ann"] * 30,
        "reviewed_at": pa.nulls(30, pa.timestamp("us", tz="UTC")), "tool": ["sheet"] * 30,
        "path": pa.nulls(30, pa.string())}, schema=REVIEW_SCHEMA)])
    tasks = tmp_path / "tasks.json"
    done = cli("export", out, "--to", "label-studio", "--precision", "0.9", "--margin", "0",
               "--file", tasks, "--local-files-root", folder)
    assert done.exit_code == 0, done.output
    cut = calibration.threshold(table["top1_score"].to_numpy(), np.arange(30) < 20, 0.9)
    sent = {t["data"]["key"] for t in __import__("json").loads(tasks.read_text())}
    assert sent == set(table.loc[table["top1_score"] < cut, "key"])
    assert f"labels with top-1 >= {cut:.3f} are 90% precise" in done.output
