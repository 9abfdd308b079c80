"""Kill anywhere, stop on signals, fail while writing: every key exactly once afterwards.

The long series is marked `slow`: `make test` runs it, `make test-quick` leaves it out.
Each trial prints its seed; replay one with
KILL_SEED=<seed> pytest -m slow "tests/test_crash.py::test_kill_series[0]".
"""

from __future__ import annotations

import errno
import faulthandler
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pyarrow.parquet as pq
import pytest
import torch

from pipeline import loader, recovery, storage
from pipeline.classifier import Classifier
from tests.conftest import REPO, own_mount_namespace, read_output, write_colour_images

IMAGES = 200
SHARD = 10
KILL_POINTS = ["time", "part-mid-write", "part-before-rename", "part-after-rename",
               "merge-mid-write", "merge-after-rename"]


def fail_at_the_storage_seam(monkeypatch, fault) -> None:
    """Every file the run commits goes through Store.writing: `fault(store, name)` may raise
    there, before anything of that file is written."""
    real_writing = storage.Store.writing

    @contextmanager
    def writing(store, name, **options):
        fault(store, name)
        with real_writing(store, name, **options) as sink:
            yield sink

    monkeypatch.setattr(storage.Store, "writing", writing)


def job(folder, out, checkpoint):
    return ["run", str(folder), "--out", str(out), "--model", "resnet18", "--weights",
            str(checkpoint), "--top-k", "2", "--shard-size", str(SHARD), "--batch-size", "8",
            "--workers", "1", "--resize", "72", "--crop", "64", "--quiet"]


def without_workers(args):
    """The job with the default loader workers instead of one."""
    at = args.index("--workers")
    return args[:at] + args[at + 2:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, colour_checkpoint):
    """A few hundred images (some broken) and the output of one uninterrupted run."""
    root = tmp_path_factory.mktemp("crash")
    folder = root / "imgs"
    write_colour_images(folder, IMAGES - 2, seed=11)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (folder / "empty.png").write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "pipeline",
                           *job(folder, root / "reference", colour_checkpoint)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return folder, read_output(root / "reference" / "labels.parquet")


def assert_same_as_reference(out, reference_table):
    table = read_output(out / "labels.parquet")
    assert table["key"].is_unique and len(table) == IMAGES
    for column in ("key", "status", "error", "top1_label"):
        assert table[column].tolist() == reference_table[column].tolist(), column
    visible = [name for name in os.listdir(out) if not name.startswith(".")]
    assert sorted(visible) == ["labels.parquet", "plan", "plan.json", "run.json", "summary.json"]
    assert [n for n in os.listdir(out) if ".tmp-" in n] == []


def fails_with(cli, args, code, *messages):
    """The run under an injected fault: this exit code, these words, one line."""
    failed = cli(*args)
    assert failed.exit_code == code, failed.output
    for message in messages:
        assert message in failed.output
    assert len(failed.output.strip().splitlines()) == 1, failed.output
    return failed


def resumes_to_reference(cli, args, out, reference_table):
    """Once the fault is lifted, the same command finishes the job exactly once."""
    resumed = cli(*args)
    assert resumed.exit_code == 0, resumed.output
    assert_same_as_reference(out, reference_table)


def count_parts(out):
    parts = out / "parts"
    return sum(n.startswith("part-") for n in os.listdir(parts)) if parts.is_dir() else 0


def kill_once(rng, folder, out, checkpoint):
    """One run killed at a random moment: a random time, or a random exact point."""
    point = rng.choice(KILL_POINTS)
    args = job(folder, out, checkpoint)
    if point == "time":
        process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO,
                                   stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 8.0))  # from start-up through loading to merging
        process.kill()
        process.wait()
        return point
    shards_left = IMAGES // SHARD - count_parts(out)
    nth = 1 if point.startswith("merge") else rng.randint(1, max(1, shards_left))
    subprocess.run([sys.executable, str(REPO / "tests" / "killpoints.py"), point, str(nth),
                    *args], cwd=REPO, capture_output=True)
    return f"{point}#{nth}"


def kill_trial(seed, folder, out, checkpoint, reference_table):
    rng = random.Random(seed)
    print(f"kill trial seed={seed}", flush=True)
    kills = [kill_once(rng, folder, out, checkpoint) for _ in range(rng.randint(1, 3))]
    print(f"  killed at: {', '.join(kills)}", flush=True)
    final = subprocess.run([sys.executable, "-m", "pipeline", *job(folder, out, checkpoint)],
                           cwd=REPO, capture_output=True, text=True)
    assert final.returncode == 0, f"seed {seed}: {final.stderr}"
    assert_same_as_reference(out, reference_table)


