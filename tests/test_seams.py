"""Each seam takes a new kind from this file alone: a runtime, an engine, a model backend, an
output format with an option of its own, a source and a review tool with options of its own
are defined here, registered with one line each (as a module's registry line would), and a
real job runs through each through the command line. Nothing in pipeline/ names them."""

from __future__ import annotations

import gzip
import json
import zipfile

import pyarrow as pa
import torch
from torch import nn

from pipeline import engines, formats, labeller, review, runtimes, sources
from pipeline.backends import BACKENDS, Backend, ModelSpec
from pipeline.engines.base import Engine
from pipeline.job import prepare
from pipeline.formats.base import Format
from pipeline.options import Option, declared
from pipeline.preprocess import Preprocess
from pipeline.runtimes.base import Runtime
from pipeline.sources.base import Source
from tests.conftest import COLOURS, FAST, read_output, write_colour_images

RUN = ["--model", "resnet18", "--top-k", "2", "--workers", "0", "--batch-size", "4",
       "--quiet", *FAST]


def resolved(out) -> dict:
    return json.loads((out / "run.json").read_text())["resolved"]


def assert_labelled(out, truth: dict[str, str], table: str = "labels.parquet") -> None:
    found = read_output(out / table)
    assert dict(zip(found["key"], found["top1_label"])) == truth


class Exported(Runtime):
    """torch.export of the eager network (any batch size), run as the graph it exports."""

    name = "exported"
    prepared: list = []

    def prepare(self, classifier, preparing=runtimes.Preparing()):
        h, w = classifier.spec.preprocess.size
        example = torch.zeros(2, 3, h, w, dtype=classifier.dtype)
        batch = torch.export.Dim("batch", min=1, max=4096)
        graph = torch.export.export(classifier.eager_net, (example,),
                                    dynamic_shapes=({0: batch},)).module()
        classifier.use_network(graph, self.name, speed_key=self.name)  # its speed is its own
        Exported.prepared.append(type(graph).__name__)
        return {"exported": {"example_batch": 2}}


def test_a_runtime_registered_here_runs_a_job(cli, tmp_path, colour_checkpoint, monkeypatch):
    monkeypatch.setitem(runtimes.RUNTIMES, "exported", Exported())  # the registry line
    Exported.prepared = []
    truth = write_colour_images(tmp_path / "imgs", 6)
    result = cli("run", tmp_path / "imgs", "--out", tmp_path / "run", "--weights",
                 colour_checkpoint, "--runtime", "exported", *RUN)
    assert result.exit_code == 0, result.output
    assert_labelled(tmp_path / "run", truth)
    chosen = resolved(tmp_path / "run")
    assert chosen["runtime"] == "exported"
    assert chosen["measured"]["exported"]["example_batch"] == 2
    assert Exported.prepared == ["GraphModule"]  # prepared once, then run
    # what it does not offer is refused in one line, before any work
    refused = cli("run", tmp_path / "imgs", "--out", tmp_path / "other", "--weights",
                  colour_checkpoint, "--runtime", "exported", "--precision", "int8", *RUN)
    assert refused.exit_code == 2 and "--precision int8 runs on --runtime" in refused.output
    assert not (tmp_path / "other").exists()


class Backwards(Engine):
    """Labels the shards in this process one at a time, last first, or as --option order
    says: an engine only decides where (and here in which order) each shard is labelled."""

    name = "backwards"
    options = (Option("order", str, "last-first or first-first"),)
    order: list[int] = []

    def label(self, run_dir, job, plan, shards, summary, progress):
        order = job.config.options.get("order", "last-first")
        for shard in (reversed(shards) if order == "last-first" else shards):
            Backwards.order.append(shard)
            labeller.label(run_dir, job, plan, summary, progress, [shard])


