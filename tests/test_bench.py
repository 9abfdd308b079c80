"""`label-images bench` reports every figure (speed itself is never asserted here)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, invoke_subprocess, write_colour_images


@pytest.fixture
def cli():
    """The bench measures every runtime, OpenVINO too: in a process of its own (conftest)."""
    return invoke_subprocess


def test_bench_reports_all_stages_side_by_side(cli, tmp_path, colour_checkpoint):
    write_colour_images(tmp_path / "imgs", 24)
    report = tmp_path / "bench.json"
    # 1 worker prefetching 4 batches of 4: the loader is timed on what comes after 16
    result = cli("bench", tmp_path / "imgs", "--images", "20", "--reference-images", "4",
                 "--plan-rows", "5000", "--json", report, "--model", "resnet18", "--weights",
                 colour_checkpoint, "--workers", "1", "--batch-size", "4", "--top-k", "2",
                 "--compile", *FAST)
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    names = [f["name"] for f in figures["figures"]]
    assert names[:7] == ["PIL reference transform, 1 core", "decode + resize (ours), 1 core",
                         "loader alone", "plain loop (tutorials, fp32, 1 image)",
                         "model alone, batch 4 (the job's, compiled)",
                         f"model alone, eager, best batch ({figures['measured_best_batch']})",
                         "end to end, once the process is up"]
    # every installed runtime side by side: model alone and end to end (INT8 with NNCF;
    # 20 images leave it too few held out to be checked on, which it says)
    runtimes = figures["runtimes"]
    assert {"torch", "compile", "openvino"} <= set(runtimes)
    for name in ("torch", "compile", "openvino"):
        assert f"runtime {name}: end to end" in names
        assert runtimes[name]["model_alone"] > 0 and runtimes[name]["end_to_end"] > 0
        assert runtimes[name]["workers"] == 1  # the --workers asked for, OpenVINO's too
    assert "runtime openvino int8: refused" in names
    # auto's chooser asked with bench's own figures: the least time, once-costs included
    auto = figures["auto"]
    for count, chosen in ((auto["images"], auto["for_the_images"]),
                          (10**6, auto["for_a_million"])):
        assert chosen == min(auto["once_seconds"], key=lambda n: auto["once_seconds"][n]
                             + count / runtimes[n]["model_alone"])
    assert (f"auto, from these figures: {auto['for_the_images']} for {auto['images']} images, "
            f"{auto['for_a_million']} for a million") in result.output
    assert all(f["images_per_second"] > 0 for f in figures["figures"]
               if not f["name"].endswith("refused"))
    assert figures["images"] == 20 and figures["workers"] == 1
    assert set(figures["ratios"]) == {"decode_vs_pil_per_core", "end_to_end_vs_model",
                                      "end_to_end_vs_model_at_best_batch",
                                      "end_to_end_vs_plain_loop",
                                      "end_to_end_getting_batches"}
    assert 0 <= figures["ratios"]["end_to_end_getting_batches"] < 1
    assert figures["planning"]["rows"] == 5000 and figures["planning"]["peak_rss_mb"] > 0
    # a compile timed in fresh processes: the first on an empty kernel cache, the second
    # reusing its kernels (13 s and 5 s measured here: a warm one that did not find them
    # would take as long as the cold)
    compiled = figures["compile"]
    assert 0 < compiled["warm_seconds"] < compiled["cold_seconds"]
    assert "compile at batch 4:" in result.output
    for name in names:
        assert name in result.output
    # our crops against the reference on the decode sample (test_fidelity.py checks figures)
    assert figures["fidelity"]["compared"] == 20 and figures["fidelity"]["over_bound"] == []
    assert "our crops against the reference transform" in result.output


def test_too_few_images_for_a_stage_is_said_not_timed(cli, tmp_path, colour_checkpoint):
    """One batch is all worker start-up: the loader alone is not timed on it."""
    write_colour_images(tmp_path / "imgs", 4)
    report = tmp_path / "bench.json"
    result = cli("bench", tmp_path / "imgs", "--images", "4", "--reference-images", "2",
                 "--json", report, "--model", "resnet18", "--weights", colour_checkpoint,
                 "--workers", "0", "--batch-size", "4", "--top-k", "2", *FAST)
    assert result.exit_code == 0, result.output
    loader = next(f for f in json.loads(report.read_text())["figures"]
                  if f["name"] == "loader alone")
    assert loader["images_per_second"] == 0 and "not timed" in loader["note"]
    assert "not timed: 4 image(s) are no more than the 1 batch(es) of 4" in result.output
    # 4 images never repay a compile: not timed either, and auto's reason is said
    assert ("compile: not used by this job (not weighed: 4 images to label, fewer than the "
            "1000 a compile can repay)") in result.output


def test_the_loader_alone_on_tar_shards_loads_no_model(cli, tmp_path):
    """Any kind of source; with the default model's weights absent (offline), loading the
    model would fail: it is not loaded."""
    from tests.test_tar_shards import write_tar

    (tmp_path / "shards").mkdir()
    for n in range(2):
        write_tar(tmp_path / "shards" / f"{n:05d}.tar", 6 * n, 6, corrupt=6 * n + 1)
    report = tmp_path / "loader.json"
    result = cli("bench", tmp_path / "shards", "--loader-only", "--images", "10",
                 "--batch-size", "2", "--workers", "1", "--json", report)
    assert result.exit_code == 0, result.output
    found = json.loads(report.read_text())
    assert (found["images"], found["workers"], found["batch_size"]) == (10, 1, 2)
    loader = found["figures"][0]
    assert loader["name"] == "loader alone" and loader["images_per_second"] > 0
    assert "loader alone" in result.output and "10 images from" in result.output
    # 8 images are the 4 batches of 2 the worker has ready at its start: nothing to time
    # (decoded before the clock started, they once read as 300,000 images/s)
    few = cli("bench", tmp_path / "shards", "--loader-only", "--images", "8",
              "--batch-size", "2", "--workers", "1")
    assert few.exit_code == 0 and "not timed: 8 image(s) are no more than the 4 batch(es) " \
        "of 2" in few.output
    both = cli("bench", tmp_path / "shards", "--loader-only", "--fidelity")
    assert both.exit_code == 2 and "one at a time" in both.output
    # the crops of tar members, read as the run reads them; the two corrupt ones said
    crops = cli("bench", tmp_path / "shards", "--fidelity", "--images", "12")
    assert crops.exit_code == 0, crops.output
    assert "on 10 image(s)" in crops.output and "2 unreadable, not compared" in crops.output
    # the rest of bench opens image files: refused in one line, not timed on nothing
    whole = cli("bench", tmp_path / "shards")
    assert whole.exit_code == 2 and "--loader-only and --fidelity measure it" in whole.output
