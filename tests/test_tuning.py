"""Measuring the machine: batch size (cached), workers from rates, whether compiling pays."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from pipeline import heap, runtimes, tuning
from pipeline.backends import resolve_model
from pipeline.classifier import Classifier
from pipeline.errors import RunError
from tests.conftest import FAST, REPO, own_mount_namespace, read_output, write_colour_images


def compile_for(classifier: Classifier, batch_size: int) -> None:
    runtimes.get(runtimes.COMPILED).prepare(classifier, runtimes.Preparing(batch_size=batch_size))


@pytest.fixture
def classifier(colour_checkpoint):
    spec = resolve_model("resnet18", str(colour_checkpoint), resize=72, crop=64)
    return Classifier(spec, torch.device("cpu"), torch.float32, top_k=2)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LABEL_IMAGES_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_batch_size_is_measured_once_per_machine_and_model(classifier, own_cache,
                                                                monkeypatch):
    first = tuning.measure_batch_size(classifier, candidates=(2, 4, 8), seconds=0.05)
    assert not first.cached and set(first.rates) == {2, 4, 8}
    assert first.batch_size == max(first.rates, key=first.rates.get)
    stored = json.loads((own_cache / "batch-sizes.json").read_text())
    assert len(stored) == 1 and tuning.machine_name(torch.device("cpu")) in next(iter(stored))

    monkeypatch.setattr(tuning, "timed_rate", lambda *a: pytest.fail("measured again"))
    again = tuning.measure_batch_size(classifier, candidates=(2, 4, 8), seconds=0.05)
    assert again.cached and again.batch_size == first.batch_size


def test_a_rate_is_timed_after_the_warm_up_batches(classifier, monkeypatch):
    """The first batches choose kernels (or compile) and grow the heap: slow, and not the
    rate the run will see."""
    real_forward, calls = classifier._forward, []

    def slow_at_first(images):
        calls.append(len(images))
        if len(calls) <= tuning.WARM_UP_BATCHES:
            time.sleep(0.3)
        return real_forward(images)

    monkeypatch.setattr(classifier, "_forward", slow_at_first)
    rate, first_call = tuning.timed_rate(classifier, 2, seconds=0.05)
    assert first_call >= 0.3 and len(calls) >= tuning.WARM_UP_BATCHES + 2
    # with one slow batch among the (at least two) timed ones, at most 4 images in 0.3 s
    assert rate > 4 / 0.3


def test_a_batch_the_device_cannot_hold_ends_the_search(classifier, own_cache, monkeypatch):
    real_forward = classifier._forward

    def out_of_memory_above_4(images):
        if len(images) > 4:
            raise torch.OutOfMemoryError("out of memory")
        return real_forward(images)

    monkeypatch.setattr(classifier, "_forward", out_of_memory_above_4)
    choice = tuning.measure_batch_size(classifier, candidates=(2, 4, 8, 16), seconds=0.05)
    assert set(choice.rates) == {2, 4} and choice.batch_size in (2, 4)
    assert classifier.fits is None  # the measurement leaves no halving behind for the run


@pytest.mark.parametrize("model, decode, cores, cuda, expected", [
    (77, 800, 2, False, 0),  # ResNet-50 bf16 on 2 cores, ImageNet-sized JPEGs: decode between
    (77, 40, 2, False, 1),  # 12 MP photos decode slower than the model: a worker pays
    (200, 900, 16, False, 1),  # more cores: one worker feeds the model, the rest compute
    (200, 60, 16, False, 3),  # ... unless decoding is slow: a few
    (2000, 250, 32, True, 10),  # a GPU: enough workers to decode at its rate, and a fifth
    (2000, 100, 8, True, 8),  # ... within the cores
])
def test_workers_come_from_the_measured_rates(model, decode, cores, cuda, expected):
    assert tuning.workers_for(model, decode, cores, cuda) == expected


def test_what_a_compile_cost_and_gave_here_decides_the_next_time(classifier, own_cache):
    assert tuning.compile_figures(classifier, 4)["from"].startswith("defaults")
    figures = tuning.measure_compile(classifier, 4, eager_rate=1e9)  # "compiled": 0x faster
    assert figures["compile_seconds"] >= 0 and figures["speedup"] < 1
    known = tuning.compile_figures(classifier, 4)
    assert known["from"] == "this machine" and known["speedup"] == figures["speedup"]
    # a compile that gave nothing here is not chosen again, whatever the job's size
    assert not tuning.compile_pays(10**7, 50.0, known["speedup"], known["compile_seconds"])


def test_compile_when_the_pending_images_repay_it():
    assert not tuning.compile_pays(pending=500, eager_rate=77, speedup=1.5, compile_seconds=26)
    assert tuning.compile_pays(pending=20_000, eager_rate=77, speedup=1.5, compile_seconds=26)


def test_compiled_and_eager_agree_and_a_short_batch_is_padded_to_one_shape(colour_checkpoint):
    """Compiled with frozen weights (batch norm folded in), embeddings caught by a hook."""
    spec = resolve_model("resnet18", str(colour_checkpoint), resize=72, crop=64)
    classifier = Classifier(spec, torch.device("cpu"), torch.float32, top_k=2, embeddings=True)
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    eager = classifier.predict(images)
    shapes = []
    compile_for(classifier, 8)
    compiled_net = classifier.net
    classifier.net = lambda x: shapes.append(tuple(x.shape)) or compiled_net(x)
    found = classifier.predict(images)
    assert shapes == [(8, 3, 64, 64)] and found.scores.shape == (5, 2)
    assert np.array_equal(found.class_ids[:, 0], eager.class_ids[:, 0])
    np.testing.assert_allclose(found.scores, eager.scores, atol=1e-4)
    assert found.embeddings.shape == (5, 512)
    np.testing.assert_allclose(found.embeddings, eager.embeddings, atol=1e-3)


def test_the_choices_and_their_figures_are_recorded(cli, tmp_path, colour_checkpoint,
                                                    own_cache, monkeypatch):
    folder = tmp_path / "imgs"
    write_colour_images(folder, 12)
    out = tmp_path / "run"
    # auto as on a machine with torch alone (auto among runtimes: test_runtimes)
    monkeypatch.delitem(runtimes.RUNTIMES, "openvino")
    result = cli("run", folder, "--out", out, "--model", "resnet18", "--weights",
                 colour_checkpoint, "--top-k", "2", "--quiet", "--runtime", "auto", *FAST)
    assert result.exit_code == 0, result.output
    resolved = json.loads((out / "run.json").read_text())["resolved"]
    measured = resolved["measured"]
    rates = measured["batch_sizes"]["images_per_second"]
    assert resolved["batch_size"] == int(max(rates, key=rates.get))
    assert measured["decode_images_per_second_per_core"] > 0 and measured["cores"] >= 1
    assert measured["heap"] == heap.state() != "unchanged"  # what the process's heap does
    # twelve images cannot repay a compile: it is not weighed, and the record says why
    weighing = measured["runtimes"]
    assert weighing["pending_images"] == 12 and weighing["chosen"] == "torch"
    assert "weighed" not in weighing  # torch alone was left: nothing measured to compare
    assert weighing["not_weighed"]["compile"].startswith("12 images to label, fewer than")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["batch_size"] == resolved["batch_size"]
    given = cli("run", folder, "--out", tmp_path / "given", "--model", "resnet18", "--weights",
                colour_checkpoint, "--quiet", "--batch-size", "3", "--workers", "0", "--top-k", "2",
                "--no-compile", *FAST)
    assert given.exit_code == 0, given.output
    resolved = json.loads((tmp_path / "given" / "run.json").read_text())["resolved"]
    assert (resolved["batch_size"], resolved["workers"], resolved["compile"]) == (3, 0, False)
    assert "batch_sizes" not in resolved["measured"]  # what was given is not measured
    assert len(read_output(tmp_path / "given" / "labels.parquet")) == 12


def test_a_small_job_measures_nothing_and_a_first_measure_is_said_as_it_runs(
        cli, tmp_path, colour_checkpoint, own_cache, monkeypatch):
    """157 photos do not repay a minute of measuring; a job that measures says so as it
    does, on a first run here, and not again once it is cached."""
    folder = tmp_path / "imgs"
    write_colour_images(folder, 12)
    monkeypatch.delitem(runtimes.RUNTIMES, "openvino")  # auto as with torch alone
    common = ("--model", "resnet18", "--weights", colour_checkpoint, "--top-k", "2",
              "--runtime", "auto", "--workers", "0", *FAST)
    monkeypatch.delenv("LABEL_IMAGES_MEASURE_FROM")
    small = cli("run", folder, "--out", tmp_path / "small", *common)
    assert small.exit_code == 0, small.output
    measured = json.loads((tmp_path / "small" / "run.json").read_text())["resolved"]["measured"]
    assert measured["batch_sizes"] == {
        "not_measured": "12 images to label, fewer than the 1000 that repay measuring",
        "chosen": tuning.candidate_batches(torch.device("cpu"))[1]}
    assert "label-images: measuring" not in small.output and not (own_cache / "batch-sizes.json").exists()
    monkeypatch.setenv("LABEL_IMAGES_MEASURE_FROM", "10")  # as a job of 10 images or more
    first = cli("run", folder, "--out", tmp_path / "first", *common)
    assert first.exit_code == 0, first.output
    said = [line for line in first.output.splitlines() if "fastest batch size" in line]
    assert len(said) == 2 and said[0].endswith("once per machine, then cached ...")
    assert re.search(r": done in \d+\.\d s$", said[1]), said
    assert "images_per_second" in json.loads((tmp_path / "first" / "run.json").read_text())[
        "resolved"]["measured"]["batch_sizes"]
    again = cli("run", folder, "--out", tmp_path / "again", *common)
    assert again.exit_code == 0 and "fastest batch size" not in again.output  # cached
    quiet = cli("run", folder, "--out", tmp_path / "quiet", *common, "-q", "--batch-size", "2")
    assert quiet.exit_code == 0 and "label-images: measuring" not in quiet.output


def test_a_small_job_times_no_model_run_to_choose_its_workers(cli, tmp_path,
                                                              colour_checkpoint, own_cache,
                                                              monkeypatch):
    """The worker count used to time the model on every run, whatever its size (9.6 s of
    a 30-image run's silence in the issue); a job too small to repay measuring uses what is
    known, and times nothing."""
    write_colour_images(tmp_path / "imgs", 12)
    monkeypatch.delitem(runtimes.RUNTIMES, "openvino")
    monkeypatch.delenv("LABEL_IMAGES_MEASURE_FROM")

    def timed(*args, **kwargs):
        raise AssertionError("a model run was timed")

    monkeypatch.setattr(tuning, "timed_rate", timed)
    for extra in ([], ["--batch-size", "4"]):
        out = tmp_path / f"run{len(extra)}"
        done = cli("run", tmp_path / "imgs", "--out", out, "--model", "resnet18", "--weights",
                   colour_checkpoint, "--top-k", "2", "--runtime", "auto", "-q", *FAST, *extra)
        assert done.exit_code == 0, done.output
        measured = json.loads((out / "run.json").read_text())["resolved"]["measured"]
        assert measured["model_images_per_second"] == {
            "not_measured": "12 images to label, fewer than the 1000 that repay measuring"}
        assert len(read_output(out / "labels.parquet")) == 12


def test_a_compiled_job_measures_its_own_batch_size_once(cli, tmp_path, colour_checkpoint,
                                                         own_cache, monkeypatch):
    """Compiled, the best batch is the compiled model's: the sizes around the eager best are
    each compiled and measured on the first run, and a later run compiles the best only."""
    monkeypatch.setattr(tuning, "CPU_BATCHES", (2, 4))  # two compiles, not three
    # what any process that imported torchvision holds: torch's default, set by torch
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    folder = tmp_path / "imgs"
    truth = write_colour_images(folder, 10)
    compiled_shapes = []
    compiling = runtimes.get(runtimes.COMPILED)
    real_compile = type(compiling).prepare

    def compile_and_watch(runtime, classifier, preparing=runtimes.Preparing()):
        compiled = classifier.runtime == runtime.name
        real_compile(runtime, classifier, preparing)
        if not compiled:
            compiled_net = classifier.net
            classifier.net = lambda x: compiled_shapes.append(len(x)) or compiled_net(x)
        return {}

    monkeypatch.setattr(type(compiling), "prepare", compile_and_watch)
    runs = []
    for name in ("first", "second"):
        compiled_shapes.clear()
        result = cli("run", folder, "--out", tmp_path / name, "--model", "resnet18",
                     "--weights", colour_checkpoint, "--top-k", "2", "--quiet", "--compile",
                     "--workers", "0", *FAST)
        assert result.exit_code == 0, result.output
        runs.append((json.loads((tmp_path / name / "run.json").read_text())["resolved"],
                     set(compiled_shapes)))
        table = read_output(tmp_path / name / "labels.parquet")
        assert dict(zip(table["key"], table["top1_label"])) == truth
    (first, first_shapes), (second, second_shapes) = runs
    found = first["measured"]["compiled_batch_sizes"]
    rates = {int(b): r for b, r in found["images_per_second"].items()}
    assert not found["from_cache"] and set(rates) == {2, 4} and first_shapes == {2, 4}
    assert first["batch_size"] == max(rates, key=rates.get) and first["compile"]
    assert first["measured"]["compiled"]["compile_seconds"] > 0
    # the eager sizes are measured and kept apart from the compiled ones
    assert set(first["measured"]["batch_sizes"]["images_per_second"]) == {"2", "4"}
    again = second["measured"]["compiled_batch_sizes"]
    assert again["from_cache"] and second["batch_size"] == first["batch_size"]
    assert second_shapes == {second["batch_size"]}  # one compile, at the best size only
    assert second["measured"]["compiled"]["compile_seconds"] > 0
    # the kernels are kept in the user's cache directory, not in /tmp
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(own_cache / "inductor")
    assert any((own_cache / "inductor").iterdir())


def test_an_inductor_cache_of_the_users_own_is_kept(tmp_path, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    # the machine's cores, in every rank; config.patch restores it (monkeypatch cannot)
    with inductor.patch(compile_threads=64):
        tuning.use_inductor_cache(cores=3)
        assert inductor.compile_threads == 3
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


@torch._dynamo.config.patch(recompile_limit=1)  # 8 by default
def test_a_compile_that_dynamo_gave_up_on_is_an_error_not_an_eager_run(colour_checkpoint):
    """Dynamo counts the graphs of a model's forward across every instance in a process and,
    past its limit, runs the next one eagerly without a word: a 'compiled' job would then
    measure and record eager figures."""
    spec = resolve_model("resnet18", str(colour_checkpoint), resize=72, crop=64)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    first = Classifier(spec, torch.device("cpu"), torch.float32, top_k=2)
    compile_for(first, 2)
    first.predict(images)  # compiled: the one graph the limit allows
    first.predict(images)  # the same shape again: no new graph, and none expected
    second = Classifier(spec, torch.device("cpu"), torch.float32, top_k=2)
    compile_for(second, 2)
    with pytest.raises(RunError, match="uncompiled at batch 2.*recompile_limit"):
        second.predict(images)


def test_the_model_runs_on_the_cores_its_decode_workers_leave(cli, tmp_path, colour_checkpoint,
                                                              monkeypatch):
    """Two torch threads on a core that a worker decodes on wait for it at every layer."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    write_colour_images(tmp_path / "imgs", 6)
    seen, submit = [], Classifier.submit
    monkeypatch.setattr(Classifier, "submit", lambda self, images: seen.append(
        torch.get_num_threads()) or submit(self, images))
    threads_before = torch.get_num_threads()
    for workers in (1, 0):
        out = tmp_path / f"run-{workers}"
        result = cli("run", tmp_path / "imgs", "--out", out, "--model", "resnet18", "--weights",
                     colour_checkpoint, "--workers", str(workers), "--batch-size", "2",
                     "--no-compile", "--quiet", "--top-k", "2", *FAST)
        assert result.exit_code == 0, result.output
        resolved = json.loads((out / "run.json").read_text())["resolved"]
        # torch's default is every (physical) core; a worker takes one of them
        expected = max(1, threads_before - 1) if workers else None
        assert resolved["torch_threads"] == expected
        assert seen and set(seen) == {expected or threads_before}  # while labelling
        seen.clear()
        assert torch.get_num_threads() == threads_before  # given back after the run


def _measuring_run(tmp_path, colour_checkpoint, name: str, env: dict, under=()):
    """A run that measures its batch size, in a process whose home and cache are `env`'s."""
    folder = tmp_path / "imgs"
    if not folder.exists():
        write_colour_images(folder, 12)
    clean = {k: v for k, v in os.environ.items()
             if k not in ("LABEL_IMAGES_CACHE", "XDG_CACHE_HOME", "HOME")}
    args = [*under, sys.executable, "-m", "pipeline", "run", folder, "--out", tmp_path / name,
            "--model", "resnet18", "--weights", colour_checkpoint, "--top-k", "2",
            "--runtime", "torch", "--workers", "0", *FAST]
    done = subprocess.run(list(map(str, args)), capture_output=True, text=True, cwd=REPO,
                          env={**clean, "LABEL_IMAGES_MEASURE_FROM": "0", **env})
    assert done.returncode == 0, done.stderr
    assert len(read_output(tmp_path / name / "labels.parquet")) == 12
    resolved = json.loads((tmp_path / name / "run.json").read_text())["resolved"]
    return resolved["measured"]["batch_sizes"], done.stderr


def test_what_is_measured_is_kept_in_the_users_cache_under_home_or_xdg(tmp_path,
                                                                      colour_checkpoint):
    """Measured once per machine and kept where the user's caches are: ~/.cache, or
    $XDG_CACHE_HOME when set; the next run there measures nothing."""
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    home.mkdir()
    first, _ = _measuring_run(tmp_path, colour_checkpoint, "first", {"HOME": str(home)})
    kept = home / ".cache" / "label-images" / "batch-sizes.json"
    assert not first["from_cache"] and kept.is_file()
    again, said = _measuring_run(tmp_path, colour_checkpoint, "again", {"HOME": str(home)})
    assert again["from_cache"] and again["batch_size"] == first["batch_size"]
    assert "fastest batch size" not in said
    elsewhere, _ = _measuring_run(tmp_path, colour_checkpoint, "xdg",
                                  {"HOME": str(home), "XDG_CACHE_HOME": str(xdg)})
    assert not elsewhere["from_cache"]  # ~/.cache is not where XDG_CACHE_HOME says
    assert json.loads((xdg / "label-images" / "batch-sizes.json").read_text()).keys() == \
        json.loads(kept.read_text()).keys()  # the same machine and model, the same key


@pytest.mark.skipif(not own_mount_namespace(), reason="needs root and unshare(1)")
def test_a_read_only_home_costs_a_measurement_not_the_run(tmp_path, colour_checkpoint):
    """A container whose home is mounted read-only: the run labels everything, says once
    that its measurement cannot be kept, and writes nothing there."""
    home = tmp_path / "home"
    home.mkdir()
    read_only = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                 'mount --bind "$HOME" "$HOME" && mount -o remount,ro,bind "$HOME" "$HOME" '
                 '&& exec "$@"', "sh"]
    for name in ("first", "second"):
        measured, said = _measuring_run(tmp_path, colour_checkpoint, name,
                                        {"HOME": str(home)}, under=read_only)
        assert not measured["from_cache"]
        kept = [line for line in said.splitlines() if "cannot keep a measurement" in line]
        assert len(kept) == 1 and str(home / ".cache" / "label-images") in kept[0], said
        assert "Read-only file system" in kept[0] and "Traceback" not in said
    assert list(home.iterdir()) == []