def test_an_engine_registered_here_runs_a_job(cli, tmp_path, colour_checkpoint, monkeypatch):
    monkeypatch.setitem(engines.ENGINES, "backwards", Backwards())  # the registry line
    Backwards.order = []
    truth = write_colour_images(tmp_path / "imgs", 7)
    result = cli("run", tmp_path / "imgs", "--out", tmp_path / "run", "--weights",
                 colour_checkpoint, "--engine", "backwards", "--shard-size", "3", *RUN)
    assert result.exit_code == 0, result.output
    assert Backwards.order == [2, 1, 0]
    assert_labelled(tmp_path / "run", truth)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["items"] == 7 and summary["labelled_now"] == 7  # the one summary
    # its option, from the command line; one it does not declare is refused by name
    Backwards.order = []
    again = cli("run", tmp_path / "imgs", "--out", tmp_path / "forwards", "--weights",
                colour_checkpoint, "--engine", "backwards", "--shard-size", "3",
                "--option", "order=first-first", *RUN)
    assert again.exit_code == 0, again.output
    assert Backwards.order == [0, 1, 2]
    wrong = cli("run", tmp_path / "imgs", "--out", tmp_path / "wrong", "--weights",
                colour_checkpoint, "--engine", "backwards", "--option", "sideways=1", *RUN)
    assert wrong.exit_code == 2
    assert "--option sideways: none of this run's kinds" in wrong.output
    assert "engine backwards: order" in wrong.output


class Handing(Engine):
    """Labels none of the shards itself: hands them to a labeller of its own, prepared as a
    worker prepares one (as Ray's actors are)."""

    name = "handing"
    labels_here = False
    driver_net: object = "not looked at"

    def label(self, run_dir, job, plan, shards, summary, progress):
        Handing.driver_net = job.classifier.net
        worker = prepare(job.config, job.part)
        worker.decide(run_dir.store)
        labeller.label(run_dir, worker, plan, summary, progress, shards)


def test_an_engine_that_labels_elsewhere_finds_the_drivers_model_released(
        cli, tmp_path, colour_checkpoint, monkeypatch):
    """A driver that hands the labelling out keeps no model (on a GPU, no memory its workers
    may need) once the settings are recorded."""
    monkeypatch.setitem(engines.ENGINES, "handing", Handing())
    truth = write_colour_images(tmp_path / "imgs", 5)
    result = cli("run", tmp_path / "imgs", "--out", tmp_path / "run", "--weights",
                 colour_checkpoint, "--engine", "handing", *RUN)
    assert result.exit_code == 0, result.output
    assert Handing.driver_net is None
    assert_labelled(tmp_path / "run", truth)


class Centroids(Backend):
    """`centroids:colours`: the mean colour of the crop, nearest of four centroids (a
    linear layer: -|x - c|^2 = 2 x.c - |c|^2 + const)."""

    prefix = "centroids:"
    library = "torch"
    options = (Option("centres", str, "the colours to tell apart, comma-separated"),)

    def __init__(self, centres: str | None = None):
        self.centres = centres

    def configured(self, options):
        return Centroids(options.get("centres"))

    def resolve(self, model, weights):
        names = tuple(self.centres.split(",") if self.centres else COLOURS)
        centres = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32) / 255

        def build() -> nn.Module:
            head = nn.Linear(3, len(names))
            with torch.no_grad():
                head.weight.copy_(2 * centres)
                head.bias.copy_(-(centres ** 2).sum(1))
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()

        return ModelSpec(model=self.prefix + model, weights_id="centroids-v1:" + ",".join(names),
                         num_classes=len(names), categories=names,
                         preprocess=Preprocess(resize=72, crop=64, mean=(0, 0, 0),
                                               std=(1, 1, 1)), build=build)

    def preprocess(self, model, weights):
        return self.resolve(model, weights).preprocess


