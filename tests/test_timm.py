"""timm models on the model seam: labels as timm's own eval transform and a plain loop give."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from tests.conftest import read_output, run_subprocess, write_colour_images

timm = pytest.importorskip("timm")

SIZES = [(500, 375), (512, 512), (1365, 1024), (2048, 1536)]


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    """A seeded timm resnet18 of 10 classes, saved as timm's training saves it (with EMA);
    its head scaled so that scores react to small pixel changes."""
    torch.manual_seed(3)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        net.fc.weight.mul_(10)
    path = tmp_path_factory.mktemp("timm") / "checkpoint-9.pth.tar"
    torch.save({"epoch": 9, "state_dict": {k: torch.zeros_like(v)
                                           for k, v in net.state_dict().items()},
                "state_dict_ema": net.state_dict()}, path)
    return path


def reference(paths, checkpoint, transform=None):
    """The plain loop from timm's own pieces: resolve_data_config + create_transform."""
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    net.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict_ema"])
    net.eval()
    transform = transform or timm.data.create_transform(
        **timm.data.resolve_data_config({}, model=net))
    results = []
    with torch.no_grad():
        for path in paths:
            probs = net(transform(Image.open(path).convert("RGB")).unsqueeze(0)).softmax(1)[0]
            score, index = probs.max(0)
            results.append((str(int(index)), float(score)))
    return results


def test_a_timm_checkpoint_gives_the_plain_loops_labels(cli, tmp_path, timm_checkpoint):
    from tests.photos import photo

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, size in enumerate(SIZES):
        photo(*size, seed=60 + i).save(folder / f"{size[0]}x{size[1]}.jpg", quality=90)
    result = cli("run", folder, "--out", tmp_path / "run", "--model", "timm:resnet18",
                 "--weights", timm_checkpoint, "--precision", "fp32", "--top-k", "2",
                 "--batch-size", "4", "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    paths = [folder / key for key in table["key"]]
    expected = reference(paths, timm_checkpoint)
    # The checkpoint tells preprocessings apart: torchvision's default recipe (256,
    # bilinear) instead of timm's (235, bicubic) moves the scores well past the tolerance.
    tutorials = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    other = reference(paths, timm_checkpoint, tutorials)
    assert max(abs(a[1] - b[1]) for a, b in zip(expected, other)) > 5 * 2e-3
    for key, label, score, (ref_label, ref_score) in zip(
            table["key"], table["top1_label"], table["top1_score"], expected):
        assert label == ref_label, key
        assert abs(score - ref_score) <= 2e-3, (key, score, ref_score)
    record = (tmp_path / "run" / "run.json").read_text()
    assert '"interpolation": "bicubic"' in record and '"resize": 235' in record  # timm's own
    # the library that built the network is recorded with its version
    assert json.loads(record)["backend"] == {"library": "timm", "version": timm.__version__}


def test_pretrained_timm_weights_offline_are_one_line_never_random(tmp_path):
    write_colour_images(tmp_path / "imgs", 2)
    done = run_subprocess("run", tmp_path / "imgs", "--out", tmp_path / "run", "--model",
                          "timm:resnet18.a1_in1k", env={"HF_HUB_OFFLINE": "1",
                                                        "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in done.stderr
    assert not (tmp_path / "run").exists()


def test_an_unreachable_hub_fails_at_once_in_one_whole_line(tmp_path):
    """Without HF_HUB_OFFLINE, huggingface_hub retried for ~45 s and 24 lines; the hub is
    now probed first. The endpoint is a closed port on loopback: refused, on any network."""
    write_colour_images(tmp_path / "imgs", 2)
    done = run_subprocess("run", tmp_path / "imgs", "--out", tmp_path / "run", "--model",
                          "timm:resnet18.a1_in1k", env={"HF_ENDPOINT": "http://127.0.0.1:9",
                                                        "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 2, done.stderr
    line, = done.stderr.strip().splitlines()
    assert "not in the Hugging Face cache and 127.0.0.1 cannot be reached" in line
    assert "`label-images weights fetch --model timm:resnet18.a1_in1k`" in line
    assert line.endswith("or pass --weights FILE")  # whole, not cut off mid-sentence


def test_pretrained_weights_in_the_hugging_face_cache_are_used_without_the_hub(tmp_path):
    """Staged as `hf download` leaves them: the run loads the cached file, asks nothing of the
    hub (its endpoint is a closed port), and labels with those weights."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    net = timm.create_model("resnet18", pretrained=False).eval()
    with torch.no_grad():
        net.fc.bias.zero_()
        net.fc.bias[207] = 50.0  # these weights call everything class 207
    snapshot = (tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" /
                "0123abc")
    snapshot.mkdir(parents=True)
    save_file(net.state_dict(), snapshot / "model.safetensors")
    (tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text(
        "0123abc")
    write_colour_images(tmp_path / "imgs", 2)
    done = run_subprocess("run", tmp_path / "imgs", "--out", tmp_path / "run", "--model",
                          "timm:resnet18.a1_in1k", "--workers", "0", "--batch-size", "2",
                          "--resize", "72", "--crop", "64", "-q",
                          env={"HF_ENDPOINT": "http://127.0.0.1:9",
                               "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 0, done.stderr
    table = read_output(tmp_path / "run" / "labels.parquet")
    assert set(table["class_ids"].map(lambda ids: ids[0])) == {207}
    assert "Downloading" not in done.stdout + done.stderr


def test_weights_list_shows_timms_pretrained_names(cli):
    result = cli("weights", "list", "--model", "timm:resnet18")
    assert result.exit_code == 0, result.output
    assert "timm:resnet18.a1_in1k" in result.output
