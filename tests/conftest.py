"""Shared fixtures: generated images, seeded checkpoints, and ways to call the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch._dynamo
import torchvision
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app

# Measurements of this machine (batch sizes, compiled kernels) go to a cache of the test
# session's own, not the user's; subprocesses inherit it.
os.environ.setdefault("LABEL_IMAGES_CACHE", tempfile.mkdtemp(prefix="label-images-tests-"))

# The colour classes the test checkpoint was fitted to recognise, with their base RGB.
COLOURS = {"red": (210, 45, 40), "green": (50, 190, 70), "blue": (45, 70, 215),
           "grey": (128, 128, 128)}
# Small preprocessing keeps the CPU tests fast; the code path is the same at 256/224.
FAST = ["--resize", "72", "--crop", "64"]
REPO = Path(__file__).resolve().parents[1]


def colour_array(colour: str, width: int, height: int, seed: int) -> np.ndarray:
    """A noisy, shaded image of one colour: easy to classify, never two alike."""
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[colour], dtype=np.float32)
    shade = np.linspace(0.75, 1.15, width, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 18, (height, width, 3)).astype(np.float32)
    return np.clip(base * shade + noise, 0, 255).astype(np.uint8)


def write_colour_images(folder: Path, count: int, *, seed: int = 0,
                        formats: tuple[str, ...] = ("jpg", "png")) -> dict[str, str]:
    """Write `count` images into folder; returns {relative path: colour}."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    truth = {}
    for i in range(count):
        colour = names[(i * 7 + seed) % len(names)]
        width, height = 60 + (i * 13) % 50, 50 + (i * 7) % 40
        fmt = formats[i % len(formats)]
        name = f"img_{i:04d}.{fmt}"
        Image.fromarray(colour_array(colour, width, height, seed * 10_000 + i)).save(
            folder / name, quality=92)
        truth[name] = colour
    return truth


def _fit_colour_head(net: torch.nn.Module, crop: int = 64) -> None:
    """Fit the final layer by least squares on features of generated colour images."""
    names = list(COLOURS)
    images, targets = [], []
    for c, colour in enumerate(names):
        for j in range(12):
            pixels = colour_array(colour, crop, crop, 90_000 + 100 * c + j)
            images.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
            targets.append(c)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    batch = (torch.stack(images) - mean) / std
    head = net.fc
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        features = net(batch)
    net.fc = head
    design = torch.cat([features, torch.ones(len(features), 1)], dim=1)
    # Targets of +/-2 give confident but not saturated probabilities (top-1 around 0.9),
    # so score differences between the pipeline and the reference stay visible.
    onehot = torch.full((len(targets), len(names)), -1.0)
    onehot[torch.arange(len(targets)), torch.tensor(targets)] = 2.0
    solution = torch.linalg.lstsq(design, onehot, driver="gelsd").solution
    with torch.no_grad():
        head.weight.copy_(solution[:-1].T)
        head.bias.copy_(solution[-1])


@pytest.fixture(autouse=True)
def _measured_whatever_the_size(monkeypatch):
    """The tests' jobs are tiny: they measure as a job of a thousand images would (a
    small job's shortcut is tested on its own, test_tuning)."""
    monkeypatch.setenv("LABEL_IMAGES_MEASURE_FROM", "0")


@pytest.fixture(autouse=True)
def _fresh_compiles():
    """Each test compiles afresh. Dynamo counts every graph of a code object (ResNet.forward
    of any instance, freed ones too) and after 8 runs that code eagerly without a word: in
    one test process a later "compiled" test would then be testing eager code."""
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def colour_checkpoint(tmp_path_factory) -> Path:
    """A seeded resnet18 whose 4-class head tells red, green, blue and grey apart."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=len(COLOURS)).eval()
    _fit_colour_head(net)
    path = tmp_path_factory.mktemp("checkpoints") / "colours.pt"
    torch.save({"state_dict": net.state_dict(), "categories": list(COLOURS)}, path)
    return path


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("colours")
    return folder, write_colour_images(folder, 24)


# A run in this process is on --runtime torch unless it names a runtime: `auto` would weigh
# OpenVINO (where installed) and might label one run of a comparison with it and the other
# with torch, which agree within a tolerance, not bit for bit. What tests OpenVINO and auto's
# choice runs in a process of its own, as a user's job does (invoke_subprocess):
# test_runtimes, test_bench, test_parity's OpenVINO rows.
_RUNTIME_FLAGS = ("--runtime", "--compile", "--no-compile")


def invoke(*args: str | os.PathLike):
    """Invoke `label-images` in-process; returns the click Result."""
    args = [str(a) for a in args]
    if args[:1] == ["run"] and not any(a.split("=")[0] in _RUNTIME_FLAGS for a in args):
        args += ["--runtime", "torch"]
    return CliRunner().invoke(app, args, catch_exceptions=False)


@dataclass
class Finished:
    """What a subprocess run of `label-images` left: as click's Result has it."""
    exit_code: int
    output: str  # stderr, then stdout


def invoke_subprocess(*args: str | os.PathLike) -> Finished:
    """Invoke `label-images` in a process of its own (see invoke)."""
    done = run_subprocess(*args)
    return Finished(done.returncode, done.stderr + done.stdout)


@pytest.fixture
def cli():
    return invoke


def run_subprocess(*args: str | os.PathLike, env: dict | None = None, **kwargs):
    """Run `python -m pipeline ...` as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, **kwargs)


def own_mount_namespace() -> bool:
    """Whether a test may mount what it needs (a small /dev/shm, a read-only home) in a
    mount namespace of its own: root and unshare(1)."""
    return (shutil.which("unshare") is not None and os.geteuid() == 0 and subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"]).returncode == 0)


def read_output(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={"key": str, "path": str}, keep_default_na=False,
                           na_values={"error": [""]})
    return pd.read_parquet(path)
