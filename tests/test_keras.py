"""Keras models (`--model keras:PATH`): the transfer-learning recipe's model labelled as the
recipe's own loop labels it (cv2.imread, cv2.resize, model.predict, one image at a time)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import read_output
from tests.photos import photo

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
cv2 = pytest.importorskip("cv2")

# Keras 3.15 on torch hands numpy tensors without the copy keyword numpy 2 asks for: its
# own DeprecationWarning, on saving and on predict; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIDE = 180
# From 64 px to 4000, odd aspect ratios among them (the recipe squeezes them whole)
SIZES = [(64, 64), (100, 37), (37, 100), (180, 180), (333, 1000), (640, 480), (1600, 300),
         (2048, 1536), (4000, 3000)]
# fp32 both sides; what differs is the resize's arithmetic (cv2 in fixed point, ours in
# float) and the JPEG decoder's build: measured at most ~1e-3 here on the recipe's head
TOLERANCE = 5e-3
CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The recipe's model, weights=None and seeded: ResNet50 without its top at 180x180,
    average pooling, Flatten, Dense 512 relu, Dense 5 softmax; saved as .keras and .h5."""
    keras.utils.set_random_seed(4)
    base = keras.applications.ResNet50(include_top=False, input_shape=(SIDE, SIDE, 3),
                                       pooling="avg", weights=None)
    base.trainable = False
    model = keras.Sequential([base, keras.layers.Flatten(),
                              keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(5, activation="softmax")])
    folder = tmp_path_factory.mktemp("keras")
    model.save(folder / "flowers.keras")
    model.save(folder / "flowers.h5")
    return folder, model


def reference(paths, model):
    """The recipe's inference loop, one image at a time."""
    found = []
    for path in paths:
        image = cv2.resize(cv2.imread(str(path)), (SIDE, SIDE))
        probs = model.predict(image[np.newaxis].astype("float32"), verbose=0)[0]
        found.append((int(np.argmax(probs)), float(np.max(probs))))
    return found


# The legacy .h5 file on three of the sizes: the same model, read another way
@pytest.mark.parametrize("suffix,sizes", [(".keras", SIZES), (".h5", SIZES[2:8:2])],
                         ids=[".keras", ".h5"])
def test_the_recipes_model_labels_as_the_recipes_loop(cli, tmp_path, recipe, suffix, sizes):
    folder, model = recipe
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (width, height) in enumerate(sizes):
        photo(width, height, seed=80 + i).save(photos / f"{width}x{height}.jpg", quality=92)
    training = tmp_path / "flower_photos"  # what image_dataset_from_directory was given
    for name in reversed(CLASSES):
        (training / name).mkdir(parents=True)
    done = cli("run", photos, "--out", tmp_path / "run", "--model",
               f"keras:{folder / f'flowers{suffix}'}", "--labels", training, "--top-k", "2",
               "--batch-size", "4", "--workers", "0", "-q")
    assert done.exit_code == 0, done.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    expected = reference([photos / key for key in table["key"]], model)
    # the scores are the model's softmax, not a softmax of it: they sum to 1 over 5 classes
    assert all(0.99 < sum(s) <= 1.0 + 1e-5 or len(s) < 5 for s in table["scores"])
    for key, label, score, (index, ref_score) in zip(table["key"], table["top1_label"],
                                                     table["top1_score"], expected):
        assert label == CLASSES[index], key  # alphabetical folder order, as Keras numbers
        assert abs(score - ref_score) <= TOLERANCE, (key, score, ref_score)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    preprocess = record["fingerprint"]["preprocess"]
    assert preprocess["resize"] is None and preprocess["crop"] == SIDE
    assert preprocess["channels"] == "BGR" and preprocess["layout"] == "NHWC"
    assert record["fingerprint"]["weights"].startswith("sha256:")
    assert record["backend"]["library"] == "keras"


def test_a_changed_keras_file_is_refused_on_resume(cli, tmp_path, recipe):
    folder, _ = recipe
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(200, 150, seed=1).save(photos / "a.jpg")
    copy = tmp_path / "model.keras"
    copy.write_bytes((folder / "flowers.keras").read_bytes())
    assert cli("run", photos, "--out", tmp_path / "run", "--model", f"keras:{copy}",
               "--workers", "0", "--batch-size", "1", "-q").exit_code == 0
    keras.utils.set_random_seed(5)
    model = keras.saving.load_model(copy)
    model.layers[-1].kernel.assign(model.layers[-1].kernel * 2)
    model.save(copy)
    again = cli("run", photos, "--out", tmp_path / "run", "--model", f"keras:{copy}",
                "--workers", "0", "--batch-size", "1", "-q")
    assert again.exit_code == 2 and "weights (changed)" in again.output, again.output


