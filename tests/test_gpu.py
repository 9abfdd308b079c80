"""The CUDA side, ready to be checked where a GPU is: `make test-gpu`. Skipped elsewhere.

Nothing here has run on a GPU yet (this project's machines have none); each test says what
it expects of the same code the CPU tests run, with the device as a parameter. What can be
proven without a GPU (the device's resolution, torch's own argument checks on it, Keras'
placement, the sharing arithmetic) is in test_device.py and runs everywhere.
The first tests below are the command as a user runs it, with the default device.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import runtimes
from pipeline.backends import resolve_model
from pipeline.classifier import Classifier
from pipeline.tuning import measure_batch_size
from tests.conftest import FAST, REPO, read_output, write_colour_images

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda", 0)
# enough images for the real loader's workers and pinning to matter; small for a smoke run
IMAGES = int(os.environ.get("GPU_TEST_IMAGES", "2000"))


def run_args(folder, out, checkpoint, *extra):
    return ["run", str(folder), "--out", str(out), "--model", "resnet18", "--weights",
            str(checkpoint), "--top-k", "2", "-q", *FAST, *extra]


def resolved(out) -> dict:
    import json

    return json.loads((out / "run.json").read_text())["resolved"]


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory, colour_checkpoint):
    """A few thousand images (two broken) and their labels from the CPU in fp32."""
    root = tmp_path_factory.mktemp("gpu")
    folder = root / "imgs"
    write_colour_images(folder, IMAGES - 2, seed=43)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "pipeline",
                           *run_args(folder, root / "cpu", colour_checkpoint, "--device", "cpu",
                                     "--precision", "fp32", "--embeddings")],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, read_output(root / "cpu" / "labels.parquet")


def agrees(found, reference, top1=0.995, atol=2e-2) -> None:
    """Every key once, the same error rows, and the labels within fp16's reach of fp32."""
    found = found.set_index("key").loc[reference["key"]]  # raises on a missing key
    assert len(found) == len(reference) and found.index.is_unique
    assert found["status"].tolist() == reference["status"].tolist()
    ok = (reference["status"] == "ok").to_numpy()
    same = (found["top1_label"].to_numpy()[ok] == reference["top1_label"].to_numpy()[ok])
    assert same.mean() >= top1, f"top-1 agreement {same.mean():.4f}"
    np.testing.assert_allclose(found["top1_score"].to_numpy()[ok][same],
                               reference["top1_score"].to_numpy()[ok][same], atol=atol)


def test_the_default_command_runs_on_the_gpu_in_fp16(cli, tmp_path, cpu_reference,
                                                      colour_checkpoint):
    """No --device: the default finds the GPU, indexed, in fp16, through the real loader
    (its workers, pinned batches), and labels as the CPU does in fp32."""
    folder, reference = cpu_reference
    done = cli(*run_args(folder, tmp_path / "run", colour_checkpoint))
    assert done.exit_code == 0, done.output
    chosen = resolved(tmp_path / "run")
    assert chosen["device"] == "cuda:0" and chosen["precision"] == "float16"
    assert chosen["workers"] >= 1
    agrees(read_output(tmp_path / "run" / "labels.parquet"), reference)


@pytest.mark.parametrize("extra", [["--precision", "bf16"], ["--precision", "fp32"],
                                   ["--runtime", "compile", "--batch-size", "64"]],
                         ids=["bf16", "fp32-no-tf32", "compiled-short-last-batch"])
def test_precisions_and_the_compiled_model_on_the_gpu(cli, tmp_path, cpu_reference,
                                                     colour_checkpoint, extra):
    """bf16 (8-bit mantissa: a wider tolerance), fp32 (TF32 off: as close as the CPU), and
    a compiled model whose last batch is short (IMAGES is no multiple of 64: padded)."""
    folder, reference = cpu_reference
    done = cli(*run_args(folder, tmp_path / "run", colour_checkpoint, *extra))
    assert done.exit_code == 0, done.output
    atol = {"bf16": 5e-2, "fp32": 1e-4}.get(extra[1], 2e-2)
    agrees(read_output(tmp_path / "run" / "labels.parquet"), reference, atol=atol)
    if extra[1] == "compile":
        assert resolved(tmp_path / "run")["runtime"] == "compile"


