"""--engine ray when the cluster itself fails, on a real multi-node Ray on this machine
(`ray.cluster_utils.Cluster`: a head and worker nodes with resources of their own): a worker
node removed mid-run, the head's raylet killed under the driver. The run directory is on a
loopback S3 server (moto), which every node reaches, as on a real cluster. Slow: each test
starts a cluster of its own: `make test` runs them, `make test-quick` leaves them out."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest

from tests.conftest import FAST, REPO, write_colour_images
from tests.test_object_storage import s3  # noqa: F401 (the moto server fixture)

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(s3, monkeypatch):  # noqa: F811
    """A head with no CPU for actors and two worker nodes of one CPU each; the nodes' and
    the drivers' environment reaches the S3 server."""
    env, fs = s3
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LABEL_IMAGES_RAY_TIMEOUT", "20")
    made = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False})
    workers = [made.add_node(num_cpus=1) for _ in range(2)]
    made.wait_for_nodes()
    yield made, workers, fs
    try:
        made.shutdown()
    except Exception:  # noqa: BLE001 - a head killed by the test
        pass


def command(folder, out, checkpoint, address):
    return [sys.executable, "-m", "pipeline", "run", str(folder), "--out", out, "--model",
            "resnet18", "--weights", str(checkpoint), "--workers", "0", "--batch-size", "4",
            "--top-k", "2", "--shard-size", "4", "--runtime", "torch", "-q", *FAST,
            "--engine", "ray", "--actors", "2", "--ray-address", address]


def committed(fs, out: str) -> int:
    fs.invalidate_cache()
    return len(fs.glob(out.removeprefix("s3://") + "/parts/part-*.parquet"))


def wait_for_parts(fs, out: str, count: int, driver) -> None:
    deadline = time.time() + 240
    while committed(fs, out) < count:
        assert driver.poll() is None, driver.stderr.read()
        assert time.time() < deadline, "no parts committed"
        time.sleep(0.2)


def test_a_worker_node_lost_mid_run_has_its_shards_redone_by_the_nodes_left(
        tmp_path, colour_checkpoint, cluster):
    made, workers, fs = cluster
    folder, out = tmp_path / "imgs", "s3://bucket/faults/node-lost"
    write_colour_images(folder, 60)
    driver = subprocess.Popen(command(folder, out, colour_checkpoint, made.address),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    wait_for_parts(fs, out, 2, driver)
    made.remove_node(workers[1])  # its raylet and every process on it, as a machine lost
    _, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr
    with fs.open(out.removeprefix("s3://") + "/labels.parquet", "rb") as fh:
        table = pd.read_parquet(fh)
    assert sorted(table["key"]) == sorted(p.name for p in folder.iterdir())
    assert table["key"].is_unique and (table["status"] == "ok").all()
    with fs.open(out.removeprefix("s3://") + "/run.json", "rb") as fh:
        run = json.load(fh)
    assert len(run["lost_nodes"]) == 1 and run["redone"]
    assert "1 node lost" in stderr


def test_the_drivers_node_lost_ends_the_driver_within_the_bound_and_a_rerun_resumes(
        tmp_path, colour_checkpoint, cluster):
    """The node the driver and its actors run on loses its raylet (as when its dashboard
    agent is killed): the actors go with it. The driver used to wait for them forever."""
    made, workers, fs = cluster
    for node in workers:  # one node: the head, with the actors on it
        made.remove_node(node)
    made.head_node.kill_all_processes(check_alive=False, allow_graceful=False)
    single = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False})
    folder, out = tmp_path / "imgs", "s3://bucket/faults/node-lost-under-driver"
    write_colour_images(folder, 400)  # long enough to be under way when the node goes
    try:
        driver = subprocess.Popen(command(folder, out, colour_checkpoint, single.address),
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        wait_for_parts(fs, out, 2, driver)
        raylet = psutil.Process(single.head_node.all_processes["raylet"][0].process.pid)
        for process in [*raylet.children(recursive=True), raylet]:
            process.send_signal(signal.SIGKILL)
        lost = time.time()
        _, stderr = driver.communicate(timeout=240)
        waited = time.time() - lost
    finally:
        single.shutdown()
    assert waited < 60, waited  # the bound (20 s here), Ray's own detection, and the exit
    assert driver.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("label-images: error: ") and "run the same command again" in last
    assert committed(fs, out) < 100  # stopped part way, not finished
    fresh = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False})
    try:
        again = subprocess.run(command(folder, out, colour_checkpoint, fresh.address),
                               cwd=REPO, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
    finally:
        fresh.shutdown()
    with fs.open(out.removeprefix("s3://") + "/labels.parquet", "rb") as fh:
        table = pd.read_parquet(fh)
    assert sorted(table["key"]) == sorted(p.name for p in folder.iterdir())
    assert table["key"].is_unique


def ray_processes(driver: psutil.Process) -> list[psutil.Process]:
    return [p for p in driver.children(recursive=True) if p.is_running()]


def test_the_local_ray_the_driver_started_lost_ends_it_within_a_minute_and_a_rerun_resumes(
        tmp_path, colour_checkpoint, monkeypatch):
    """No --ray-address: the driver starts Ray on this machine. Its node's dashboard agent
    killed under a running job, the raylet goes with it: the driver used to sit silent for
    five minutes waiting for replacement actors on a cluster whose only node was dead."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("LABEL_IMAGES_RAY_TIMEOUT", "20")
    folder, out = tmp_path / "imgs", tmp_path / "run"
    write_colour_images(folder, 400)
    args = [a for a in command(folder, str(out), colour_checkpoint, "")[:-2]]  # no address
    driver = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        deadline = time.time() + 240
        while not (out / "parts").is_dir() or len(list((out / "parts").glob("part-*"))) < 2:
            assert driver.poll() is None, driver.stderr.read()
            assert time.time() < deadline, "no parts committed"
            time.sleep(0.2)
        started = ray_processes(psutil.Process(driver.pid))
        # as it was found: the node's dashboard agent killed; its raylet follows it
        next(p for p in started if p.name() == "ray::DashboardAgent").kill()
        lost = time.time()
        _, stderr = driver.communicate(timeout=120)
        waited = time.time() - lost
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for process in started:  # what the dead node's driver left (its GCS, its logs' tail)
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    assert waited < 60, waited
    assert driver.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("label-images: error: ") and "run the same command again" in last
    assert "Traceback" not in stderr
    assert len(list((out / "parts").glob("part-*"))) < 100  # stopped part way
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    table = pd.read_parquet(out / "labels.parquet")
    assert sorted(table["key"]) == sorted(p.name for p in folder.iterdir())
    assert table["key"].is_unique
