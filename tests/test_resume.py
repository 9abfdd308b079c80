"""Killed and resumed runs label every item exactly once, with the same labels."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from pipeline import storage
from tests.conftest import REPO, read_output, write_colour_images


def job(folder, out, checkpoint, *extra):
    return ["run", str(folder), "--out", str(out), "--model", "resnet18", "--weights",
            str(checkpoint), "--top-k", "2", "--shard-size", "10", "--batch-size", "4",
            "--workers", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def images_and_reference(tmp_path_factory, colour_checkpoint):
    """120 images and the output of one uninterrupted run over them."""
    root = tmp_path_factory.mktemp("resume")
    folder = root / "imgs"
    write_colour_images(folder, 120, seed=5)
    out = root / "reference"
    done = subprocess.run([sys.executable, "-m", "pipeline", *job(folder, out, colour_checkpoint)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return folder, read_output(out / "labels.parquet")


def committed_parts(out):
    parts = out / "parts"
    return [p for p in os.listdir(parts) if p.startswith("part-")] if parts.is_dir() else []


def test_sigkill_mid_run_then_rerun_gives_every_key_once(tmp_path, colour_checkpoint,
                                                         images_and_reference):
    folder, reference = images_and_reference
    out = tmp_path / "run"
    args = [sys.executable, "-m", "pipeline", *job(folder, out, colour_checkpoint)]
    for kill_after_parts in (2, 6):  # killed twice, at different points
        process = subprocess.Popen(args, cwd=REPO, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(committed_parts(out)) < kill_after_parts and process.poll() is None:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.005)
        assert process.poll() is None, "the run finished before it could be killed"
        process.kill()
        process.wait()
        assert not (out / "labels.parquet").exists()
    finished = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    table = read_output(out / "labels.parquet")
    assert table["key"].is_unique
    assert table["key"].tolist() == reference["key"].tolist()
    assert table["top1_label"].tolist() == reference["top1_label"].tolist()
    assert table["status"].tolist() == reference["status"].tolist()
    assert [e for e in os.listdir(out) if ".tmp-" in e] == []


def test_interrupt_commits_finished_shards_and_says_how_to_resume(
        cli, tmp_path, colour_checkpoint, images_and_reference, monkeypatch):
    folder, reference = images_and_reference
    out = tmp_path / "run"
    real_writing = storage.Store.writing
    calls = []

    @contextmanager
    def commit_then_interrupt(store, name, **options):  # the seam every part passes through
        with real_writing(store, name, **options) as sink:
            yield sink
        if "parts/" in name:
            calls.append(name)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler stopping the job

    monkeypatch.setattr(storage.Store, "writing", commit_then_interrupt)
    stopped = cli(*job(folder, out, colour_checkpoint))
    assert stopped.exit_code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in stopped.output and "run the same command" in stopped.output
    committed = len(committed_parts(out))
    assert 3 <= committed < 12
    monkeypatch.setattr(storage.Store, "writing", real_writing)
    resumed = cli(*job(folder, out, colour_checkpoint))
    assert resumed.exit_code == 0, resumed.output
    summary = (out / "summary.json").read_text()
    assert f'"labelled_now": {120 - committed * 10}' in summary  # only the rest was redone
    table = read_output(out / "labels.parquet")
    assert table["key"].tolist() == reference["key"].tolist()
    assert table["top1_label"].tolist() == reference["top1_label"].tolist()


@pytest.mark.parametrize("items, expected", [(1, 16), (100, 16), (600, 38), (16_000, 1000),
                                             (15_985, 1000), (8_000, 500)])
def test_a_small_job_gets_shards_of_a_sixteenth_of_it(items, expected):
    from pipeline.plan import shard_size_for

    assert shard_size_for(items) == expected


@pytest.mark.parametrize("rows, batch, expected", [(600, 100, 38), (20_000, 3_000, 1000),
                                                   (40, 40, 16)])
def test_the_plan_sizes_its_shards_by_looking_ahead_a_bounded_way(tmp_path, rows, batch,
                                                                   expected):
    """Frozen with no shard size: the listing's count decides for a small job; a long one
    is not held past SMALL_JOB items to find out (the batches after it are never read
    early)."""
    import pyarrow as pa

    from pipeline import plan as planning
    from pipeline.storage import Store

    read = []

    def listing():
        for start in range(0, rows, batch):
            read.append(start)
            names = [f"{i:06d}.jpg" for i in range(start, min(rows, start + batch))]
            yield pa.table({"key": names, "path": names})

    batches = listing()
    if rows > planning.SMALL_JOB:  # what the look-ahead takes, and no more
        ahead, size = planning._sized_for_the_job(batches)
        assert size == 1000 and len(read) == -(-(planning.SMALL_JOB + 1) // batch)
        batches = ahead
    frozen = planning.freeze(batches, Store(str(tmp_path)), None)
    assert frozen.shard_size == expected and frozen.num_items == rows
    assert planning.load(Store(str(tmp_path))).shard_size == expected


def test_a_600_image_job_killed_mid_run_keeps_its_committed_shards_and_says_so(
        tmp_path, colour_checkpoint):
    """With the default shard size a kill used to lose the whole of a job under 1,000
    images; now its shards are a 16th of it, and the resume says what was kept."""
    folder, out = tmp_path / "imgs", tmp_path / "run"
    write_colour_images(folder, 600, seed=8)
    args = ["run", str(folder), "--out", str(out), "--model", "resnet18", "--weights",
            str(colour_checkpoint), "--top-k", "2", "--batch-size", "8", "--workers", "0",
            "--resize", "72", "--crop", "64", "--runtime", "torch"]
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "killpoints.py"),
                             "part-before-rename", "10", *args], cwd=REPO,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(committed_parts(out)) == 9  # 9 shards of 38 kept
    resumed = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 342 of 600 images were labelled and kept before; 258 to label" in \
        resumed.stderr
    table = read_output(out / "labels.parquet")
    assert table["key"].is_unique and sorted(table["key"]) == sorted(
        p.name for p in folder.iterdir())