def test_embeddings_on_the_gpu_point_where_the_cpus_do(cli, tmp_path, cpu_reference,
                                                       colour_checkpoint):
    folder, reference = cpu_reference
    done = cli(*run_args(folder, tmp_path / "run", colour_checkpoint, "--embeddings"))
    assert done.exit_code == 0, done.output
    found = read_output(tmp_path / "run" / "labels.parquet").set_index("key").loc[
        reference["key"]]
    ok = (reference["status"] == "ok").to_numpy()
    gpu = np.stack(found["embedding"].to_numpy()[ok]).astype(np.float32)
    cpu = np.stack(reference["embedding"].to_numpy()[ok]).astype(np.float32)
    cosine = (gpu * cpu).sum(1) / (np.linalg.norm(gpu, axis=1) * np.linalg.norm(cpu, axis=1))
    assert cosine.min() > 0.999


def test_killed_on_the_gpu_then_resumed_labels_each_image_once(tmp_path, cpu_reference,
                                                               colour_checkpoint):
    """Killed just before its third shard's commit, then the same command again."""
    folder, reference = cpu_reference
    args = run_args(folder, tmp_path / "run", colour_checkpoint, "--shard-size", "200")
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "killpoints.py"),
                             "part-before-rename", "3", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=1800)
    assert killed.returncode == -9, killed.stderr[-3000:]
    again = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "did not finish" in again.stderr
    agrees(read_output(tmp_path / "run" / "labels.parquet"), reference)


def test_bench_measures_on_the_gpu(cli, tmp_path, colour_checkpoint):
    """Every stage measured with the default device: the figures a first GPU session keeps."""
    import json

    write_colour_images(tmp_path / "imgs", 64)
    report = tmp_path / "bench.json"
    done = cli("bench", tmp_path / "imgs", "--images", "64", "--reference-images", "8",
               "--json", report, "--model", "resnet18", "--weights", colour_checkpoint, *FAST)
    assert done.exit_code == 0, done.output
    figures = json.loads(report.read_text())
    assert figures["device"] == "cuda:0" and figures["precision"] == "float16"
    assert "end to end, once the process is up" in [f["name"] for f in figures["figures"]]


