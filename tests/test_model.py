"""Weights: torchvision names (cached or not), local checkpoints, class names, devices."""

from __future__ import annotations

import dataclasses
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pipeline import classifier as classifying
from pipeline import settings
from pipeline.backends import resolve_model
from pipeline.classifier import Classifier, resolve_device, resolve_precision
from pipeline.errors import RunError, UsageError
from pipeline.memory import (PREFETCH_BATCHES, LoaderSize, available_memory, fit_pinned_memory,
                             fit_shared_memory)
from tests.conftest import COLOURS, read_output, write_colour_images


@pytest.fixture(scope="module")
def staged_torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME holding a seeded stand-in for torchvision's ResNet-50 file, as staged offline."""
    home = tmp_path_factory.mktemp("torch_home")
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    target = home / "hub" / "checkpoints" / Path(weights.url).name
    target.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet50().state_dict(), target)
    return home


def test_default_resnet50_weights_load_from_the_torch_cache(staged_torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(staged_torch_home))
    spec = resolve_model("resnet50", "DEFAULT")
    assert spec.weights_id == "ResNet50_Weights.IMAGENET1K_V2"
    assert spec.num_classes == 1000 and spec.categories[0] == "tench"
    # preprocessing comes from the weights' own metadata, not the 256/224 recipe
    assert (spec.preprocess.resize, spec.preprocess.crop) == (232, 224)


def test_the_default_job_runs_resnet50_end_to_end(cli, tmp_path, staged_torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(staged_torch_home))
    write_colour_images(tmp_path / "imgs", 2)
    result = cli("run", tmp_path / "imgs", "--out", tmp_path / "run", "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    imagenet = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    assert (table["status"] == "ok").all() and len(table["labels"][0]) == 5
    assert set(table["top1_label"]) <= set(imagenet)


def test_missing_weights_offline_is_one_clear_error_never_random_weights(tmp_path, monkeypatch,
                                                                          capfd):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UsageError) as caught:
        resolve_model("resnet50", "DEFAULT")
    message = str(caught.value)
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert str(expected) in message and "--weights PATH" in message
    assert "name resolution" in message and "\n" not in message
    shown = capfd.readouterr()
    assert "Downloading" not in shown.out + shown.err  # torch.hub's line, before the error


def test_a_staged_torchvision_file_passed_as_path_keeps_its_class_names(staged_torch_home):
    path = next((staged_torch_home / "hub" / "checkpoints").iterdir())
    spec = resolve_model("resnet50", str(path))
    assert spec.categories[1] == "goldfish" and spec.preprocess.resize == 232
    assert spec.weights_id.startswith("sha256:")


def save(path, obj):
    torch.save(obj, path)
    return str(path)


@pytest.fixture(scope="module")
def small_state_dict():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).state_dict()


def test_plain_state_dict_gets_index_names_and_default_preprocessing(tmp_path, small_state_dict):
    spec = resolve_model("resnet18", save(tmp_path / "w.pth", small_state_dict))
    assert spec.num_classes == 4  # from the checkpoint's head, not ImageNet's 1000
    assert spec.categories == ("0", "1", "2", "3")
    assert (spec.preprocess.resize, spec.preprocess.crop) == (256, 224)
    overridden = resolve_model("resnet18", save(tmp_path / "w.pth", small_state_dict),
                               resize=80, crop=64)
    assert (overridden.preprocess.resize, overridden.preprocess.crop) == (80, 64)


def test_labels_file_names_the_classes_and_must_match_the_head(tmp_path, small_state_dict):
    weights = save(tmp_path / "w.pth", small_state_dict)
    labels = tmp_path / "labels.txt"
    labels.write_text("sun\ncloud\nrain\nsnow\n")
    assert resolve_model("resnet18", weights, str(labels)).categories[2] == "rain"
    labels.write_text("sun\ncloud\nrain\n")
    with pytest.raises(UsageError, match="names 3 classes, but the model has 4"):
        resolve_model("resnet18", weights, str(labels))


def test_ddp_prefixed_checkpoint_with_categories_loads(tmp_path, small_state_dict):
    wrapped = {"state_dict": {f"module.{k}": v for k, v in small_state_dict.items()},
               "categories": list(COLOURS)}
    spec = resolve_model("resnet18", save(tmp_path / "ddp.pt", wrapped))
    assert spec.categories == tuple(COLOURS)
    spec.build()  # loads without missing or unexpected keys


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "not a"),
    (None, "do not fit resnet50"),
])
def test_files_that_are_not_this_models_checkpoint_are_refused(tmp_path, small_state_dict,
                                                              content, message):
    path = tmp_path / "w.pt"
    if content is None:
        save(path, small_state_dict)  # a resnet18 file given to resnet50
    else:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        resolve_model("resnet50", str(path)).build()


