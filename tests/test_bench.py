"""`label-images bench` reports every figure (speed itself is never asserted here)."""

from __future__ import annotations

import json

from tests.conftest import FAST, write_colour_images


def test_bench_reports_all_stages_side_by_side(cli, tmp_path, colour_checkpoint):
    write_colour_images(tmp_path / "imgs", 20)
    report = tmp_path / "bench.json"
    result = cli("bench", tmp_path / "imgs", "--images", "16", "--reference-images", "4",
                 "--plan-rows", "5000", "--json", report, "--model", "resnet18", "--weights",
                 colour_checkpoint, "--workers", "1", "--batch-size", "4", "--top-k", "2", *FAST)
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    names = [f["name"] for f in figures["figures"]]
    assert names == ["PIL reference transform, 1 core", "decode + resize (ours), 1 core",
                     "loader alone", "model alone (synthetic batches)", "end to end",
                     "plain loop (tutorials, fp32, 1 image)"]
    assert all(f["images_per_second"] > 0 for f in figures["figures"])
    assert figures["images"] == 16 and figures["workers"] == 1
    assert set(figures["ratios"]) == {"decode_vs_pil_per_core", "end_to_end_vs_model",
                                      "end_to_end_vs_plain_loop",
                                      "end_to_end_getting_batches"}
    assert 0 <= figures["ratios"]["end_to_end_getting_batches"] < 1
    assert figures["planning"]["rows"] == 5000 and figures["planning"]["peak_rss_mb"] > 0
    for name in names:
        assert name in result.output
    # our crops against the reference on the decode sample (test_fidelity.py checks figures)
    assert figures["fidelity"]["compared"] == 16 and figures["fidelity"]["over_bound"] == []
    assert "our crops against the reference transform" in result.output
