"""Many processes, one run: array-job slices plus merge, and torchrun ranks (gloo, CPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import UsageError
from pipeline.launchers import Slice, from_environment, shard_ranges
from tests.conftest import REPO, read_output, run_subprocess, write_colour_images

TORCHRUN = Path(sys.executable).with_name("torchrun")


def job(folder, out, checkpoint, *extra):
    return ["run", str(folder), "--out", str(out), "--model", "resnet18", "--weights",
            str(checkpoint), "--top-k", "2", "--shard-size", "6", "--batch-size", "4",
            "--workers", "0", "--resize", "72", "--crop", "64", "--runtime", "torch", "--quiet",
            *extra]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, colour_checkpoint):
    """50 images (one broken) and the output of one single-process run over them."""
    root = tmp_path_factory.mktemp("scale")
    folder = root / "imgs"
    write_colour_images(folder, 49, seed=21)
    (folder / "broken.png").write_bytes(b"nope")
    done = run_subprocess(*job(folder, root / "single", colour_checkpoint))
    assert done.returncode == 0, done.stderr
    return folder, read_output(root / "single" / "labels.parquet")


def assert_same_rows(out, reference):
    table = read_output(out / "labels.parquet")
    for column in ("key", "path", "status", "error", "top1_label"):
        assert table[column].tolist() == reference[column].tolist(), column
    def as_lists(column):
        return [None if labels is None else labels.tolist() for labels in column]

    assert as_lists(table["labels"]) == as_lists(reference["labels"])


def test_slices_from_flags_and_schedulers():
    assert from_environment(None, None, env={}) == Slice()
    assert from_environment(4, 1, env={}) == Slice(index=1, count=4)
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
             "SLURM_ARRAY_TASK_COUNT": "4"}
    assert from_environment(None, None, env=slurm) == Slice(index=2, count=4)
    assert from_environment(3, None, env={"JOB_COMPLETION_INDEX": "2"}) == Slice(2, 3)
    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    assert from_environment(None, None, env=torchrun) == Slice(1, 2, True, 1)
    # its share of the machine: torchrun's processes on this node
    assert from_environment(None, None, env={**torchrun, "LOCAL_WORLD_SIZE": "2"}) == Slice(
        1, 2, True, 1, per_node=2)
    with pytest.raises(UsageError, match="pass --num-slices"):
        from_environment(None, None, env={"JOB_COMPLETION_INDEX": "0"})
    with pytest.raises(UsageError, match="must be in 0..1"):
        from_environment(2, 2, env={})
    assert [s for s in range(7) if Slice(1, 3).owns(s)] == [1, 4]
    assert shard_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_a_slice_clears_only_its_own_killed_temporaries(tmp_path):
    from pipeline.rundir import RunDirectory

    parts = tmp_path / "parts"
    parts.mkdir()
    left = {shard: parts / f".part-{shard:06d}.parquet.tmp-4242-ab12cd34" for shard in range(4)}
    for path in left.values():
        path.write_bytes(b"killed mid-write")
    with RunDirectory(str(tmp_path), Slice(index=1, count=2)):
        pass
    # shards 1 and 3 are this slice's; 0 and 2 may still be being written by slice 0
    assert [shard for shard, path in left.items() if path.exists()] == [0, 2]


def test_two_slices_then_merge_equal_a_single_run(tmp_path, colour_checkpoint, single_run):
    folder, reference = single_run
    out = tmp_path / "run"
    first = run_subprocess(*job(folder, out, colour_checkpoint, "--num-slices", "2",
                                "--slice-index", "0"))
    assert first.returncode == 0, first.stderr
    assert "slice 0 of 2 done" in first.stderr and "still to come" in first.stderr
    early = run_subprocess("merge", out)
    assert early.returncode == 1
    assert "4 of 9 shards are not committed yet (1, 3, 5, 7), owned by slice(s) 1 of 2" \
        in early.stderr
    assert not (out / "labels.parquet").exists()
    # the second slice as a Slurm array task 2 of --array=1-2 would see it
    second = run_subprocess(*job(folder, out, colour_checkpoint), env={
        "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2"})
    assert second.returncode == 0, second.stderr
    assert "all shards are committed" in second.stderr
    merged = run_subprocess("merge", out)
    assert merged.returncode == 0, merged.stderr
    assert_same_rows(out, reference)
    assert not (out / "parts").exists()


def test_a_slice_starting_after_the_source_grew_labels_the_frozen_plan(
        tmp_path, colour_checkpoint, single_run):
    """An array over a folder that gains a file between two tasks: the later task labels
    the plan the first one froze (it lists nothing), and the table is the first listing's."""
    source, reference = single_run
    folder = tmp_path / "imgs"
    shutil.copytree(source, folder)
    out = tmp_path / "run"
    # the old names of the flags, still taken
    first = run_subprocess(*job(folder, out, colour_checkpoint, "--num-shards", "2",
                                "--shard-index", "0"))
    assert first.returncode == 0, first.stderr
    write_colour_images(folder / "arrived-later", 1)
    second = run_subprocess(*job(folder, out, colour_checkpoint, "--num-slices", "2",
                                 "--slice-index", "1"))
    assert second.returncode == 0, second.stderr
    assert run_subprocess("merge", out).returncode == 0
    table = read_output(out / "labels.parquet")  # without the new file: it waits
    assert table["key"].tolist() == reference["key"].tolist()
    assert table["top1_label"].tolist() == reference["top1_label"].tolist()
    shutil.copytree(folder, tmp_path / "elsewhere")
    moved = run_subprocess(*job(tmp_path / "elsewhere", out, colour_checkpoint,
                                "--num-slices", "2", "--slice-index", "1"))
    assert moved.returncode == 2 and "source.location" in moved.stderr


def test_overwrite_is_refused_for_a_slice(tmp_path, colour_checkpoint, single_run):
    folder, _ = single_run
    refused = run_subprocess(*job(folder, tmp_path / "run", colour_checkpoint, "--num-slices",
                                  "2", "--slice-index", "1", "--overwrite"))
    assert refused.returncode == 2 and "each slice wipe" in refused.stderr


def torchrun(out, folder, checkpoint, **kwargs):
    return [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 500),
            "-m", "pipeline", *job(folder, out, checkpoint)]


def test_torchrun_two_ranks_equal_a_single_run(tmp_path, colour_checkpoint, single_run):
    folder, reference = single_run
    out = tmp_path / "run"
    done = subprocess.run(torchrun(out, folder, colour_checkpoint), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 of 2 done" in done.stderr
    assert_same_rows(out, reference)


def test_killing_one_rank_then_rerunning_the_whole_job(tmp_path, colour_checkpoint,
                                                       single_run):
    folder, reference = single_run
    out = tmp_path / "run"
    # rank 1 dies right after committing its second part; torchrun then stops rank 0
    command = torchrun(out, folder, colour_checkpoint)
    at = command.index("-m")
    killed = subprocess.run(command[:at] + [str(REPO / "tests" / "killpoints.py"),
                                            "part-after-rename", "2"] + command[at + 2:],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KILL_RANK": "1"})
    assert killed.returncode != 0
    assert not (out / "labels.parquet").exists()
    assert 2 <= len(os.listdir(out / "parts")) < 9
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_rows(out, reference)