def test_a_text_file_given_as_weights_is_said_to_be_no_checkpoint(tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("red\ngreen\nblue\ngrey\n")
    with pytest.raises(UsageError) as refused:
        resolve_model("resnet18", str(names)).build()
    assert str(refused.value) == (f"--weights {names} is not a PyTorch checkpoint (a file "
                                  "torch.save wrote) (a text file: class names go to --labels)")


class _Payload:
    """Unpickling this would create a file: a checkpoint must never be able to run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_unexecuted(tmp_path,
                                                                       small_state_dict):
    marker = tmp_path / "pwned"
    path = save(tmp_path / "evil.pt", {"state_dict": small_state_dict,
                                       "extra": _Payload(marker)})
    with pytest.raises(UsageError, match="not a plain checkpoint"):
        resolve_model("resnet18", path)
    assert not marker.exists()


def test_unknown_model_and_weights_names_are_refused_with_hints(tmp_path):
    with pytest.raises(UsageError, match="did you mean resnet50"):
        resolve_model("resnet05", "DEFAULT")
    with pytest.raises(UsageError, match="IMAGENET1K_V1"):
        resolve_model("resnet50", "IMAGENET22K")
    with pytest.raises(UsageError, match="weights file not found"):
        resolve_model("resnet50", str(tmp_path / "missing.pth"))


def test_top_k_larger_than_the_class_count_is_refused(tmp_path, small_state_dict):
    spec = resolve_model("resnet18", save(tmp_path / "w.pth", small_state_dict))
    with pytest.raises(UsageError, match="--top-k 5 is more than the model's 4 classes"):
        Classifier(spec, torch.device("cpu"), torch.float32, top_k=5)


def test_precision_follows_the_device(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(classifying, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(classifying, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("fp16", cpu) == torch.float16


def test_device_auto_and_unavailable_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match="CUDA is not available"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("cores, on_cuda", [(1, 1), (2, 2), (16, 8)])
def test_without_rates_to_go_by_a_cpu_decodes_between_batches(cores, on_cuda):
    """Measured rates decide (test_tuning.py); with none (nothing readable in the sample),
    no workers on a CPU, one a core up to 8 on a GPU."""
    assert settings.default_workers(torch.device("cpu"), None, None, cores) == 0
    assert settings.default_workers(torch.device("cuda"), 100.0, None, cores) == on_cuda


MB = 2**20
CROP_224 = 3 * 224 * 224  # bytes of one image in a batch


def fit(free, workers=8, batch_size=256, fixed_workers=False, fixed_batch=False):
    """A GPU box's defaults fitted into `free` bytes of shared memory."""
    return fit_shared_memory(LoaderSize(workers, batch_size, PREFETCH_BATCHES), CROP_224, free,
                             fixed_workers=fixed_workers, fixed_batch=fixed_batch)


def test_batches_in_flight_are_kept_within_half_the_shared_memory():
    assert fit(None) == fit(24 * 1024 * MB) == LoaderSize(8, 256, PREFETCH_BATCHES)
    assert fit(1024 * MB) == LoaderSize(8, 256, 1)  # fewer prefetched, first
    # Docker's and Kubernetes' default of 64 MB: smaller batches keep the decoding workers
    docker = fit(64 * MB)
    assert docker == LoaderSize(5, 32, 1)
    assert docker.shared_bytes(CROP_224) <= 32 * MB < LoaderSize(6, 32, 1).shared_bytes(CROP_224)
    # a given batch size stays; with no worker left nothing is shared
    assert fit(64 * MB, fixed_batch=True) == LoaderSize(0, 256, PREFETCH_BATCHES)
    assert fit(4 * MB) == LoaderSize(0, 256, PREFETCH_BATCHES)
    assert fit(64 * MB, fixed_workers=True) is None  # given workers stay: it cannot fit
    assert fit(64 * MB, fixed_workers=True, fixed_batch=True) is None
    assert fit(1 * MB, workers=0) == LoaderSize(0, 256, PREFETCH_BATCHES)  # nothing shared


def test_pinned_batches_are_counted_and_kept_within_a_quarter_of_the_memory(capsys):
    """The issue's 8-GPU node: 12 MP-fed ranks of 8 workers, batches of 256 at 224 px."""
    wanted = LoaderSize(8, 256, PREFETCH_BATCHES)
    # 38.5 MB a batch, pinned in a 64 MiB block; 8 x 4 prefetched + 2 at the model
    assert wanted.pinned_bytes(CROP_224) == 34 * 64 * MB
    node = 64 * 1024 * MB  # available, shared by 8 ranks: 8 GiB each, a quarter is 2 GiB
    assert fit_pinned_memory(wanted, CROP_224, 4 * node, sharing=8) == wanted
    fitted = fit_pinned_memory(wanted, CROP_224, node, sharing=8)
    assert fitted == LoaderSize(8, 256, 3)  # fewer prefetched: 26 x 64 MiB <= 2 GiB
    assert fitted.pinned_bytes(CROP_224) <= node // 4 // 8 < LoaderSize(8, 256, 4).pinned_bytes(
        CROP_224)
    assert capsys.readouterr().err == ""
    # not even one prefetched each fits: said, and the loader left at its least
    assert fit_pinned_memory(wanted, CROP_224, 2048 * MB, sharing=8) == LoaderSize(8, 256, 1)
    assert "would lock 640 MB of page-locked memory" in capsys.readouterr().err
    assert fit_pinned_memory(wanted, CROP_224, None) == wanted  # unknown: as wanted


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_memory_available_is_the_containers_where_its_cgroup_is_limited(tmp_path, version):
    """A container's limit, not the host's free memory, is what the job may use: the files
    as the kernel lays them out for each cgroup version, read by the job's own code."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 263000000 kB\nMemAvailable: 200000000 kB\n")
    host = 200_000_000 * 1024
    if version == "v1":
        (proc / "self" / "cgroup").write_text("5:cpu,cpuacct:/pod\n4:memory:/kubepods/pod1\n")
        folder, limit_file, usage_file = (cgroups / "memory" / "kubepods" / "pod1",
                                          "memory.limit_in_bytes", "memory.usage_in_bytes")
        unlimited = str(9223372036854771712)
    else:
        (proc / "self" / "cgroup").write_text("0::/\n")
        folder, limit_file, usage_file = cgroups, "memory.max", "memory.current"
        unlimited = "max"
    folder.mkdir(parents=True)
    (folder / limit_file).write_text(f"{16 * 2**30}\n")
    (folder / usage_file).write_text(f"{6 * 2**30}\n")
    assert available_memory(str(proc), str(cgroups)) == 10 * 2**30
    (folder / limit_file).write_text(unlimited + "\n")
    assert available_memory(str(proc), str(cgroups)) == host
    (folder / limit_file).unlink()  # no cgroup files where they are looked for: the host's
    assert available_memory(str(proc), str(cgroups)) == host


def test_predict_returns_sorted_probabilities_for_uint8_batches(tmp_path, small_state_dict):
    spec = resolve_model("resnet18", save(tmp_path / "w.pth", small_state_dict),
                         resize=40, crop=32)
    classifier = Classifier(spec, torch.device("cpu"), torch.float32, top_k=4)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    prediction = classifier.predict(images)
    assert prediction.class_ids.shape == (3, 4) and prediction.class_ids.dtype.name == "int32"
    assert (prediction.scores[:, :-1] >= prediction.scores[:, 1:]).all()
    assert prediction.scores.sum(axis=1) == pytest.approx(1.0, abs=1e-5)  # all 4 classes
    # the device-side normalisation equals the usual float pipeline
    net = spec.build()
    mean = torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net((images.float() / 255 - mean) / std).softmax(1).topk(4)
    assert prediction.scores == pytest.approx(expected.values.numpy(), abs=1e-5)


def test_fp16_normalisation_matches_fp32_closely(tmp_path, small_state_dict):
    """The GPU's precision path, run on the CPU: same code, dtype as a parameter."""
    spec = resolve_model("resnet18", save(tmp_path / "w.pth", small_state_dict),
                         resize=40, crop=32)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    half = Classifier(spec, torch.device("cpu"), torch.float16, top_k=2)
    assert half._scale.dtype == torch.float16
    full = Classifier(spec, torch.device("cpu"), torch.float32, top_k=2)
    x16 = torch.addcmul(half._shift, images.to(torch.float16), half._scale).float()
    x32 = torch.addcmul(full._shift, images.float(), full._scale)
    assert (x16 - x32).abs().max() < 5e-3  # fp16 keeps 10 bits: errors of a few 1e-3
    assert half.predict(images).class_ids.tolist() == full.predict(images).class_ids.tolist()


