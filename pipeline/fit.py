"""`label-images fit RUN`: a new head for the frozen backbone, trained on the run's embeddings
with people's labels, checked on answers it did not train on before it is written.

The recipe the project's users start from: a frozen ResNet-50 with average pooling, a small
head on top (a Linear, or Dense 512 + ReLU + Dense), softmax, trained on the team's own
classes. A run with `--embeddings` holds exactly the head's input for every image, so the
head trains in seconds on a CPU. Both shapes are scored by stratified k-fold on the answers
(each answer predicted by a head that did not see it); the better one (the Linear on a tie)
is trained on every answer and written as a checkpoint `run --weights` takes: the run's
backbone with the head replaced, as the tutorials load it (`model.fc = ...`,
`load_state_dict`). A head that does worse on held-out answers than the current model's
agreement with them is refused, with the figures.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from pipeline.errors import RunError, UsageError
from pipeline.rundir import REVIEWS_FILE, finished_run, finished_table, write_json
from pipeline.storage import Store

FIT_FILE = "fit.json"  # what the last fit measured and wrote, in the run directory
HIDDEN = 512  # the recipe's Dense layer
FOLDS = 5
EPOCHS = 300
SOURCES = ("reviews", "folders", "both")


@dataclass
class Answers:
    """The answered images' embeddings, people's labels and the run's top-1 for them."""

    keys: list[str]
    x: np.ndarray  # float32 (n, d)
    labels: list[str]
    model_top1: list[str | None]


