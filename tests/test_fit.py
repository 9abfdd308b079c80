"""From people's answers to a better model (issue 47): `fit` trains a head on the run's
embeddings for the team's own classes, checked on held-out answers; the checkpoint loads
with the tutorials' own code; `relabel` from the stored embeddings equals a full run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from pipeline import fit as fitting
from pipeline.review.base import REVIEW_SCHEMA
from pipeline.review.reviews import record
from tests.conftest import FAST, colour_array, read_output

# The team's classes are a grouping of what the colour model tells apart: its labels
# (red, green, blue, grey) never name them, so it agrees with people on none.
TEAM = {"warm": ["red"], "cool": ["green", "blue"], "neutral": ["grey"]}
RUN = ["--model", "resnet18", "--top-k", "2", "--workers", "0", "--batch-size", "8",
       "--quiet", "--runtime", "torch", *FAST]


@pytest.fixture(scope="module")
def team_photos(tmp_path_factory):
    """12 images a class, in a folder per class (the recipe's layout)."""
    folder = tmp_path_factory.mktemp("team")
    truth = {}
    for team, colours in TEAM.items():
        (folder / team).mkdir()
        for i in range(12):
            colour = colours[i % len(colours)]
            name = f"{team}/{colour}_{i:02d}.png"
            seed = 100 * list(TEAM).index(team) + i
            Image.fromarray(colour_array(colour, 60 + 3 * i, 50 + 2 * i, seed=seed)).save(
                folder / name)
            truth[name] = team
    return folder, truth


@pytest.fixture(scope="module")
def labelled(team_photos, colour_checkpoint, tmp_path_factory):
    """A run over the team's photos with --embeddings (the colour model's labels)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    folder, truth = team_photos
    out = tmp_path_factory.mktemp("runs") / "colours"
    done = CliRunner().invoke(app, ["run", str(folder), "--out", str(out), "--weights",
                                    str(colour_checkpoint), "--embeddings", *RUN])
    assert done.exit_code == 0, done.output
    return out


def _answers(out, truth: dict[str, str], keys) -> None:
    """People's answers for `keys`, as the run's only reviews."""
    (out / "reviews.parquet").unlink(missing_ok=True)
    n = len(keys)
    record(str(out), [pa.table({
        "key": list(keys), "label": [truth[k] for k in keys], "reviewer": ["ann"] * n,
        "reviewed_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
        "tool": ["label-studio"] * n, "path": pa.nulls(n, pa.string())}, schema=REVIEW_SCHEMA)])


def test_a_head_fitted_on_answers_beats_the_model_and_loads_as_the_tutorials_do(
        cli, tmp_path, team_photos, labelled, colour_checkpoint):
    folder, truth = team_photos
    answered = sorted(truth)[::2]  # people answered half of the photos
    _answers(labelled, truth, answered)
    head = tmp_path / "head.pt"
    done = cli("fit", labelled, "--to", head)
    assert done.exit_code == 0, done.output
    figures = json.loads((labelled / "fit.json").read_text())
    assert figures["answers"] == len(answered) and figures["classes"] == sorted(TEAM)
    assert figures["model_agreement"] == 0.0  # its labels are colours, not the team's
    chosen = figures["held_out_accuracy"][figures["head"]]
    assert chosen >= 0.9, figures
    assert "the current model agrees on 0.0%" in done.output
    assert {c["label"]: c["answers"] for c in figures["per_class"]} == {
        "cool": 6, "neutral": 6, "warm": 6}
    # the tutorials' own loading: torchvision's model, its fc replaced, load_state_dict
    checkpoint = torch.load(head, map_location="cpu", weights_only=True)
    net = torchvision.models.resnet18()
    net.fc = (torch.nn.Linear(512, 3) if figures["head"] == "linear" else torch.nn.Sequential(
        torch.nn.Linear(512, fitting.HIDDEN), torch.nn.ReLU(), torch.nn.Linear(fitting.HIDDEN, 3)))
    net.load_state_dict(checkpoint["state_dict"])
    net.eval()
    loop = transforms.Compose([transforms.Resize(72), transforms.CenterCrop(64),
                               transforms.ToTensor(),
                               transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        by_tutorial = {k: checkpoint["categories"][int(net(loop(
            Image.open(folder / k).convert("RGB"))[None]).argmax())] for k in truth}
    # a full run with the fitted checkpoint, and relabel from the stored embeddings
    full = tmp_path / "full"
    assert cli("run", folder, "--out", full, "--weights", head, "--embeddings",
               *RUN).exit_code == 0
    again = tmp_path / "relabelled"
    relabelled = cli("relabel", labelled, "--weights", head, "--out", again)
    assert relabelled.exit_code == 0, relabelled.output
    assert "rows relabelled in" in relabelled.output and "rows/s" in relabelled.output
    by_run = read_output(full / "labels.parquet").set_index("key")
    by_relabel = read_output(again / "labels.parquet").set_index("key")
    assert by_run["top1_label"].to_dict() == by_tutorial
    assert by_relabel["top1_label"].to_dict() == by_tutorial
    assert np.mean([by_tutorial[k] == truth[k] for k in truth]) >= 0.9
    # bf16 on this CPU for the run, float32 for relabel: within the fidelity tolerance
    assert by_relabel["top1_score"].to_numpy() == pytest.approx(
        by_run.loc[by_relabel.index, "top1_score"].to_numpy(), abs=2e-2)
    assert [list(x) for x in by_relabel["labels"]] == [list(x) for x in by_run.loc[
        by_relabel.index, "labels"]]
    # the relabelled table is a run directory the report reads
    report = cli("report", again)
    assert report.exit_code == 0 and "36 images: 36 ok" in report.output


@pytest.mark.parametrize("table_format", ["parquet", "delta", "iceberg"])
def test_relabel_writes_a_table_format_run_as_one_new_version(
        cli, tmp_path, team_photos, colour_checkpoint, table_format):
    """A Delta or Iceberg run relabelled: NEW holds a table of the same format, written in
    one commit, whose labels are a full run's with the fitted checkpoint; an error row (no
    embedding) stays an error row."""
    import shutil

    pytest.importorskip({"parquet": "pyarrow", "delta": "deltalake"}.get(table_format,
                                                                         "pyiceberg"))
    team, truth = team_photos
    folder = tmp_path / "photos"
    shutil.copytree(team, folder)
    (folder / "warm" / "broken.jpg").write_bytes(b"\xff\xd8 not a photo")
    out = tmp_path / "lake"
    done = cli("run", folder, "--out", out, "--weights", colour_checkpoint, "--embeddings",
               "--format", table_format, *RUN)
    assert done.exit_code == 0, done.output
    _answers(out, truth, sorted(truth)[::2])
    head = tmp_path / "head.pt"
    assert cli("fit", out, "--to", head).exit_code == 0
    new = tmp_path / "relabelled"
    relabelled = cli("relabel", out, "--weights", head, "--out", new)
    assert relabelled.exit_code == 0, relabelled.output
    if table_format == "parquet":
        rows = read_output(new / "labels.parquet")
    elif table_format == "delta":
        import deltalake

        table = deltalake.DeltaTable(str(new / "labels.delta"))
        assert table.version() == 0  # one commit
        rows = table.to_pyarrow_table().to_pandas()
        assert f"-> {new / 'labels.delta'}" in relabelled.output
    else:
        from tests.test_tables import iceberg_table

        table = iceberg_table(new)
        assert len(table.snapshots()) == 1  # one commit
        rows = table.scan().to_arrow().to_pandas()
    reference = tmp_path / "full"
    assert cli("run", folder, "--out", reference, "--weights", head, *RUN).exit_code == 0
    expected = read_output(reference / "labels.parquet").set_index("key")
    found = rows.set_index("key")
    assert found["top1_label"].dropna().to_dict() == expected["top1_label"].dropna().to_dict()
    assert set(expected["top1_label"].dropna()) <= set(TEAM) and len(rows) == len(truth) + 1
    assert found.loc["warm/broken.jpg", "status"] == "error"
    assert found["top1_label"].isna().sum() == 1
    report = cli("report", new)  # a run directory the report reads, in its format
    assert report.exit_code == 0 and f"{len(truth) + 1} images: {len(truth)} ok" in report.output
    again = cli("relabel", out, "--weights", head, "--out", new)
    assert again.exit_code == 2 and "holds a table already" in again.output


def test_a_head_worse_than_the_model_is_refused_with_the_figures(
        cli, tmp_path, team_photos, labelled, monkeypatch):
    """People who answer with the model's own classes: it agrees on all of them; a head
    that learns nothing (no training here) is refused, nothing written."""
    folder, truth = team_photos
    table = read_output(labelled / "labels.parquet")
    own = dict(zip(table["key"], table["top1_label"]))
    _answers(labelled, own, sorted(own)[:16])
    monkeypatch.setattr(fitting, "EPOCHS", 0)
    refused = cli("fit", labelled, "--to", tmp_path / "head.pt")
    assert refused.exit_code == 1
    line = refused.output.strip().splitlines()[-1]
    assert "refused: the new head's top-1 accuracy on held-out answers is" in line
    assert "below the current model's agreement with them (100.0%)" in line
    assert not (tmp_path / "head.pt").exists()
    assert json.loads((labelled / "fit.json").read_text())["refused"]


def test_fit_on_the_folders_names_and_its_refusals(cli, tmp_path, labelled):
    done = cli("fit", labelled, "--labels", "folders", "--to", tmp_path / "head.pt")
    assert done.exit_code == 0, done.output
    assert json.loads((labelled / "fit.json").read_text())["answers"] == 36
    wrong = cli("fit", labelled, "--labels", "tags")
    assert wrong.exit_code == 2 and "--labels must be one of" in wrong.output


def test_the_spread_review_list_covers_the_classes_not_near_copies(cli, tmp_path,
                                                                   team_photos, labelled):
    """Issue 47: a review list for the next fit. Among 36 uncertain images (12 red, 6
    green, 6 blue, 12 grey), four picked by k-center over the embeddings are one of each
    colour; the four lowest-scored are not chosen for that."""
    folder, _ = team_photos
    tasks = tmp_path / "tasks.json"
    done = cli("export", labelled, "--to", "label-studio", "--rows", "spread", "--below",
               "1.01", "--limit", "4", "--file", tasks, "--local-files-root", folder)
    assert done.exit_code == 0, done.output
    keys = [t["data"]["key"] for t in json.loads(tasks.read_text())]
    colours = {key.split("/")[1].split("_")[0] for key in keys}
    assert len(keys) == 4 and colours == {"red", "green", "blue", "grey"}, keys
    # the first pick is the lowest-scored row, as the plain review list's first
    lowest = tmp_path / "lowest.json"
    assert cli("export", labelled, "--to", "label-studio", "--below", "1.01", "--limit", "1",
               "--file", lowest, "--local-files-root", folder).exit_code == 0
    assert json.loads(lowest.read_text())[0]["data"]["key"] == keys[0]

def test_spread_and_fit_need_embeddings(cli, tmp_path, team_photos, colour_checkpoint):
    folder, _ = team_photos
    plain = tmp_path / "plain"
    assert cli("run", folder, "--out", plain, "--weights", colour_checkpoint,
               *RUN).exit_code == 0
    spread = cli("export", plain, "--to", "label-studio", "--rows", "spread", "--below",
                 "1.01", "--file", tmp_path / "x.json")
    assert spread.exit_code == 2 and "label it with --embeddings" in spread.output
    fitted = cli("fit", plain, "--labels", "folders")
    assert fitted.exit_code == 2 and "has no embeddings" in fitted.output


def test_a_night_takes_the_fitted_head_relabelling_its_table_from_the_embeddings(
        cli, tmp_path, team_photos, colour_checkpoint, monkeypatch):
    """Issue 47, nights use it: a nightly table, people's answers, fit; the next night with
    --weights HEAD relabels the table from its embeddings (no image decoded: only the new
    images reach the labeller) and equals a night from scratch with the head."""
    import shutil

    from pipeline import labeller

    folder, truth = team_photos
    photos = tmp_path / "photos"
    shutil.copytree(folder, photos)
    out = tmp_path / "nightly"
    night = ["run", photos, "--out", out, "--embeddings", "--incremental", *RUN]
    assert cli(*night, "--weights", colour_checkpoint).exit_code == 0
    _answers(out, truth, sorted(truth)[::2])
    # a night with nothing new still measures the table against the answers so far
    assert cli(*night, "--weights", colour_checkpoint).exit_code == 0
    head = tmp_path / "head.pt"
    assert cli("fit", out, "--to", head).exit_code == 0
    Image.fromarray(colour_array("red", 64, 64, seed=900)).save(photos / "warm" / "new_red.png")
    Image.fromarray(colour_array("green", 64, 64, seed=901)).save(photos / "cool" / "new.png")
    labelled = []
    real_label = labeller.label
    monkeypatch.setattr(labeller, "label", lambda run_dir, job, plan, *a, **k: (
        labelled.append(plan.num_items), real_label(run_dir, job, plan, *a, **k))[1])
    taken = cli(*[a for a in night if a != "--quiet"], "--weights", head)
    assert taken.exit_code == 0, taken.output
    assert labelled == [2]  # the two new images; the 36 others from their embeddings
    assert "the table's 36 rows take the fitted head" in taken.output
    record = json.loads((out / "run.json").read_text())
    assert record["fit"]["answers"] == 18 and record["backbone"].startswith("sha256:")
    table = read_output(out / "labels.parquet").set_index("key")
    assert set(table["top1_label"]) <= set(TEAM)
    scratch = tmp_path / "scratch"
    assert cli("run", photos, "--out", scratch, "--embeddings", "--incremental", *RUN,
               "--weights", head).exit_code == 0
    reference = read_output(scratch / "labels.parquet").set_index("key")
    assert table["top1_label"].to_dict() == reference["top1_label"].to_dict()
    assert table["top1_score"].to_numpy() == pytest.approx(
        reference.loc[table.index, "top1_score"].to_numpy(), abs=2e-2)
    # the next night: nothing changed, nothing to do, with the head
    again = cli(*night, "--weights", head)
    assert again.exit_code == 0 and "nothing to do" in again.output
    # agreement with people night over night: the colour model named none of the team's
    # classes; the fitted head agrees on the answers (every night: all answers so far)
    history = json.loads((out / "agreement.json").read_text())["entries"]
    assert [e["when"] for e in history] == ["night"] * 3
    assert [e["reviewed"] for e in history] == [18, 18, 18]
    assert history[0]["top1_agreement"] == 0 and history[0]["model"].startswith("resnet18 ")
    assert [e["model"] for e in history[1:]] == ["head fitted on 18 answers"] * 2
    assert all(e["top1_agreement"] >= 0.9 for e in history[1:])
    shown = cli("report", out, "--html", tmp_path / "report.html")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    at = lines.index("agreement with people, night by night (reviewed, top-1, top-k, model):")
    assert [line.split()[-1] for line in lines[at + 1:at + 4]] == ["colours.pt", "answers",
                                                                  "answers"]
    assert 'id="agreement-history"' in (tmp_path / "report.html").read_text()