OUT_OF_MEMORY = {
    "torch": torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    # cuDNN's and cuBLAS's own allocations fail as plain RuntimeErrors
    "cudnn": RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    "cublas": RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"),
    # the CUDA runtime's own, e.g. a workspace or context allocation outside torch's allocator
    "cuda runtime": RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be "
                                 "asynchronously reported at some other API call"),
}


def out_of_memory_above(limit: int, forward, sizes: list[int], error=OUT_OF_MEMORY["torch"]):
    """A forward pass that, like a full GPU, fails for batches larger than `limit`."""
    def limited(batch):
        sizes.append(len(batch))
        if len(batch) > limit:
            raise error
        return forward(batch)
    return limited


@pytest.mark.parametrize("kind", list(OUT_OF_MEMORY))
def test_a_batch_the_device_cannot_hold_is_labelled_in_halves(tmp_path, small_state_dict,
                                                               monkeypatch, capsys, kind):
    spec = resolve_model("resnet18", save(tmp_path / "w.pth", small_state_dict),
                         resize=40, crop=32)
    classifier = Classifier(spec, torch.device("cpu"), torch.float32, top_k=3,
                            embeddings=True)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(5))
    whole = classifier.predict(images)
    sizes = []
    monkeypatch.setattr(classifier, "_forward",
                        out_of_memory_above(3, classifier._forward, sizes, OUT_OF_MEMORY[kind]))
    halves = classifier.predict(images)
    assert sizes == [8, 4, 2, 2, 2, 2]  # halved until it fits, then kept at that size
    assert halves.class_ids.tolist() == whole.class_ids.tolist()
    assert np.allclose(halves.scores, whole.scores, atol=1e-5)
    assert np.allclose(halves.embeddings.astype(np.float32), whole.embeddings, atol=1e-2)
    said = capsys.readouterr().err
    assert "cpu ran out of memory with batches of 8: going on with 4" in said
    assert "with batches of 4: going on with 2; --batch-size 2 starts there" in said
    sizes.clear()
    classifier.predict(images)
    assert sizes == [2, 2, 2, 2]  # no more failed attempts