def test_a_model_backend_registered_here_runs_a_job(cli, tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.backends.BACKENDS", [Centroids(), *BACKENDS])  # the line
    truth = write_colour_images(tmp_path / "imgs", 8)
    result = cli("run", tmp_path / "imgs", "--out", tmp_path / "run", "--model",
                 "centroids:colours", "--top-k", "2", "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output
    assert_labelled(tmp_path / "run", truth)
    table = pa.parquet.read_table(tmp_path / "run" / "labels.parquet")
    assert table.schema.metadata[b"label_images.model"] == b"centroids:colours"
    # its own option, told to it: two centres, so every image is one of those two
    two = cli("run", tmp_path / "imgs", "--out", tmp_path / "two", "--model",
              "centroids:colours", "--top-k", "2", "--workers", "0", "--quiet", "--option",
              "centres=red,blue")
    assert two.exit_code == 0, two.output
    found = read_output(tmp_path / "two" / "labels.parquet")
    assert set(found["top1_label"]) == {"red", "blue"} and len(found) == 8
    stray = cli("run", tmp_path / "imgs", "--out", tmp_path / "stray", "--option",
                "centres=red", "--workers", "0", "--quiet")
    assert stray.exit_code == 2 and "--option centres is for --model centroids" in stray.output


class JsonLines(Format):
    """One JSON object a line, gzipped when --option gzip=true says so."""

    name = "jsonl"
    embeddings = False
    options = (Option("gzip", bool, "gzip the table"),)

    def __init__(self, gzip: bool = False):
        self.gzip = gzip

    def configured(self, options):
        super().configured({k: v for k, v in options.items() if k in ("table", "catalog")})
        return JsonLines(gzip=options.get("gzip", False))

    def table_name(self):
        return "labels.jsonl" + ".gz" * self.gzip

    def run_files(self):
        return ["labels.jsonl", "labels.jsonl.gz"]

    def exists(self, store):
        return store.exists(self.table_name())

    def assemble(self, store, schema, tables, commit=None):
        with store.writing(self.table_name()) as target:
            sink = gzip.GzipFile(fileobj=target, mode="wb") if self.gzip else target
            for table in tables:
                for row in table.to_pylist():
                    sink.write((json.dumps(row, default=str) + "\n").encode())
            if self.gzip:
                sink.close()

    def read(self, store, columns):
        with store.open(self.table_name()) as fh:
            data = gzip.decompress(fh.read()) if self.gzip else fh.read()
        rows = [json.loads(line) for line in data.decode().splitlines()]
        return pa.Table.from_pylist([{c: r[c] for c in columns} for r in rows])

    def statuses(self, store):
        yield self.read(store, ["status"])["status"].combine_chunks()


def test_an_output_format_with_an_option_registered_here_runs_a_job(
        cli, tmp_path, colour_checkpoint, monkeypatch):
    monkeypatch.setitem(formats.FORMATS, "jsonl", JsonLines())  # the registry line
    truth = write_colour_images(tmp_path / "imgs", 5)
    result = cli("run", tmp_path / "imgs", "--out", tmp_path / "run", "--weights",
                 colour_checkpoint, "--format", "jsonl", "--option", "gzip=true", *RUN)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in
            gzip.decompress((tmp_path / "run" / "labels.jsonl.gz").read_bytes()).splitlines()]
    assert {r["key"]: r["top1_label"] for r in rows} == truth
    assert not (tmp_path / "run" / "labels.jsonl").exists()
    # the report finds it through the format and the run's recorded option
    report = cli("report", tmp_path / "run")
    assert report.exit_code == 0, report.output
    assert "5 images: 5 ok, 0 errors" in report.output
    # an option of the wrong type is one line
    bad = cli("run", tmp_path / "imgs", "--out", tmp_path / "bad", "--weights",
              colour_checkpoint, "--format", "jsonl", "--option", "gzip=perhaps", *RUN)
    assert bad.exit_code == 2 and "--option gzip=perhaps: not a bool" in bad.output


class ZipSource(Source):
    """The images inside a .zip archive, each read from it by its member name."""

    options = (Option("under", str, "label only the members under this folder"),)

    @classmethod
    def claims(cls, location, is_dir):
        return not is_dir and location.endswith(".zip")

    def describe(self):
        return {**super().describe(), **declared(self, self.spec.options)}

    def list_items(self):
        under = declared(self, self.spec.options).get("under", "")
        with zipfile.ZipFile(self.spec.location) as archive:
            names = sorted(n for n in archive.namelist()
                           if not n.endswith("/") and n.startswith(under))
        return pa.table({"key": names,
                         "path": [f"{self.spec.location}#{n}" for n in names]})

    def fetch(self, paths, max_bytes):
        found = []
        with zipfile.ZipFile(self.spec.location) as archive:
            for path in paths:
                try:
                    found.append(archive.read(path.rpartition("#")[2]))
                except KeyError as exc:
                    found.append(exc)
        return found


def test_a_source_registered_here_runs_a_job(cli, tmp_path, colour_checkpoint, monkeypatch):
    monkeypatch.setattr(sources, "KINDS", [ZipSource, *sources.KINDS])  # the registry line
    truth = write_colour_images(tmp_path / "imgs", 6)
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        for key in truth:
            archive.write(tmp_path / "imgs" / key, key)
        archive.writestr("notes/broken.jpg", b"not an image")
    result = cli("run", tmp_path / "photos.zip", "--out", tmp_path / "run", "--weights",
                 colour_checkpoint, *RUN)
    assert result.exit_code == 0, result.output
    found = read_output(tmp_path / "run" / "labels.parquet")
    ok = found[found["status"] == "ok"]
    assert dict(zip(ok["key"], ok["top1_label"])) == truth
    assert found.loc[found["key"] == "notes/broken.jpg", "status"].item() == "error"
    # its own option, told to it: the members under one folder only
    notes = cli("run", tmp_path / "photos.zip", "--out", tmp_path / "notes", "--weights",
                colour_checkpoint, "--option", "under=notes/", *RUN)
    assert notes.exit_code == 0, notes.output
    assert list(read_output(tmp_path / "notes" / "labels.parquet")["key"]) == [
        "notes/broken.jpg"]
    stray = cli("run", tmp_path / "imgs", "--out", tmp_path / "stray", "--weights",
                colour_checkpoint, "--option", "under=x", *RUN)
    assert stray.exit_code == 2 and "--option under is for source zip" in stray.output


class Sheet(review.ReviewTarget):
    """A review tool that is a spreadsheet: the rows out as CSV, people's answers back as
    a CSV of key and label (a file ending in .answers.csv)."""

    name = "sheet"
    options = (Option("sheet", str, "where to write the rows (CSV)"),
               Option("scores", bool, "also write each row's top-1 score"))

    def claims(self, where: str) -> bool:
        return where.endswith(".answers.csv")

    def export(self, run, rows, labels, options) -> dict:
        lines, count = ["key,top1_label" + (",top1_score" if options.get("scores") else "")], 0
        for table in rows:
            for row in table.to_pylist():
                lines.append(f"{row['key']},{row['top1_label']}" + (
                    f",{row['top1_score']:.4f}" if options.get("scores") else ""))
                count += 1
        with open(options["sheet"], "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return {"samples": count, "file": options["sheet"]}

    def reviews(self, where: str):
        import pyarrow.csv as pacsv

        answers = pacsv.read_csv(where)
        n = answers.num_rows
        yield pa.table({"key": answers["key"], "label": answers["label"],
                        "reviewer": pa.array(["sheet"] * n),
                        "reviewed_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
                        "tool": pa.array(["sheet"] * n), "path": pa.nulls(n, pa.string())},
                       schema=review.REVIEW_SCHEMA)


def test_a_review_tool_registered_here_exports_and_reads_answers(
        cli, tmp_path, colour_checkpoint, monkeypatch):
    monkeypatch.setitem(review.TARGETS, "sheet", Sheet())  # the registry line
    folder, out = tmp_path / "imgs", tmp_path / "run"
    truth = write_colour_images(folder, 6)
    assert cli("run", folder, "--out", out, "--weights", colour_checkpoint, *RUN).exit_code == 0
    sheet = tmp_path / "rows.csv"
    sent = cli("export", out, "--to", "sheet", "--rows", "all", "--option", f"sheet={sheet}",
               "--option", "scores=yes")
    assert sent.exit_code == 0, sent.output
    assert sent.output.strip() == f"6 of 6 rows -> sheet: {sheet}"
    lines = sheet.read_text().splitlines()
    assert lines[0] == "key,top1_label,top1_score" and len(lines) == 7
    assert {line.split(",")[0]: line.split(",")[1] for line in lines[1:]} == truth
    refused = cli("export", out, "--to", "sheet", "--option", "dataset=x")
    assert refused.exit_code == 2
    assert "--option dataset is not for --to sheet (it takes sheet, scores)" in refused.output
    typed = cli("export", out, "--to", "sheet", "--option", f"sheet={sheet}", "--option",
                "scores=maybe")
    assert typed.exit_code == 2 and "--option scores=maybe: not a bool" in typed.output
    alias = cli("export", out, "--to", "sheet", "--dataset", "x")
    assert alias.exit_code == 2 and "--dataset is not for --to sheet" in alias.output
    # people's answers: one disagrees with the model
    wrong = sorted(truth)[0]
    answers = tmp_path / "people.answers.csv"
    answers.write_text("key,label\n" + "".join(
        f"{key},{'red' if key == wrong and colour != 'red' else 'green' if key == wrong else colour}\n"
        for key, colour in truth.items()))
    back = cli("reviews", out, answers)
    assert back.exit_code == 0, back.output
    assert "people reviewed 6 images: the model's top-1 agrees on 83.3%" in back.output
