"""`label-images weights list|fetch`: staging torchvision weights for offline machines."""

from __future__ import annotations

import email.message
import hashlib
import io
import urllib.error

import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torchvision.models import get_model_weights, list_models

from pipeline import weights
from tests.conftest import REPO


def test_list_shows_names_classes_accuracy_size_and_cache(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    staged = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"staged")
    result = cli("weights", "list", "--model", "resnet50")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    v2 = next(line for line in lines if "IMAGENET1K_V2" in line)
    assert "(DEFAULT)" in v2 and "1000" in v2 and "80.9" in v2 and "97.8" in v2
    assert v2.rstrip().endswith("yes")  # cached here
    assert not next(line for line in lines if "IMAGENET1K_V1" in line).rstrip().endswith("yes")
    everything = weights.catalogue()
    assert len({row["model"] for row in everything}) > 50


_LIST_AS_A_USER = """
import sys
from pipeline.cli import main
try:
    main()
finally:
    print("torch imported" if "torch" in sys.modules else "no torch", file=sys.stderr)
"""


def test_the_catalogue_is_torchvisions_own_and_read_back_without_torch(tmp_path):
    """`weights list` imported torchvision on every call (8-10 s in issue 44): listed once
    per torchvision version, it is read back from the cache without torch, equal to what
    torchvision enumerates, with `cached` looked up afresh."""
    env = {**os.environ, "LABEL_IMAGES_CACHE": str(tmp_path / "cache"),
           "TORCH_HOME": str(tmp_path / "torch")}
    listed = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _LIST_AS_A_USER, "weights", "list"],
                              cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        listed.append((done.stdout, done.stderr.strip().splitlines()))
    (first, first_said), (second, second_said) = listed
    assert first_said == ["label-images: listing torchvision's weights (once per torchvision "
                          "version) ...", "torch imported"]
    assert second_said == ["no torch"] and second == first
    # the reference: torchvision's own enumeration, every weights of every model once
    expected = {str(w) for name in list_models(module=torchvision.models)
                for w in get_model_weights(name)}
    names = {line.split()[0] for line in first.splitlines()[1:]}
    assert names == expected
    staged = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"staged")
    done = subprocess.run([sys.executable, "-c", _LIST_AS_A_USER, "weights", "list", "--model",
                           "resnet18"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.stderr.strip() == "no torch"
    row = next(line for line in done.stdout.splitlines() if "IMAGENET1K_V1" in line)
    assert row.rstrip().endswith("yes")
    elsewhere = subprocess.run([sys.executable, "-c", _LIST_AS_A_USER, "weights", "list"],
                               cwd=REPO, env={**env, "TORCH_HOME": str(tmp_path / "other")},
                               capture_output=True, text=True)
    assert elsewhere.stderr.strip().endswith("torch imported")  # another hub: listed again


def test_fetch_without_network_is_one_line_and_exit_1(cli, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = cli("weights", "fetch", "--model", "resnet18", "--to", tmp_path)
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "Name or service not known" in result.output
    assert list(tmp_path.iterdir()) == []


class Response(io.BytesIO):
    """What urlopen returns, as much of it as torch.hub's download reads."""

    def info(self):
        headers = email.message.Message()
        headers["Content-Length"] = str(len(self.getvalue()))
        return headers


@pytest.mark.parametrize("hash_ok", [False, True])
def test_fetch_verifies_the_hash_and_says_what_to_pass(cli, tmp_path, monkeypatch, hash_ok):
    """torch.hub's own download checks the sha256 prefix in torchvision's file name."""
    monkeypatch.setattr(torch.hub, "urlopen", lambda request: Response(b"weights"))
    if hash_ok:  # pretend the bytes hash to what the file name says: the check itself is real
        real_sha256 = hashlib.sha256

        class Digest:
            def __init__(self):
                self.real = real_sha256()

            def update(self, data):
                self.real.update(data)

            def hexdigest(self):
                return "f37072fd" + self.real.hexdigest()[8:]

        monkeypatch.setattr(torch.hub.hashlib, "sha256", Digest)
    result = cli("weights", "fetch", "--model", "resnet18", "--to", tmp_path)
    target = tmp_path / "resnet18-f37072fd.pth"
    if not hash_ok:
        assert result.exit_code == 1 and "arrived damaged" in result.output
        assert list(tmp_path.iterdir()) == []
    else:
        assert result.exit_code == 0, result.output
        assert target.read_bytes() == b"weights"
        assert f"--model resnet18 --weights /path/to/{target.name}" in result.output