def test_a_single_image_the_device_cannot_hold_ends_the_run_in_one_line(
        tmp_path, small_state_dict, monkeypatch):
    spec = resolve_model("resnet18", save(tmp_path / "w.pth", small_state_dict),
                         resize=40, crop=32)
    classifier = Classifier(spec, torch.device("cpu"), torch.float32, top_k=3)
    monkeypatch.setattr(classifier, "_forward", out_of_memory_above(0, classifier._forward, []))
    with pytest.raises(RunError, match="ran out of memory for a single image: resnet18 at 32x32"):
        classifier.predict(torch.zeros((2, 3, 32, 32), dtype=torch.uint8))


def test_another_runtime_error_of_the_device_is_not_taken_for_memory(tmp_path,
                                                                     small_state_dict,
                                                                     monkeypatch):
    spec = resolve_model("resnet18", save(tmp_path / "w.pth", small_state_dict),
                         resize=40, crop=32)
    classifier = Classifier(spec, torch.device("cpu"), torch.float32, top_k=3)
    monkeypatch.setattr(classifier, "_forward", out_of_memory_above(
        0, classifier._forward, [], RuntimeError("CUDA error: an illegal memory access")))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        classifier.predict(torch.zeros((2, 3, 32, 32), dtype=torch.uint8))
    assert classifier.fits is None


@pytest.mark.parametrize("channels,layout", [("BGR", "NHWC"), ("RGB", "NHWC"), ("BGR", "NCHW")])
def test_a_model_reading_bgr_channels_last_0_255_gets_exactly_that(tmp_path, small_state_dict,
                                                                  channels, layout):
    """What the Preprocess says the model reads, the classifier gives it: colour order, layout
    and pixel range (mean 0, std 1/255: the values 0-255 as they are), no loader special case."""
    spec = resolve_model("resnet18", save(tmp_path / "w.pth", small_state_dict),
                         resize=40, crop=32)
    net = spec.build()
    seen = []

    class Reads(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return net(x.permute(0, 3, 1, 2) if layout == "NHWC" else x)

    preprocess = dataclasses.replace(spec.preprocess, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3,
                                     channels=channels, layout=layout)
    spec = dataclasses.replace(spec, preprocess=preprocess, build=Reads)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    Classifier(spec, torch.device("cpu"), torch.float32, top_k=2).predict(images)
    expected = images.float().flip(1) if channels == "BGR" else images.float()
    if layout == "NHWC":
        expected = expected.permute(0, 2, 3, 1)
    assert seen[0].shape == expected.shape
    assert torch.allclose(seen[0], expected, atol=1e-3)


def test_a_torchvision_named_file_with_another_hash_is_said_before_imagenet_names_go_on_it(
        staged_torch_home, monkeypatch, capfd, tmp_path, small_state_dict):
    """The staged stand-in is seeded, not torchvision's: its hash is not the one its name
    carries. Through the cache or as a path, the run says so; another name says nothing."""
    monkeypatch.setenv("TORCH_HOME", str(staged_torch_home))
    path = next((staged_torch_home / "hub" / "checkpoints").iterdir())
    for weights in ("DEFAULT", str(path)):
        spec = resolve_model("resnet50", weights)
        assert spec.categories[0] == "tench"  # still given, as named
        said = capfd.readouterr().err
        assert f"{path} is named as torchvision's ResNet50_Weights.IMAGENET1K_V2" in said
        assert "does not start with 11ad3fa6" in said and "--labels" in said
    resolve_model("resnet18", save(tmp_path / "mine.pth", small_state_dict))
    assert "is named as" not in capfd.readouterr().err
