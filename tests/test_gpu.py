"""The CUDA side, ready to be checked where a GPU is: `make test-gpu`. Skipped elsewhere.

Nothing here has run on a GPU yet (this project's machines have none); each test says what
it expects of the same code the CPU tests run, with the device as a parameter.
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
from tests.conftest import REPO, read_output, write_colour_images

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda", 0)


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
    assert len(read_output(tmp_path / "run" / "labels.parquet")) == 300


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
