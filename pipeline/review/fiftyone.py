"""FiftyOne: the chosen rows as samples whose `predictions` field holds the run's top-k as
Classifications with their confidences (the key on each, the embedding beside them when the
run has it), into a dataset of FiftyOne's database, or on disk in FiftyOne's own image
classification format (labels.json, data.json manifest) to load with `Dataset.from_dir`;
people's labels read back from a dataset's field or such an export."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.options import Option
from pipeline.errors import UsageError
from pipeline.review.base import REVIEW_SCHEMA, ReviewTarget
from pipeline.storage import atomic_path

SCHEME = "fiftyone://"
FIELD = "predictions"
LABELS_FILE, DATA_FILE, EMBEDDINGS_FILE = "labels.json", "data.json", "embeddings.npy"
ADD_BATCH = 1000


def _fiftyone():
    try:
        import fiftyone
    except ImportError:
        raise UsageError("--to fiftyone --dataset needs FiftyOne: pip install fiftyone "
                         "(or --file DIR: its on-disk format, without it)") from None
    return fiftyone


def _classifications(row: dict) -> list[dict]:
    return [{"label": label, "confidence": round(float(score), 6),
             "attributes": {"key": row["key"], "rank": rank}}
            for rank, (label, score) in enumerate(zip(row["labels"], row["scores"]), 1)]


class FiftyOne(ReviewTarget):
    name = "fiftyone"
    takes_embeddings = True
    options = (
        Option("file", str, "write a dataset file (JSON) here instead of a dataset"),
        Option("dataset", str, "the dataset to create (default: label-images-<run name>)"),
    )

    def claims(self, where: str) -> bool:
        return where.startswith(SCHEME) or os.path.isfile(os.path.join(where, LABELS_FILE))

    def export(self, run, rows, labels, options) -> dict:
        if not run.holds_files:
            raise UsageError("this run's images are inside archives or a Parquet column: "
                             "FiftyOne's samples are files, so export them as files first")
        if options.get("file"):
            return _write(Path(options["file"]), run, rows, labels)
        return _into_dataset(options.get("dataset") or f"label-images-{Path(run.out).name}",
                             run, rows, labels)

    def reviews(self, where: str) -> Iterator[pa.Table]:
        if where.startswith(SCHEME):
            yield _from_dataset(where)
            return
        yield _from_disk(where)


def _write(folder: Path, run, rows, labels: list[str]) -> dict:
    """FiftyOne's FiftyOneImageClassificationDataset on disk, the images left where they
    are (a data.json manifest of uuid -> path); embeddings.npy in the same order. Written
    as the rows stream in: a batch in memory, whatever the count."""
    folder.mkdir(parents=True, exist_ok=True)
    count, width = 0, None
    with atomic_path(folder / DATA_FILE) as data_tmp, atomic_path(folder / LABELS_FILE) as \
            labels_tmp, open(data_tmp, "w", encoding="utf-8") as data, \
            open(labels_tmp, "w", encoding="utf-8") as found, \
            open(folder / f".{EMBEDDINGS_FILE}.raw", "wb") as vectors:
        data.write("{")
        found.write('{"model_version": ' + json.dumps(run.model_version) +
                    ', "classes": null, "labels": {')
        for table in rows:
            for row in table.to_pylist():
                uuid, comma = f"{count:09d}", ", " if count else ""
                data.write(f"{comma}{json.dumps(uuid)}: {json.dumps(row['path'], ensure_ascii=False)}")
                found.write(f"{comma}{json.dumps(uuid)}: "
                            f"{json.dumps(_classifications(row), ensure_ascii=False)}")
                if row.get("embedding") is not None:
                    vector = np.asarray(row["embedding"], np.float32)
                    width = len(vector)
                    vectors.write(vector.tobytes())
                count += 1
        data.write("}\n")
        found.write("}}\n")
    raw = folder / f".{EMBEDDINGS_FILE}.raw"
    try:
        if width:  # the .npy header once the count is known, then the rows as written
            with atomic_path(folder / EMBEDDINGS_FILE) as tmp, open(tmp, "wb") as fh, \
                    open(raw, "rb") as source:
                np.lib.format.write_array_header_1_0(fh, {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                    "fortran_order": False, "shape": (count, width)})
                shutil.copyfileobj(source, fh, 16 << 20)
    finally:
        raw.unlink(missing_ok=True)
    return {"samples": count, "file": str(folder)}


def _into_dataset(name: str, run, rows, labels: list[str]) -> dict:
    """Samples added to a persistent dataset of FiftyOne's database, a batch at a time."""
    fo = _fiftyone()
    dataset = fo.Dataset(name, persistent=True) if not fo.dataset_exists(name) else \
        fo.load_dataset(name)
    there = set(dataset.distinct("key")) if "key" in dataset.get_field_schema() else set()
    added = 0
    batch = []
    for table in rows:
        for row in table.to_pylist():
            if row["key"] in there:
                continue
            sample = fo.Sample(filepath=row["path"], key=row["key"])
            sample[FIELD] = fo.Classifications(classifications=[
                fo.Classification(label=c["label"], confidence=c["confidence"])
                for c in _classifications(row)])
            if row.get("embedding") is not None:
                sample["embedding"] = np.asarray(row["embedding"], np.float32)
            batch.append(sample)
            if len(batch) == ADD_BATCH:
                added += len(dataset.add_samples(batch))
                batch = []
    if batch:
        added += len(dataset.add_samples(batch))
    dataset.info["label_images"] = {"model_version": run.model_version, "classes": labels}
    dataset.save()
    return {"samples": added, "skipped": len(there), "dataset": name}


