"""What a night changed in the labels: said when a class's share moves, silent when nothing
shifts, in summary.json and the report (issue 46)."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline import drift
from tests.conftest import colour_array, write_colour_images
from tests.test_incremental import job


def test_psi_is_zero_for_the_same_shares_and_grows_with_a_shift():
    same = drift.psi(np.array([10, 20, 70]), np.array([20, 40, 140]))
    assert same == pytest.approx(0.0, abs=1e-12)
    small = drift.psi(np.array([30, 30, 40]), np.array([28, 32, 40]))
    large = drift.psi(np.array([30, 30, 40]), np.array([10, 30, 60]))
    # by hand: sum((q - p) * ln(q / p))
    expected = (0.1 - 0.3) * np.log(0.1 / 0.3) + (0.6 - 0.4) * np.log(0.6 / 0.4)
    assert large == pytest.approx(expected) and 0 < small < 0.01 < large
    before = drift.LabelStats(Counter(a=50, b=50), np.array([0] * 9 + [100]))
    after = drift.LabelStats(Counter(a=50, c=50), np.array([0] * 9 + [100]))
    figures = drift.compare(before, after, relabelled=50, top1_changed=50, threshold=0.1)
    assert figures["appeared"] == ["c"] and figures["vanished"] == ["b"] and figures["drift"]
    assert figures["score_psi"] == 0.0


def _recolour(path, colour: str, seed: int) -> None:
    stat = os.stat(path)
    Image.fromarray(colour_array(colour, 70, 60, seed=seed)).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_a_class_whose_share_moves_is_said_and_a_night_without_a_shift_says_nothing(
        cli, tmp_path, colour_checkpoint):
    folder, out = tmp_path / "photos", tmp_path / "nightly"
    truth = write_colour_images(folder, 16, seed=3)  # 4 of each colour
    first = cli(*job(folder, out, colour_checkpoint, "--incremental"))
    assert first.exit_code == 0, first.output
    # night 2: one more of each colour: the shares stay where they were
    write_colour_images(folder / "more", 4, seed=3)
    second = cli(*job(folder, out, colour_checkpoint, "--incremental"))
    assert second.exit_code == 0, second.output
    figures = json.loads((out / "summary.json").read_text())["drift"]
    assert "labels shifted" not in second.output and not figures["drift"]
    assert figures["class_psi"] < 0.01 and figures["relabelled"] == 0
    assert {c["label"]: c["after"] for c in figures["classes"]} == {
        c: 5 for c in ("red", "green", "blue", "grey")}
    # night 3: six images turn blue (a camera that moved): blue's share jumps
    turned = [name for name in sorted(truth) if truth[name] != "blue"][:6]
    for i, name in enumerate(turned):
        _recolour(folder / name, "blue", seed=100 + i)
    third = cli(*job(folder, out, colour_checkpoint, "--incremental"))
    assert third.exit_code == 0, third.output
    said = [line for line in third.output.splitlines() if "labels shifted" in line]
    assert len(said) == 1 and "'blue' 25.0% -> 55.0%" in said[0], third.output
    figures = json.loads((out / "summary.json").read_text())["drift"]
    assert figures["drift"] and figures["class_psi"] >= 0.1
    assert figures["relabelled"] == 6 and figures["top1_changed"] == 6
    assert figures["classes"][0]["label"] == "blue"
    assert (figures["classes"][0]["before"], figures["classes"][0]["after"]) == (5, 11)
    report = cli("report", out, "--html", tmp_path / "page.html")
    assert report.exit_code == 0, report.output
    assert "since the night before: class shares PSI" in report.output
    page = (tmp_path / "page.html").read_text()
    assert "Since the night before" in page and 'class="drift-classes"' in page
    assert "blue: 25.0% (the night before)" in page and "blue: 55.0% (tonight)" in page
    # the team's threshold: the same shift under a higher one is recorded, not said
    _recolour(folder / turned[0], "red", seed=200)
    calm = cli(*job(folder, out, colour_checkpoint, "--incremental", "--drift-threshold",
                    "5"))
    assert calm.exit_code == 0 and "labels shifted" not in calm.output