def test_killed_at_every_kind_of_moment_then_rerun(tmp_path, colour_checkpoint, reference):
    """The default suite: one trial per exact kill point, so each is exercised every run."""
    folder, reference_table = reference
    for point in KILL_POINTS[1:]:
        out = tmp_path / point
        done = subprocess.run([sys.executable, str(REPO / "tests" / "killpoints.py"), point,
                               "3" if point.startswith("part") else "1",
                               *job(folder, out, colour_checkpoint)], cwd=REPO,
                              capture_output=True, text=True)
        assert done.returncode == -signal.SIGKILL, (point, done.stderr)
        rerun = subprocess.run([sys.executable, "-m", "pipeline", *job(folder, out,
                                                                        colour_checkpoint)],
                               cwd=REPO, capture_output=True, text=True)
        assert rerun.returncode == 0, (point, rerun.stderr)
        # a kill is said as one (no crash, nothing quarantined), unless nothing was left to do
        said = "did not finish (it was stopped without warning" in rerun.stderr
        assert said == (point != "merge-after-rename"), (point, rerun.stderr)
        assert "crashed" not in rerun.stderr and not (out / "quarantine.json").exists()
        assert_same_as_reference(out, reference_table)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(30))
def test_kill_series(tmp_path, colour_checkpoint, reference, trial):
    base = int(os.environ.get("KILL_SEED", "20261123"))
    folder, reference_table = reference
    kill_trial(base + trial, folder, tmp_path / "run", colour_checkpoint, reference_table)


def as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum, group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM", "ctrl-c"])
def test_signals_stop_promptly_commit_nothing_half_written_and_say_how_to_resume(
        tmp_path, colour_checkpoint, reference, signum, group):
    folder, reference_table = reference
    out = tmp_path / "run"
    args = [sys.executable, "-m", "pipeline", *job(folder, out, colour_checkpoint)]
    # Ctrl-C in a terminal reaches the whole process group, workers included. The job
    # starts as from a terminal: a suite run in the background of a non-interactive shell
    # (`make test &`, nohup) ignores SIGINT, and its children would inherit that.
    process = subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=as_from_a_terminal)
    deadline = time.monotonic() + 120
    while count_parts(out) < 2 and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert process.poll() is None, "finished before the signal"
    sent = time.monotonic()
    (os.killpg if group else os.kill)(process.pid, signum)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 15, "did not stop promptly"
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in stderr
    assert "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    for part in (out / "parts").iterdir():  # whatever is committed is whole
        assert part.name.startswith("part-") and pq.read_metadata(part).num_rows == SHARD
    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_as_reference(out, reference_table)


# A loader worker after its set-up, handing a batch's memory to a parent that hangs up
# mid-handover (the parent's Ctrl-C landing there), then failing in a way of its own.
HUNG_UP_HANDOVER = """
import os, socket, sys, time
from multiprocessing import resource_sharer
from pipeline.loader import init_worker
init_worker()
shared = resource_sharer.DupFd(os.pipe()[0])  # what torch does to send a batch's memory
address, _ = shared._id
parent = socket.socket(socket.AF_UNIX)
parent.connect(address)
time.sleep(0.2)  # the worker has sent its challenge, which the parent never reads
parent.close()
time.sleep(0.5)
sys.excepthook(ValueError, ValueError("a worker's own error"), None)
"""


