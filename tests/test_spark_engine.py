"""--engine spark on a real standalone Spark: a master and two workers on loopback, started
with pyspark's own spark-class (Java 17 runs them). Exactly once when an executor is killed
mid-shard and when the driver is killed and rerun; a poison shard; the one-process rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, read_output, write_colour_images

pyspark = pytest.importorskip("pyspark")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java")]
SITE = REPO / "tests" / "spark_site"  # the kill hook the workers' Python loads
CONTROL = "LABEL_IMAGES_SPARK_CONTROL"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(log: Path, text: str, times: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().count(text) >= times:
            return
        time.sleep(0.5)
    raise AssertionError(f"{log}: no {times} x {text!r} within {seconds} s:\n"
                         + (log.read_text()[-3000:] if log.exists() else "(no log)"))


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory):
    """A standalone master and two one-core workers on 127.0.0.1; the workers' Python
    finds the repository and the kill hook. Stopped (killed) at the end."""
    home = Path(pyspark.__file__).parent
    folder = tmp_path_factory.mktemp("spark")
    control = folder / "control.json"
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1",
           "PYSPARK_PYTHON": sys.executable, CONTROL: str(control),
           "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO)]),
           "SPARK_WORKER_DIR": str(folder / "work")}
    port = _free_port()
    master = f"spark://127.0.0.1:{port}"
    spark_class = str(home / "bin" / "spark-class")
    processes, logs = [], []

    def start(name: str, *arguments: str) -> None:
        logs.append(open(folder / f"{name}.log", "w"))
        processes.append(subprocess.Popen([spark_class, *arguments], stdout=logs[-1],
                                          stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))

    try:
        start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
              "--port", str(port), "--webui-port", str(_free_port()))
        _wait_for(folder / "master.log", "I have been elected leader", 1)
        for n in range(2):
            start(f"worker{n}", "org.apache.spark.deploy.worker.Worker", master, "--host",
                  "127.0.0.1", "--cores", "1", "--memory", "3g", "--webui-port",
                  str(_free_port()), "--work-dir", str(folder / f"work{n}"))
        _wait_for(folder / "master.log", "Registering worker", 2)
        yield {"master": master, "control": control, "env": env, "folder": folder}
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        for log in logs:
            log.close()


@pytest.fixture
def control(spark_cluster):
    path = spark_cluster["control"]
    for stale in (path, path.with_name(path.name + ".killed")):
        stale.unlink(missing_ok=True)
    yield lambda image, mode: path.write_text(json.dumps({"image": str(image), "mode": mode}))
    path.unlink(missing_ok=True)


def kills(spark_cluster) -> int:
    flag = spark_cluster["control"].with_name(spark_cluster["control"].name + ".killed")
    return flag.read_text().count("\n") if flag.exists() else 0


def args(folder, out, checkpoint, *extra):
    return ["run", str(folder), "--out", str(out), "--model", "resnet18", "--weights",
            str(checkpoint), "--workers", "0", "--batch-size", "4", "--top-k", "2",
            "--shard-size", "4", "-q", "--runtime", "torch", *FAST, *extra]


def on_spark(spark_cluster, *extra):
    return ["--engine", "spark", "--option", f"spark_master={spark_cluster['master']}",
            *extra]


def driver(spark_cluster, arguments, **kwargs):
    """The driver as a user runs it, in a process of its own (its own Spark application)."""
    env = {**spark_cluster["env"], "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline", *arguments], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


def rows(path):
    table = read_output(path).fillna({"top1_label": "-", "top1_score": -1.0})
    return list(zip(table["key"], table["status"], table["top1_label"],
                    table["top1_score"].round(4)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory, colour_checkpoint):
    """20 images and a broken file, and the one-process run's table over them."""
    folder = tmp_path_factory.mktemp("photos")
    write_colour_images(folder, 20, seed=5)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    reference = tmp_path_factory.mktemp("reference") / "run"
    done = subprocess.run([sys.executable, "-m", "pipeline",
                           *args(folder, reference, colour_checkpoint)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return folder, rows(reference / "labels.parquet")


def test_executors_give_the_one_process_rows_and_a_killed_executor_loses_nothing(
        tmp_path, colour_checkpoint, spark_cluster, control, photos):
    """An executor's JVM killed while its task decodes an image (a lost machine, the OOM
    killer): Spark retries the task elsewhere, and every image is in the table once, with
    the one-process labels."""
    folder, reference = photos
    control(folder / "img_0009.png", "executor")
    out = tmp_path / "run"
    done = driver(spark_cluster, args(folder, out, colour_checkpoint,
                                      *on_spark(spark_cluster)))
    assert done.returncode == 0, done.stderr
    assert kills(spark_cluster) == 1  # the executor died mid-shard
    assert " Spark worker" in done.stderr.strip().splitlines()[-1]
    assert rows(out / "labels.parquet") == reference  # every key once, in plan order
    workers = json.loads((out / "run.json").read_text())["cluster_workers"]
    assert sum(w["images"] for w in workers) >= 21 and all(w["host"] for w in workers)


def test_a_poison_shard_ends_the_run_naming_it_after_the_others(
        tmp_path, colour_checkpoint, spark_cluster, control, photos):
    """An image that kills its Python worker every time: Spark's retries give up on its
    shard, the other shards are committed, and the run says which shard, exit 1."""
    folder, _ = photos
    control(folder / "img_0005.png", "always")
    out = tmp_path / "run"
    done = driver(spark_cluster, args(folder, out, colour_checkpoint,
                                      *on_spark(spark_cluster)))
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "1 poison shard: shard 1 (first keys: " in line and "img_0003.png" in line, line
    assert len(list((out / "parts").glob("*.parquet"))) == 5  # the other five shards


def test_a_killed_driver_is_rerun_and_every_image_is_labelled_once(
        tmp_path, colour_checkpoint, spark_cluster, photos):
    """SIGKILL of the driver once shards are committed: the rerun resumes from them."""
    folder, reference = photos
    out = tmp_path / "run"
    arguments = args(folder, out, colour_checkpoint, *on_spark(spark_cluster))
    env = {**spark_cluster["env"], "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "pipeline", *arguments], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / "parts").glob("*.parquet")) and time.monotonic() < deadline:
        assert first.poll() is None, "the driver ended before committing a shard"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    committed = len(list((out / "parts").glob("*.parquet")))
    assert 0 < committed < 6 and not (out / "labels.parquet").exists()
    again = driver(spark_cluster, [a for a in arguments if a != "-q"])
    assert again.returncode == 0, again.stderr
    assert "resuming: " in again.stderr
    assert rows(out / "labels.parquet") == reference


def test_spark_engine_refusals_are_one_line(cli, tmp_path, colour_checkpoint):
    folder = tmp_path / "imgs"
    write_colour_images(folder, 2)
    sliced = cli(*args(folder, tmp_path / "a", colour_checkpoint, "--engine", "spark",
                       "--num-slices", "2"))
    assert sliced.exit_code == 2 and "cannot be combined with --num-slices" in sliced.output
    stray = cli(*args(folder, tmp_path / "b", colour_checkpoint, "--option",
                      "spark_master=local[1]"))
    assert stray.exit_code == 2 and "spark_master" in stray.output
