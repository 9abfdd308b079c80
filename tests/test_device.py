"""The device, resolved once, as a GPU machine would see it: CUDA reported present by
patching torch.cuda's questions, then torch's own argument checks run on what we resolved
(torch.cuda.set_device's index check is the one that refused an unindexed `cuda`). Only the
call into the driver itself (torch._C._cuda_setDevice) is replaced, to record its index."""

from __future__ import annotations

import pytest
import torch

from pipeline import settings
from pipeline.classifier import resolve_device, use_cuda
from pipeline.config import RunConfig
from pipeline.errors import UsageError
from pipeline.launchers import Slice
from tests.conftest import write_colour_images


@pytest.fixture
def gpus(monkeypatch):
    """A machine with `count` GPUs, the current one `current`; what set_device was given."""
    chosen: list[int] = []

    def machine(count: int = 2, current: int = 0) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch._C, "_cuda_setDevice", chosen.append)
        return chosen

    # the knobs use_cuda turns are the process's: put back after (properties of torch's
    # backend modules, which monkeypatch cannot restore)
    knobs = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cuda.matmul, "allow_tf32")]
    before = [getattr(module, name) for module, name in knobs]
    yield machine
    for (module, name), value in zip(knobs, before):
        setattr(module, name, value)


@pytest.mark.parametrize("asked, current, expected", [
    ("auto", 0, "cuda:0"), ("cuda", 0, "cuda:0"), ("auto", 1, "cuda:1"), ("cuda:1", 0, "cuda:1")])
def test_the_device_is_indexed_and_torch_cuda_set_device_takes_it(gpus, asked, current,
                                                                   expected):
    chosen = gpus(count=2, current=current)
    device = resolve_device(asked)
    assert device == torch.device(expected) and device.index is not None
    torch.cuda.set_device(device)  # torch's own check: an unindexed device raises here
    assert chosen == [device.index]


def test_an_unindexed_cuda_device_is_what_set_device_refuses(gpus):
    """Why the index matters: the check the default device used to fail."""
    gpus()
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda.set_device(torch.device("cuda"))


def test_torchrun_ranks_take_their_local_rank_unless_a_device_is_named(gpus):
    gpus(count=4, current=0)
    rank = Slice(index=5, count=8, distributed=True, local_rank=2)
    device, dtype = settings.device_and_precision(RunConfig(source="x", out="o", device="auto"), rank)
    assert device == torch.device("cuda", 2) and dtype == torch.float16
    device, _ = settings.device_and_precision(RunConfig(source="x", out="o", device="cuda"), rank)
    assert device == torch.device("cuda", 2)
    device, _ = settings.device_and_precision(RunConfig(source="x", out="o", device="cuda:3"), rank)
    assert device == torch.device("cuda", 3)
    device, _ = settings.device_and_precision(RunConfig(source="x", out="o", device="auto"), Slice())
    assert device == torch.device("cuda", 0)


@pytest.mark.parametrize("asked, rank, words", [
    ("cuda:2", None, "--device cuda:2: this machine has 2 GPU(s), cuda:0 to cuda:1"),
    ("cuda", 3, "--device cuda (for local rank 3): this machine has 2 GPU(s)")])
def test_a_device_the_machine_lacks_is_one_line(gpus, asked, rank, words):
    gpus(count=2)
    with pytest.raises(UsageError) as refused:
        resolve_device(asked, rank)
    assert str(refused.value).startswith(words)


def test_cuda_asked_where_there_is_none_is_one_line_from_the_cli(cli, tmp_path, monkeypatch,
                                                               colour_checkpoint):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    write_colour_images(tmp_path / "imgs", 2)
    done = cli("run", tmp_path / "imgs", "--out", tmp_path / "run", "--device", "cuda",
               "--model", "resnet18", "--weights", colour_checkpoint)
    assert done.exit_code == 2
    assert done.output.strip() == ("label-images: error: --device cuda: CUDA is not "
                                   "available on this machine")


@pytest.mark.parametrize("dtype, tf32", [(torch.float32, False), (torch.float16, True),
                                         (torch.bfloat16, True)])
def test_the_cuda_knobs_set_the_indexed_device_and_tf32_only_below_fp32(gpus, dtype, tf32):
    chosen = gpus(count=2, current=0)
    torch.backends.cudnn.allow_tf32 = not tf32
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    use_cuda(resolve_device("cuda:1"), dtype)
    assert chosen == [1]
    assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    with pytest.raises(ValueError, match="indexed"):
        use_cuda(torch.device("cuda"), dtype)