def test_ctrl_c_during_a_batch_handover_prints_no_worker_traceback():
    done = subprocess.run([sys.executable, "-c", HUNG_UP_HANDOVER], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Connection reset" not in done.stderr and "Traceback" not in done.stderr
    assert "ValueError: a worker's own error" in done.stderr  # other errors still shown


def test_a_signal_landing_inside_logging_leaves_its_lock_to_the_other_threads(
        cli, tmp_path, colour_checkpoint, reference, monkeypatch):
    """SIGTERM's exception between logging's lock and its try (Python 3.11, 3.12): the run
    still stops in one line, and a thread that logs afterwards (s3fs's I/O) does not hang."""
    folder, _ = reference

    def interrupted_inside_logging(*args, **kwargs):
        logging._lock.acquire()  # where logging's own call would have let go of it
        raise KeyboardInterrupt(signal.SIGTERM)

    monkeypatch.setattr(Classifier, "submit", interrupted_inside_logging)
    try:
        fails_with(cli, job(folder, tmp_path / "run", colour_checkpoint), 128 + signal.SIGTERM,
                   "stopped by SIGTERM")
        # a logger made for the first time, as any library's first log line does, takes the lock
        other = threading.Thread(target=logging.getLogger, args=[f"after-{tmp_path.name}"])
        other.start()
        other.join(timeout=10)
        assert not other.is_alive(), "logging's lock is still held: a thread that logs hangs"
    finally:
        while logging._lock._is_owned():  # the rest of the session must not hang either
            logging._lock.release()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_write_failure_exits_1_keeps_committed_shards_and_rerun_finishes(
        cli, tmp_path, colour_checkpoint, reference, monkeypatch, code):
    folder, reference_table = reference
    out = tmp_path / "run"
    calls = []

    def fourth_part_fails(store, name):
        if "parts/" in name:
            calls.append(name)
            if len(calls) == 4:
                raise OSError(code, os.strerror(code), store.url(name))

    fail_at_the_storage_seam(monkeypatch, fourth_part_fails)
    args = job(folder, out, colour_checkpoint)
    fails_with(cli, args, 1, os.strerror(code), "run the same command to resume")
    committed = sorted((out / "parts").iterdir())
    assert len(committed) >= 3
    for part in committed:
        assert pq.read_metadata(part).num_rows == SHARD
    monkeypatch.undo()
    resumes_to_reference(cli, args, out, reference_table)


def test_disk_full_while_merging_keeps_every_part(cli, tmp_path, colour_checkpoint, reference,
                                                  monkeypatch):
    folder, reference_table = reference
    out = tmp_path / "run"

    def full_disk(store, name):
        if name.startswith("labels."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fail_at_the_storage_seam(monkeypatch, full_disk)
    args = job(folder, out, colour_checkpoint)
    fails_with(cli, args, 1, "No space left on device")
    assert count_parts(out) == IMAGES // SHARD
    monkeypatch.undo()
    resumes_to_reference(cli, args, out, reference_table)


def killing_decode(out, marker, times: int):
    """decode, except that once two parts are committed the decoding worker is SIGKILLed
    (as the OOM killer does), `times` times in all (counted in a file: workers are forked)."""
    real_decode = loader.decode

    def decode_then_die(data, *args, **kwargs):
        kills = int(marker.read_text()) if marker.exists() else 0
        in_a_worker = torch.utils.data.get_worker_info() is not None  # not the crash probe
        if kills < times and in_a_worker and count_parts(out) >= 2:
            marker.write_text(str(kills + 1))
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process, not the test
        return real_decode(data, *args, **kwargs)

    return decode_then_die


def test_a_worker_killed_from_outside_restarts_the_loader_and_the_run_finishes(
        cli, tmp_path, colour_checkpoint, reference, monkeypatch):
    folder, reference_table = reference
    out, marker = tmp_path / "run", tmp_path / "kills"
    monkeypatch.setattr(loader, "decode", killing_decode(out, marker, times=1))
    done = cli(*job(folder, out, colour_checkpoint))
    assert done.exit_code == 0, done.output
    assert marker.read_text() == "1"
    assert "a loader worker died" in done.output and "restarting the loader (1 of 3)" in done.output
    assert_same_as_reference(out, reference_table)
    assert not (out / "quarantine.json").exists()  # no file was blamed


def test_a_worker_killed_again_and_again_ends_the_run_with_a_message_and_rerun_resumes(
        cli, tmp_path, colour_checkpoint, reference, monkeypatch):
    folder, reference_table = reference
    out, marker = tmp_path / "run", tmp_path / "kills"
    monkeypatch.setattr(loader, "decode", killing_decode(out, marker, times=4))
    args = job(folder, out, colour_checkpoint)
    failed = cli(*args)
    assert failed.exit_code == 1, failed.output
    *restarts, last = failed.output.strip().splitlines()
    assert [line.split("restarting the loader ")[1][:6] for line in restarts] == [
        "(1 of ", "(2 of ", "(3 of "]
    assert last.startswith("label-images: error: a loader worker died")
    assert marker.read_text() == "4"  # the first kill and three restarts
    monkeypatch.undo()
    resumes_to_reference(cli, args, out, reference_table)


CRASHER = "img_0122.jpg"  # past the first shards, so that some are committed before it


def segfault_on(poison: bytes, decode):
    """decode, except that the file `poison` kills the decoding process as a segfault would."""
    main_process = os.getpid()

    def decode_or_crash(data, *args, **kwargs):
        if data == poison:
            # in the test process itself it would take pytest down: fail instead
            assert os.getpid() != main_process, "a crashing file was decoded in the main process"
            faulthandler.disable()  # pytest's, inherited: its traceback dump is noise here
            os.kill(os.getpid(), signal.SIGSEGV)
        return decode(data, *args, **kwargs)

    return decode_or_crash


def assert_crasher_is_the_one_error_row_added(out, reference_table):
    table = read_output(out / "labels.parquet")
    assert table["key"].is_unique and len(table) == IMAGES
    crashed = table["key"] == CRASHER
    row = table[crashed].iloc[0]
    assert row["status"] == "error" and "SIGSEGV" in row["error"], row
    others, expected = table[~crashed], reference_table[reference_table["key"] != CRASHER]
    for column in ("key", "status", "error", "top1_label"):
        assert others[column].tolist() == expected[column].tolist(), column
    listed = json.loads((out / "quarantine.json").read_text())["items"]
    assert [entry["key"] for entry in listed] == [CRASHER]


def test_a_file_that_crashes_a_worker_becomes_an_error_row_and_the_run_goes_on(
        cli, tmp_path, colour_checkpoint, reference, monkeypatch):
    folder, reference_table = reference
    out = tmp_path / "run"
    monkeypatch.setattr(loader, "decode",
                        segfault_on((folder / CRASHER).read_bytes(), loader.decode))
    done = cli(*job(folder, out, colour_checkpoint))
    assert done.exit_code == 0, done.output
    assert f"crashed the decoder, first {CRASHER}" in done.output
    assert_crasher_is_the_one_error_row_added(out, reference_table)
    again = cli(*job(folder, out, colour_checkpoint))
    assert again.exit_code == 0 and "nothing to do" in again.output
    monkeypatch.undo()  # the file decodes now (a fixed decoder): --overwrite forgets it all
    afresh = cli(*job(folder, out, colour_checkpoint), "--overwrite")
    assert afresh.exit_code == 0, afresh.output
    assert_same_as_reference(out, reference_table)  # quarantine.json included


class ProbedItems:
    """A loader dataset stand-in: some items kill the process, one may raise a bug."""

    def __init__(self, segfaults: set[int], raises: int | None = None):
        self.segfaults, self.raises = segfaults, raises

    def __getitem__(self, index):
        if index in self.segfaults:
            faulthandler.disable()
            os.kill(os.getpid(), signal.SIGSEGV)
        if index == self.raises:
            raise ValueError("a bug of ours, not the file's")
        return {"index": index}


def test_the_probe_names_every_file_that_kills_the_decoder_and_no_other():
    found = recovery.find_crashers(ProbedItems({3, 4, 9}), list(range(12)))
    assert found == dict.fromkeys([3, 4, 9], "the decoder crashed on this file (SIGSEGV)")
    assert recovery.find_crashers(ProbedItems(set()), list(range(12))) == {}


def test_an_exception_in_the_probe_blames_no_file():
    # Blaming the file it was on, then the next, would quarantine innocent files one by one.
    assert recovery.find_crashers(ProbedItems({5}, raises=2), list(range(8))) == {}


def test_after_a_crash_in_process_the_next_run_isolates_the_decoder_and_finishes(
        tmp_path, colour_checkpoint, reference):
    """Without workers a crashing file takes the run down; the rerun must not die there again."""
    folder, reference_table = reference
    out = tmp_path / "run"
    args = without_workers(job(folder, out, colour_checkpoint))  # none, as killpoints makes it
    crash = [sys.executable, str(REPO / "tests" / "killpoints.py"), "decoding",
             str(folder / CRASHER), *args]
    first = subprocess.run(crash, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == -signal.SIGSEGV, first.stderr
    assert 0 < count_parts(out) < IMAGES // SHARD  # died part way, past some commits
    second = subprocess.run(crash, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "crashed (a fatal signal, as when a file crashes the decoder): decoding in a worker" in second.stderr
    assert f"crashed the decoder, first {CRASHER}" in second.stderr
    assert_crasher_is_the_one_error_row_added(out, reference_table)
    assert json.loads((out / "run.json").read_text())["resolved"]["workers"] == 1


def test_a_run_killed_after_its_final_rename_has_nothing_to_do_and_says_only_that(
        cli, tmp_path, colour_checkpoint, reference, monkeypatch):
    folder, _ = reference
    out = tmp_path / "run"
    monkeypatch.setattr("pipeline.settings.default_workers", lambda *measured: 0)  # a small CPU's
    args = without_workers(job(folder, out, colour_checkpoint))
    assert cli(*args).exit_code == 0
    (out / ".lock").write_text("4242\n")  # the pid a holder killed before letting go leaves
    again = cli(*args)
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output
    assert "crashed" not in again.output and "did not finish" not in again.output
    assert json.loads((out / "run.json").read_text())["resolved"]["workers"] == 0


def test_workers_given_that_shared_memory_cannot_hold_are_refused_before_any_work(
        cli, tmp_path, colour_checkpoint, reference, monkeypatch):
    folder, _ = reference
    out = tmp_path / "run"
    monkeypatch.setattr("pipeline.memory.free_shared_memory", lambda: 100_000)
    fails_with(cli, job(folder, out, colour_checkpoint), 2, "/dev/shm has", "--shm-size",
               "or lower --workers or --batch-size")
    assert not out.exists()


def test_shared_memory_running_out_mid_run_is_one_line_and_keeps_what_was_committed(
        cli, tmp_path, colour_checkpoint, reference, monkeypatch):
    folder, reference_table = reference
    out = tmp_path / "run"
    real_collate = loader.collate

    def collate(samples):  # in the worker, as torch's collate says it half way through
        if samples[0]["index"] >= IMAGES // 2:
            raise RuntimeError("unable to allocate shared memory(shm) for file "
                               "</torch_1_2_0>: No space left on device (28)")
        return real_collate(samples)

    monkeypatch.setattr(loader, "collate", collate)
    args = job(folder, out, colour_checkpoint)
    fails_with(cli, args, 1, "ran out of shared memory in /dev/shm", "--shm-size",
               "run the same command to resume")
    assert count_parts(out) > 0
    monkeypatch.undo()
    resumes_to_reference(cli, args, out, reference_table)


@pytest.mark.skipif(not own_mount_namespace(), reason="needs root and unshare(1)")
def test_a_small_dev_shm_is_measured_and_the_loader_fitted_to_it(
        tmp_path, colour_checkpoint, reference):
    """A container's /dev/shm of a few MB (here a tmpfs of our own): the run still completes."""
    folder, reference_table = reference
    out = tmp_path / "run"
    args = without_workers(job(folder, out, colour_checkpoint))
    at = args.index("--batch-size")
    args = args[:at] + args[at + 2:] + ["--workers", "2"]  # batches of 32: 384 KB each

    def under_small_shm(*extra):
        script = 'mount -t tmpfs -o size=3m tmpfs /dev/shm && exec "$@"'
        return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                               "sh", sys.executable, "-m", "pipeline", *args, *extra],
                              cwd=REPO, capture_output=True, text=True)

    refused = under_small_shm("--batch-size", "256")
    assert refused.returncode == 2, refused.stderr
    assert "/dev/shm has 3 MB free" in refused.stderr
    fitted = under_small_shm()
    assert fitted.returncode == 0, fitted.stderr
    assert "using 2 worker(s), batches of 32, 1 prefetched by each" in fitted.stderr
    assert_same_as_reference(out, reference_table)


def test_a_part_damaged_outside_our_commits_is_named_and_redone(
        cli, tmp_path, colour_checkpoint, reference, monkeypatch):
    """Disk trouble after a commit: the merge names the part; deleting it redoes one shard."""
    folder, reference_table = reference
    out = tmp_path / "run"
    def interrupted_merge(store, name):
        if name.startswith("labels."):
            raise KeyboardInterrupt()

    fail_at_the_storage_seam(monkeypatch, interrupted_merge)
    args = job(folder, out, colour_checkpoint)
    assert cli(*args).exit_code == 130  # stopped with every part committed, none merged
    monkeypatch.undo()
    damaged = out / "parts" / "part-000004.parquet"
    damaged.write_bytes(b"PAR1 garbage")
    fails_with(cli, args, 1, "part-000004.parquet cannot be read", "delete it")
    assert not (out / "labels.parquet").exists()
    damaged.unlink()
    resumes_to_reference(cli, args, out, reference_table)
