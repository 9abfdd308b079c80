"""--engine ray on a real local Ray (2 CPUs, no dashboard): shards handed to actors from a
queue, exactly once through an actor's death, a poison shard, and the driver's death."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import FAST, REPO, read_output, write_colour_images
from tests.ray_hooks import CONTROL

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    control = tmp_path_factory.mktemp("ray") / "control.json"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "tests.ray_hooks.install",
                          "env_vars": {CONTROL: str(control), "PYTHONPATH": str(REPO)}})
    yield control
    ray.shutdown()


@pytest.fixture
def control(cluster):
    for stale in (cluster, cluster.with_name(cluster.name + ".killed")):
        stale.unlink(missing_ok=True)
    yield lambda image, mode, times=0: cluster.write_text(json.dumps(
        {"image": str(image), "mode": mode, "times": times}))
    cluster.unlink(missing_ok=True)


def kills(cluster) -> int:
    """How many processes the hook killed (tests/ray_hooks.py)."""
    flag = cluster.with_name(cluster.name + ".killed")
    return flag.read_text().count("\n") if flag.exists() else 0


def args(folder, out, checkpoint, *extra):
    # one runtime: an actor measures `auto` on its own share of the cores and may choose
    # another runtime than the one process did (runtimes agree within a tolerance, not 1e-4)
    return ("run", folder, "--out", out, "--model", "resnet18", "--weights", checkpoint,
            "--workers", "0", "--batch-size", "4", "--top-k", "2", "--shard-size", "4", "-q",
            "--runtime", "torch", *FAST, *extra)


def labels(path):
    table = read_output(path).fillna({"top1_label": "-", "top1_score": -1.0})
    return dict(zip(table["key"], zip(table["top1_label"], table["top1_score"].round(4))))


def test_two_actors_give_the_one_process_rows(cli, tmp_path, colour_checkpoint, cluster,
                                              monkeypatch):
    folder = tmp_path / "imgs"
    write_colour_images(folder, 18)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    local = cli(*args(folder, tmp_path / "local", colour_checkpoint))
    assert local.exit_code == 0, local.output
    monkeypatch.setattr("pipeline.progress.LOG_PROGRESS_SECONDS", 0)  # the driver's bar
    done = cli(*[a for a in args(folder, tmp_path / "ray", colour_checkpoint, "--engine", "ray",
                                 "--actors", "2") if a != "-q"])
    assert done.exit_code == 0, done.output
    bar = re.findall(r"^label-images: (\d+) of 19 images \(\d+%\), [^,]+(, 1 error)?, ",
                     done.output, re.MULTILINE)
    assert bar[-1] == ("19", ", 1 error"), done.output  # the actors' error rows, counted
    expected, found = read_output(tmp_path / "local" / "labels.parquet"), read_output(
        tmp_path / "ray" / "labels.parquet")
    assert list(found["key"]) == list(expected["key"])  # every key once, in plan order
    assert labels(tmp_path / "ray" / "labels.parquet") == labels(
        tmp_path / "local" / "labels.parquet")
    assert list(found["status"]) == list(expected["status"])
    run = json.loads((tmp_path / "ray" / "run.json").read_text())
    actors = run["cluster_workers"]
    assert run["engine"] == "ray" and len(actors) == 2
    assert sum(a["shards"] for a in actors) == 5 and sum(a["images"] for a in actors) == 19
    assert all(a["device"] == "cpu" and a["node"] and a["images_per_second"] > 0
               for a in actors)
    # a core each of the node's two: each sized its share of the node as torchrun's ranks do
    assert [a["per_node"] for a in actors] == [2, 2]
    assert "by 2 actors" in done.output
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["cluster_workers"] == actors and summary["items"] == 19
    # one clock: every actor's labelling falls inside the loop the rate is counted over
    assert all(a["seconds"] <= summary["loop_seconds"] for a in actors), summary
    assert summary["images_per_second"] == pytest.approx(19 / summary["loop_seconds"], rel=1e-2)


def test_more_actors_than_shards_says_how_many_started(cli, tmp_path, colour_checkpoint,
                                                       cluster):
    folder = tmp_path / "imgs"
    write_colour_images(folder, 3)  # one shard of 4
    done = cli(*args(folder, tmp_path / "ray", colour_checkpoint, "--engine", "ray",
                     "--actors", "2"))
    assert done.exit_code == 0, done.output
    assert "--actors 2: 1 shard to label, so 1 actor started" in done.output
    assert len(json.loads((tmp_path / "ray" / "run.json").read_text())["cluster_workers"]) == 1


def test_tar_shards_through_the_engine_give_the_one_process_rows(cli, tmp_path,
                                                                 colour_checkpoint, cluster):
    from tests.test_tar_shards import write_tar

    (tmp_path / "shards").mkdir()
    for n in range(3):
        write_tar(tmp_path / "shards" / f"{n:05d}.tar", 5 * n, 5, corrupt=5 * n + 2)
    local = cli(*args(tmp_path / "shards", tmp_path / "local", colour_checkpoint))
    assert local.exit_code == 0, local.output
    done = cli(*args(tmp_path / "shards", tmp_path / "ray", colour_checkpoint, "--engine",
                     "ray", "--actors", "2"))
    assert done.exit_code == 0, done.output
    assert labels(tmp_path / "ray" / "labels.parquet") == labels(
        tmp_path / "local" / "labels.parquet")
    assert (read_output(tmp_path / "ray" / "labels.parquet")["status"] == "error").sum() == 3


def test_an_actor_killed_mid_shard_has_its_shard_redone_once(cli, tmp_path, colour_checkpoint,
                                                             control):
    folder = tmp_path / "imgs"
    write_colour_images(folder, 12)
    victim = sorted(folder.iterdir())[5]  # in the second shard
    control(victim, "once")
    done = cli(*args(folder, tmp_path / "run", colour_checkpoint, "--engine", "ray",
                     "--actors", "2"))
    assert done.exit_code == 0, done.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert sorted(table["key"]) == sorted(p.name for p in folder.iterdir())
    assert (table["status"] == "ok").all()
    actors = json.loads((tmp_path / "run" / "run.json").read_text())["cluster_workers"]
    assert sum(a.get("died", False) for a in actors) == 1 and len(actors) == 3  # replaced
    redone, = json.loads((tmp_path / "run" / "summary.json").read_text())["redone"]
    assert redone["shard"] == 1 and redone["deaths"] == 1 and redone["seconds"] > 0


def test_a_decode_worker_killed_inside_an_actor_is_restarted_and_the_run_finishes(
        cli, tmp_path, colour_checkpoint, control, cluster):
    """The OOM killer's first pick is often a worker holding a batch: the actor restarts its
    loader and redoes the shard; nothing else stops."""
    folder = tmp_path / "imgs"
    write_colour_images(folder, 12)
    control(sorted(folder.iterdir())[5], "once")
    with_a_worker = [a if a != "0" else "1" for a in args(
        folder, tmp_path / "run", colour_checkpoint, "--engine", "ray", "--actors", "2")]
    done = cli(*with_a_worker)
    assert done.exit_code == 0, done.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert sorted(table["key"]) == sorted(p.name for p in folder.iterdir())
    assert table["key"].is_unique and (table["status"] == "ok").all()
    actors = json.loads((tmp_path / "run" / "run.json").read_text())["cluster_workers"]
    assert len(actors) == 2 and not any(a.get("died") for a in actors)  # no actor lost
    assert kills(cluster) == 1  # the worker was killed, and its actor restarted the loader
    assert sum(a["loader_restarts"] for a in actors) == 1


def test_a_fourth_decode_worker_killed_in_one_actor_replaces_the_actor(
        cli, tmp_path, colour_checkpoint, control, cluster):
    """An actor restarts its loader three times; the fourth kill is about the actor (its
    memory, its node), so the shard goes to a fresh actor, which finishes it."""
    folder = tmp_path / "imgs"
    write_colour_images(folder, 12)
    control(sorted(folder.iterdir())[5], "outside", times=4)
    with_a_worker = [a if a != "0" else "1" for a in args(
        folder, tmp_path / "run", colour_checkpoint, "--engine", "ray", "--actors", "1")]
    done = cli(*with_a_worker)
    assert done.exit_code == 0, done.output
    assert kills(cluster) == 4
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert sorted(table["key"]) == sorted(p.name for p in folder.iterdir())
    assert table["key"].is_unique and (table["status"] == "ok").all()
    actors = json.loads((tmp_path / "run" / "run.json").read_text())["cluster_workers"]
    assert [a.get("died", False) for a in actors] == [True, False]  # replaced once
    redone, = json.loads((tmp_path / "run" / "summary.json").read_text())["redone"]
    assert redone["shard"] == 1 and redone["deaths"] == 1


def test_a_shard_that_kills_every_actor_is_named_and_the_rest_commit(
        cli, tmp_path, colour_checkpoint, control):
    folder = tmp_path / "imgs"
    write_colour_images(folder, 12)
    victim = sorted(folder.iterdir())[9]  # shard 2 of 0-2
    control(victim, "always")
    done = cli(*args(folder, tmp_path / "run", colour_checkpoint, "--engine", "ray",
                     "--actors", "2"))
    assert done.exit_code == 1
    assert "1 poison shard: shard 2 (first keys: " in done.output
    assert sorted(folder.iterdir())[8].name in done.output and "3 times" in done.output
    parts = sorted(p.name for p in (tmp_path / "run" / "parts").glob("part-*.parquet"))
    assert parts == ["part-000000.parquet", "part-000001.parquet"]
    assert not (tmp_path / "run" / "labels.parquet").exists()


def test_the_driver_killed_then_rerun_labels_every_image_once(tmp_path, colour_checkpoint,
                                                              cluster):
    folder, out = tmp_path / "imgs", tmp_path / "run"
    write_colour_images(folder, 40)
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "pipeline", *map(str, args(
        folder, out, colour_checkpoint, "--engine", "ray", "--actors", "1",
        "--ray-address", address))]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "parts").glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    committed = len(list((out / "parts").glob("part-*.parquet")))
    assert 2 <= committed < 10 and not (out / "labels.parquet").exists()
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    table = pd.read_parquet(out / "labels.parquet")
    assert sorted(table["key"]) == sorted(p.name for p in folder.iterdir())
    assert table["key"].is_unique


@pytest.mark.parametrize("assigned, node, share", [
    ({"GPU": 1.0}, {"GPU": 8.0, "CPU": 96.0}, 8), ({"GPU": 1.0, "CPU": 1.0}, {"GPU": 2.0}, 2),
    ({"CPU": 2.0}, {"CPU": 8.0}, 4), ({"CPU": 3.0}, {"CPU": 8.0}, 2), ({}, {"CPU": 8.0}, 1),
    ({"GPU": 1.0}, {}, 1)])
def test_an_actor_counts_the_actors_its_node_holds(assigned, node, share):
    from pipeline.engines.cluster import per_node
    assert per_node(assigned, node) == share


def test_engine_flags_refused_in_one_line(cli, tmp_path, colour_checkpoint):
    folder = tmp_path / "imgs"
    write_colour_images(folder, 2)
    sliced = cli(*args(folder, tmp_path / "a", colour_checkpoint, "--engine", "ray",
                       "--num-slices", "2"))
    assert sliced.exit_code == 2 and "cannot be combined with --num-slices" in sliced.output
    nobody = cli(*args(folder, tmp_path / "b", colour_checkpoint, "--engine", "ray",
                       "--ray-address", "127.0.0.1:9"))
    assert nobody.exit_code == 2 and "no Ray cluster answers there" in nobody.output
    stray = cli(*args(folder, tmp_path / "c", colour_checkpoint, "--actors", "2"))
    assert stray.exit_code == 2 and "--actors is for --engine ray" in stray.output


def test_without_ray_installed_the_engine_is_one_line_naming_the_extra(tmp_path,
                                                                       colour_checkpoint):
    write_colour_images(tmp_path / "imgs", 2)
    hidden = ("import sys; sys.modules['ray'] = None; sys.argv = ['label-images', *sys.argv[1:]]"
              "; from pipeline.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", hidden, *map(str, args(
        tmp_path / "imgs", tmp_path / "run", colour_checkpoint, "--engine", "ray"))],
        cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == ("label-images: error: --engine ray needs Ray: pip install "
                                   "'label-images[ray]'")


def test_incremental_nights_through_the_engine_equal_scratch_runs(cli, tmp_path,
                                                                  colour_checkpoint, cluster):
    from tests.test_incremental import assert_equals_scratch, night

    folder, out = tmp_path / "photos", tmp_path / "nightly"
    truth = write_colour_images(folder, 9, seed=41)
    summary, _ = night(cli, folder, out, colour_checkpoint, "--engine", "ray", "--actors", "2")
    assert summary["labelled_now"] == 9
    assert_equals_scratch(cli, tmp_path, folder, out, colour_checkpoint, "1")
    write_colour_images(folder / "new", 3, seed=42)
    os.unlink(folder / sorted(truth)[4])
    summary, _ = night(cli, folder, out, colour_checkpoint, "--engine", "ray", "--actors", "2")
    assert summary["changes"] == {"new": 3, "changed": 0, "unchanged": 8, "removed": 1}
    assert summary["labelled_now"] == 3
    assert_equals_scratch(cli, tmp_path, folder, out, colour_checkpoint, "2")


# Two nodes of a real Ray cluster (ray.cluster_utils: a second raylet beside the head)
_TWO_NODES = """
import subprocess, sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    done = subprocess.run([sys.executable, "-m", "pipeline", *sys.argv[1:], "--ray-address",
                           cluster.address], capture_output=True, text=True, timeout=300)
    sys.stderr.write(done.stderr)
finally:
    cluster.shutdown()
sys.exit(done.returncode)
"""


def test_a_local_run_directory_on_a_cluster_of_two_nodes_is_refused_in_one_line(
        tmp_path, colour_checkpoint):
    folder = tmp_path / "imgs"
    write_colour_images(folder, 4)
    done = subprocess.run([sys.executable, "-c", _TWO_NODES, *map(str, args(
        folder, tmp_path / "run", colour_checkpoint, "--engine", "ray"))], cwd=REPO,
        capture_output=True, text=True, timeout=400)
    assert done.returncode == 2, done.stderr
    refusal = [line for line in done.stderr.splitlines() if "label-images: error" in line]
    line, = refusal  # the file system's type in brackets: ext4, overlay, tmpfs...
    assert line.startswith(f"label-images: error: the run directory {tmp_path / 'run'} is on "
                           "this machine's own disk ("), line
    assert line.endswith(") and the Ray cluster has 2 nodes: every actor must reach it; use a "
                         "shared file system or object storage (s3://...) for --out"), line
    assert not (tmp_path / "run" / "parts").exists()
