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