def test_a_ray_actor_labels_on_the_gpu(cli, tmp_path, cpu_reference, colour_checkpoint):
    """One GPU in a local Ray: one actor, given it, on cuda:0; the driver keeps none of it."""
    ray = pytest.importorskip("ray")
    folder, reference = cpu_reference
    ray.init(num_cpus=os.cpu_count(), num_gpus=1, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        done = cli(*run_args(folder, tmp_path / "run", colour_checkpoint, "--engine", "ray",
                             "--runtime", "torch"))
    finally:
        ray.shutdown()
    assert done.exit_code == 0, done.output
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [a["device"] for a in summary["cluster_workers"]] == ["cuda:0"]
    agrees(read_output(tmp_path / "run" / "labels.parquet"), reference)


def batch(n: int, crop: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * seed + n)
    images = torch.randint(0, 256, (n, 3, crop, crop), dtype=torch.uint8, generator=generator)
    return images.contiguous(memory_format=torch.channels_last)


def test_fp16_on_the_device_agrees_with_fp32(colour_checkpoint):
    spec = resolve_model("resnet18", str(colour_checkpoint), resize=72, crop=64)
    images = batch(16)
    full = Classifier(spec, CUDA, torch.float32, top_k=2).predict(images)
    half = Classifier(spec, CUDA, torch.float16, top_k=2).predict(images)
    assert (half.class_ids[:, 0] == full.class_ids[:, 0]).mean() >= 0.9
    np.testing.assert_allclose(half.scores[:, 0], full.scores[:, 0], atol=1e-2)


def test_pinned_batches_are_copied_without_blocking_and_give_the_same_labels(
        colour_checkpoint):
    spec = resolve_model("resnet18", str(colour_checkpoint), resize=72, crop=64)
    classifier = Classifier(spec, CUDA, torch.float32, top_k=2)
    images = batch(8)
    pinned = classifier.predict(images.pin_memory())
    pageable = classifier.predict(images)
    assert np.array_equal(pinned.class_ids, pageable.class_ids)


def test_batches_sent_while_others_compute_keep_their_own_results(colour_checkpoint):
    """The run's order on CUDA: batch i+1 copied on a side stream while batch i computes,
    each result fetched once the next is sent; a short batch padded on the device."""
    spec = resolve_model("resnet18", str(colour_checkpoint), resize=72, crop=64)
    classifier = Classifier(spec, CUDA, torch.float32, top_k=2, embeddings=True)
    batches = [batch(16, seed=i).pin_memory() for i in range(3)] + [batch(5).pin_memory()]
    one_at_a_time = [classifier.predict(images) for images in batches]
    classifier.pad_batches_to(16)
    in_flight = [classifier.submit(images) for images in batches]  # none waited for yet
    for expected, labelling in zip(one_at_a_time, in_flight):
        found = labelling.result()
        assert np.array_equal(found.class_ids, expected.class_ids)
        np.testing.assert_allclose(found.scores, expected.scores, atol=1e-5)
        np.testing.assert_allclose(found.embeddings, expected.embeddings, atol=1e-4)


def test_out_of_memory_in_a_real_run_goes_on_in_halves(cli, tmp_path, colour_checkpoint):
    """The process allowed a sliver of the card: batches of 256 at 512 px do not fit, the
    run goes on in halves and finishes, saying which --batch-size to start with."""
    folder = tmp_path / "imgs"
    write_colour_images(folder, 300)
    total = torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 1.5 * 2**30 / total), CUDA)
    try:
        result = cli("run", folder, "--out", tmp_path / "run", "--model", "resnet18",
                     "--weights", colour_checkpoint, "--resize", "512", "--crop", "512",
                     "--batch-size", "256", "--quiet")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    assert result.exit_code == 0, result.output
    assert "ran out of memory with batches of 256" in result.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    # exactly once after the padding and the halving
    assert sorted(table["key"]) == sorted(p.name for p in folder.iterdir())


def test_batch_size_is_measured_on_the_gpu(colour_checkpoint):
    spec = resolve_model("resnet18", str(colour_checkpoint), resize=72, crop=64)
    choice = measure_batch_size(Classifier(spec, CUDA, torch.float16, top_k=2),
                                seconds=0.2)
    assert choice.batch_size in choice.rates and all(r > 0 for r in choice.rates.values())


def test_compiled_and_eager_agree_on_the_gpu_at_the_compiled_batch_measured_there(
        colour_checkpoint):
    """Each size compiled and measured on the device; a short batch is then padded to the
    best one and agrees with eager."""
    spec = resolve_model("resnet18", str(colour_checkpoint), resize=72, crop=64)
    images = batch(5)
    eager = Classifier(spec, CUDA, torch.float16, top_k=2).predict(images)
    compiled = Classifier(spec, CUDA, torch.float16, top_k=2)
    runtimes.get(runtimes.COMPILED).prepare(compiled, runtimes.Preparing(batch_size=32))
    choice = measure_batch_size(compiled, (32, 64), seconds=0.2, compiled=True)
    assert set(choice.rates) == {32, 64} and all(r > 0 for r in choice.rates.values())
    assert compiled.fixed_batch == choice.batch_size and choice.first_call_seconds > 0
    found = compiled.predict(images)
    np.testing.assert_allclose(found.scores, eager.scores, atol=1e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_torchrun_ranks_each_on_their_own_gpu(tmp_path, colour_checkpoint):
    folder = tmp_path / "imgs"
    write_colour_images(folder, 40)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "pipeline", "run", folder,
                           "--out", tmp_path / "run", "--model", "resnet18", "--weights",
                           colour_checkpoint, "--resize", "72", "--crop", "64", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = (tmp_path / "run" / "run.json").read_text()
    assert '"device": "cuda:0"' in record  # rank 0 wrote it; rank 1 ran on cuda:1
    assert len(read_output(tmp_path / "run" / "labels.parquet")) == 40