def embeddings_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The embedding column as a (rows, features) float32 matrix, a null row (an error row)
    as zeros. Written as fixed-size lists; a table format may give them back as plain lists.
    (Arrow's flatten skips null rows, so the rows are placed by their validity.)"""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    width = (array.type.list_size if pa.types.is_fixed_size_list(array.type)
             else len(values) // max(1, int(valid.sum())))
    matrix = np.zeros((len(array), width), np.float32)
    matrix[valid] = values.reshape(-1, width)
    return matrix


def people_labels(out: str, source: str) -> dict[str, str]:
    """key -> label: the run's reviews.parquet, the folder each image is in (the recipe's
    layout, a folder per class), or both (people's answers win)."""
    if source not in SOURCES:
        raise UsageError(f"--labels must be one of {', '.join(SOURCES)}, got {source!r}")
    store = Store(out)
    found: dict[str, str] = {}
    if source in ("folders", "both"):
        fmt_store, fmt = finished_table(out)
        for table in fmt.batches(fmt_store, ["key"]):
            for key in table["key"].to_pylist():
                folder, slash, _ = key.rpartition("/")
                if slash:
                    found[key] = folder.rsplit("/", 1)[-1]
    if source in ("reviews", "both"):
        if not store.exists(REVIEWS_FILE):
            if source == "reviews":
                raise UsageError(f"{out} has no reviews yet (reviews.parquet): bring people's "
                                 "answers back with `label-images reviews`, or fit on the "
                                 "folders' names with --labels folders")
        else:
            with store.open(REVIEWS_FILE) as fh:
                reviews = pq.read_table(fh, columns=["key", "label"])
            found.update((k, v) for k, v in zip(reviews["key"].to_pylist(),
                                                reviews["label"].to_pylist()) if k and v)
    return found


def read_answers(out: str, labels: dict[str, str]) -> Answers:
    """The answered rows' embeddings, streamed from the table (only those are kept)."""
    store, fmt = finished_table(out)
    wanted = pa.array(sorted(labels), pa.string())
    keys, vectors, top1 = [], [], []
    try:
        batches = fmt.batches(store, ["key", "status", "top1_label", "embedding"])
        for table in batches:
            table = table.filter(pc.and_(pc.is_in(table["key"], wanted),
                                         pc.equal(table["status"], "ok")))
            if not table.num_rows:
                continue
            keys += table["key"].to_pylist()
            top1 += table["top1_label"].to_pylist()
            vectors.append(embeddings_of(table["embedding"]))
    except KeyError:
        raise UsageError(f"{out} has no embeddings: label it with --embeddings (fit trains "
                         "on them)") from None
    if not keys:
        raise UsageError(f"none of the {len(labels)} answered keys is an ok row of {out}")
    return Answers(keys, np.concatenate(vectors), [labels[k] for k in keys], top1)


def make_head(features: int, classes: int, hidden: int | None) -> nn.Module:
    return nn.Linear(features, classes) if hidden is None else nn.Sequential(
        nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def train(x: np.ndarray, y: np.ndarray, classes: int, hidden: int | None,
          seed: int = 0) -> nn.Module:
    """A head trained full-batch with Adam on (x, y): seconds for thousands of answers."""
    torch.manual_seed(seed)
    head = make_head(x.shape[1], classes, hidden)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-3 if hidden else 1e-2,
                                 weight_decay=1e-4)
    for _ in range(EPOCHS):
        optimiser.zero_grad()
        nn.functional.cross_entropy(head(inputs), targets).backward()
        optimiser.step()
    return head.eval()


def folds_of(y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Each answer's fold, every class spread over the folds (stratified)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        fold[members] = np.arange(len(members)) % folds
    return fold


def held_out(x: np.ndarray, y: np.ndarray, classes: int, hidden: int | None,
             folds: int) -> np.ndarray:
    """Each answer's prediction by a head trained on the other folds."""
    fold = folds_of(y, folds)
    predicted = np.empty(len(y), np.int64)
    for k in range(folds):
        train_on, test_on = fold != k, fold == k
        head = train(x[train_on], y[train_on], classes, hidden)
        with torch.no_grad():
            predicted[test_on] = head(torch.from_numpy(x[test_on])).argmax(1).numpy()
    return predicted


def fit(out: str, source: str = "reviews", to: str | None = None) -> dict:
    """Fit, check and write the head; the figures (also kept in OUT/fit.json)."""
    started = time.perf_counter()
    record = finished_run(out)
    config = record.config
    if ":" in config["model"]:
        raise UsageError(f"fit writes torchvision checkpoints; {config['model']} is another "
                         "family's model")
    store, fmt = finished_table(out)
    first = next(iter(fmt.batches(store, ["key", "embedding"])), None)
    if first is None or "embedding" not in first.column_names:
        raise UsageError(f"{out} has no embeddings: label it with --embeddings (fit trains "
                         "on them)")
    labels = people_labels(out, source)
    if not labels:
        raise UsageError(f"no image of {out} is in a folder: --labels folders takes each "
                         "image's folder as its class" if source == "folders" else
                         f"{out}'s reviews.parquet holds no answers")
    answers = read_answers(out, labels)
    names = sorted(set(answers.labels))
    counts = Counter(answers.labels)
    if len(names) < 2 or min(counts.values()) < 2:
        raise UsageError(f"fit needs at least two classes with two answers each; the answers "
                         f"have {dict(counts)}")
    y = np.array([names.index(label) for label in answers.labels])
    folds = min(FOLDS, min(counts.values()))
    shapes = {"linear": None, f"dense{HIDDEN}": HIDDEN}
    predictions = {shape: held_out(answers.x, y, len(names), hidden, folds)
                   for shape, hidden in shapes.items()}
    accuracy = {shape: float(np.mean(p == y)) for shape, p in predictions.items()}
    chosen = max(shapes, key=lambda s: (accuracy[s], s == "linear"))
    agrees = np.array([a == b for a, b in zip(answers.model_top1, answers.labels)])
    per_class = [{"label": name, "answers": int(counts[name]),
                  "head": float(np.mean(predictions[chosen][y == i] == i)),
                  "model": float(np.mean(agrees[y == i]))} for i, name in enumerate(names)]
    figures = {"answers": len(y), "from": source, "folds": folds, "classes": names,
               "held_out_accuracy": {s: round(a, 4) for s, a in accuracy.items()},
               "head": chosen, "model_agreement": round(float(np.mean(agrees)), 4),
               "per_class": per_class}
    if accuracy[chosen] < figures["model_agreement"]:
        write_json(Store(out), FIT_FILE, {**figures, "refused": True})
        raise RunError(f"refused: the new head's top-1 accuracy on held-out answers is "
                       f"{accuracy[chosen]:.1%}, below the current model's agreement with "
                       f"them ({figures['model_agreement']:.1%}); nothing written")
    head = train(answers.x, y, len(names), shapes[chosen])
    path = Path(to) if to else Path(out) / "fitted.pt"
    figures["checkpoint"] = str(path.resolve())
    figures["sha256"] = _write_checkpoint(config, record, head, names, figures, path)
    figures["seconds"] = round(time.perf_counter() - started, 2)
    write_json(Store(out), FIT_FILE, figures)
    return figures


def _write_checkpoint(config: dict, record: dict, head: nn.Module, names: list[str],
                      figures: dict, path: Path) -> str:
    """The run's backbone with `head` in place of its last layer, as a state_dict with the
    class names; what relabel needs to know it is this run's backbone."""
    from pipeline.backends import resolve_model
    from pipeline.backends.base import embedding_head, head_name
    from pipeline.backends.torchvision import with_head

    spec = resolve_model(config["model"], config["weights"])
    hidden = HIDDEN if figures["head"] != "linear" else None
    net = with_head(spec.build(), len(names), hidden)
    target, _ = embedding_head(net)
    target.load_state_dict(head.state_dict())
    # the head's module name in the network (fc, or fc of fc.0/fc.2): what relabel reads
    name = head_name(net) if hidden is None else head_name(net).rpartition(".")[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "categories": names,
                # the backbone the embeddings came from: a night that took a fit records it
                "label_images": {"backbone": record.backbone,
                                 "model": config["model"], "head": name,
                                 "fit": {k: figures[k] for k in ("answers", "from", "head")}}},
               path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"sha256:{digest}"


def lines(figures: dict) -> list[str]:
    """What `fit` says."""
    accuracy = figures["held_out_accuracy"]
    said = [f"{figures['answers']} answers ({len(figures['classes'])} classes, from "
            f"{figures['from']}), {figures['folds']}-fold: held-out top-1 "
            + ", ".join(f"{s} {a:.1%}" for s, a in accuracy.items())
            + f"; the current model agrees on {figures['model_agreement']:.1%}",
            "per class (answers, new head, current model):"]
    width = max(len(c["label"]) for c in figures["per_class"])
    said += [f"  {c['label']:<{width}}  {c['answers']}  {c['head']:.1%}  {c['model']:.1%}"
             for c in figures["per_class"]]
    if "checkpoint" in figures:
        said.append(f"{figures['head']} head -> {figures['checkpoint']} (label-images run "
                    f"... --weights {figures['checkpoint']}, or relabel)")
    return said