def test_keras_files_that_are_not_image_classifiers_are_one_line(cli, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(64, 64, seed=1).save(photos / "a.jpg")
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    sigmoid = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                                keras.layers.Dense(3, activation="sigmoid")])
    sigmoid.save(tmp_path / "sigmoid.keras")
    tabular = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3)])
    tabular.save(tmp_path / "tabular.keras")
    cases = {corrupt: "cannot be loaded as a Keras model",
             tmp_path / "sigmoid.keras": "is not a classifier: its last layer's activation is "
                                         "sigmoid",
             tmp_path / "tabular.keras": "does not take images: its input is (None, 10)"}
    for path, message in cases.items():
        done = cli("run", photos, "--out", tmp_path / "run", "--model", f"keras:{path}", "-q")
        assert done.exit_code == 2 and message in done.output, done.output
        assert len(done.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_model_with_a_non_square_input_is_fed_the_whole_image_at_its_height_and_width(
        cli, tmp_path):
    """An input of 48 high by 80 wide: cv2.resize(image, (80, 48)) in the recipe's loop."""
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((48, 80, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(8, 5, activation="relu"),
                              keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
                              keras.layers.Flatten(),
                              keras.layers.Dense(4, activation="softmax")])
    model.save(tmp_path / "wide.keras")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (width, height) in enumerate([(80, 48), (48, 80), (640, 480), (300, 1600),
                                         (2048, 1536)]):
        photo(width, height, seed=90 + i).save(photos / f"{width}x{height}.jpg", quality=92)
    done = cli("run", photos, "--out", tmp_path / "run", "--model",
               f"keras:{tmp_path / 'wide.keras'}", "--top-k", "1", "--batch-size", "2",
               "--workers", "0", "-q")
    assert done.exit_code == 0, done.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    for key, label, score in zip(table["key"], table["top1_label"], table["top1_score"]):
        image = cv2.resize(cv2.imread(str(photos / key)), (80, 48))  # (width, height)
        probs = model.predict(image[np.newaxis].astype("float32"), verbose=0)[0]
        assert label == str(int(np.argmax(probs))), key
        assert abs(score - float(np.max(probs))) <= TOLERANCE, key
    preprocess = json.loads((tmp_path / "run" / "run.json").read_text())[
        "fingerprint"]["preprocess"]
    assert (preprocess["crop_height"], preprocess["crop"]) == (48, 80)
    refused = cli("run", photos, "--out", tmp_path / "other", "--model",
                  f"keras:{tmp_path / 'wide.keras'}", "--resize", "60", "-q")
    assert refused.exit_code == 2
    assert "--resize 60 centre-crops a square, and this model takes 80x48 images" in \
        refused.output


def test_the_model_runs_where_the_job_says_not_where_keras_would_put_it(recipe, monkeypatch):
    """On a GPU host Keras puts variables and inputs on CUDA whatever the job's device; here
    Keras' default is made the meta device (a stand-in for "elsewhere"), and the job's CPU
    must still hold every variable and get the recipe's numbers."""
    import torch

    from keras.src.backend.torch import core
    from pipeline.backends.keras import KerasBackend

    folder, model = recipe
    image = np.random.default_rng(3).uniform(0, 255, (2, SIDE, SIDE, 3)).astype("float32")
    expected = model.predict(image, verbose=0)
    monkeypatch.setattr(core, "DEFAULT_DEVICE", "meta")
    spec = KerasBackend().resolve(str(folder / "flowers.keras"), "DEFAULT")
    net = spec.build().to(device=torch.device("cpu"), dtype=torch.float32,
                          memory_format=torch.channels_last)
    assert {v._value.device.type for v in net._keras.variables} == {"cpu"}
    with torch.inference_mode():
        found = net(torch.from_numpy(image))
    assert found.device.type == "cpu"
    np.testing.assert_allclose(found.exp().numpy(), expected, atol=1e-5)