def _from_dataset(where: str) -> pa.Table:
    """fiftyone://DATASET/FIELD: the label people gave each sample in FIELD."""
    name, _, field = where[len(SCHEME):].partition("/")
    if not name or not field:
        raise UsageError(f"{where}: give fiftyone://DATASET/FIELD")
    fo = _fiftyone()
    if not fo.dataset_exists(name):
        raise UsageError(f"no FiftyOne dataset named {name!r}")
    rows = []
    for sample in fo.load_dataset(name).exists(field):
        label = _first_label(sample[field])
        if label is not None:
            rows.append({"key": sample["key"] if sample.has_field("key") else None,
                         "path": sample.filepath, "label": label, "reviewer": None,
                         "reviewed_at": getattr(sample, "last_modified_at", None),
                         "tool": "fiftyone"})
    return pa.Table.from_pylist(rows, REVIEW_SCHEMA)


def _first_label(value) -> str | None:
    if value is None:
        return None
    if hasattr(value, "classifications"):
        return value.classifications[0].label if value.classifications else None
    if isinstance(value, dict):
        value = value.get("classifications", [value])[0] if value else None
        return None if value is None else value.get("label")
    if isinstance(value, list):
        return _first_label(value[0]) if value else None
    return getattr(value, "label", None) or (value if isinstance(value, str) else None)


def _from_disk(folder: str) -> pa.Table:
    """An export in FiftyOne's image classification format (as `_write` writes it, or as
    FiftyOne exports a field with export_media="manifest"): keys from the labels' own `key`
    attribute where they have one, else from the image's path."""
    try:
        with open(os.path.join(folder, LABELS_FILE), encoding="utf-8") as fh:
            labels = json.load(fh)
        data_path = os.path.join(folder, DATA_FILE)
        paths = {}
        if os.path.isfile(data_path):
            with open(data_path, encoding="utf-8") as fh:
                paths = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{folder} is not a FiftyOne classification export: {exc}") from None
    classes = labels.get("classes")
    rows = []
    for uuid, target in (labels.get("labels") or {}).items():
        first = target[0] if isinstance(target, list) and target else target
        if first is None or first == []:
            continue
        label = first.get("label") if isinstance(first, dict) else first
        if isinstance(label, int) and classes:
            label = classes[label]
        key = (first.get("attributes") or {}).get("key") if isinstance(first, dict) else None
        path = paths.get(uuid) or (uuid if os.path.isabs(uuid) else None)
        rows.append({"key": key, "path": path, "label": str(label), "reviewer": None,
                     "reviewed_at": None, "tool": "fiftyone"})
    return pa.Table.from_pylist(rows, REVIEW_SCHEMA)


TARGET = FiftyOne()
