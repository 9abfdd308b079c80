"""`label-images relabel RUN --weights HEAD --out NEW`: every row of a run labelled again from
its stored embeddings with a head `fit` wrote: no image decoded, no backbone run.

The table is streamed a batch at a time (memory set by the batch); the new head runs on
each ok row's embedding in float32, and the rows' top-k, top-1 and the table's model
metadata are replaced; keys, paths, sizes, errors, kept columns and the embeddings
themselves stay as they were. The head must have been fitted on this run's backbone (the
checkpoint says which), or its labels would not be what a full run with it gives. NEW's
table is in the run's format, where that format puts it by default (Delta: NEW/labels.delta;
Iceberg: NEW's own SQLite catalog), written as one commit: a table format's one version.
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import fit as fitting, formats
from pipeline.errors import UsageError
from pipeline.formats.base import Commit, Format
from pipeline.rundir import RUN_FILE, SUMMARY_FILE, finished_run, finished_table, write_json
from pipeline.storage import Store

BATCH_ROWS = 8_192  # rows a batch: 64 MB of 2048 float32 features


def fit_record(weights: str) -> dict | None:
    """What `fit` recorded in a checkpoint (backbone, head, fit), or None: not a fit's."""
    try:
        raw = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError):
        return None
    meta = raw.get("label_images") if isinstance(raw, dict) else None
    return meta if isinstance(meta, dict) and "head" in meta else None


def load_head(weights: str, backbone: str) -> tuple[torch.nn.Module, list[str], dict]:
    """The head a `fit` checkpoint holds, its class names, and what fit recorded in it;
    refused if it was fitted on another backbone than this run's."""
    try:
        raw = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--weights {weights}: not a checkpoint ({exc})") from None
    meta = raw.get("label_images") if isinstance(raw, dict) else None
    if not meta or "head" not in meta:
        raise UsageError(f"--weights {weights} was not written by `label-images fit` (it "
                         "names no fitted head); relabel reuses a run's embeddings only for "
                         "a head fitted on them")
    if meta.get("backbone") != backbone:
        raise UsageError(f"--weights {weights} was fitted on another backbone "
                         f"({meta.get('backbone')}) than this run's ({backbone}): run the "
                         "images through it with `label-images run --weights` instead")
    prefix = meta["head"] + "."
    state = {k[len(prefix):]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
    names = list(raw["categories"])
    hidden = int(state["0.weight"].shape[0]) if "0.weight" in state else None
    features = int((state["0.weight"] if hidden else state["weight"]).shape[1])
    head = fitting.make_head(features, len(names), hidden)
    head.load_state_dict(state)
    return head.eval(), names, meta


def relabel(out: str, weights: str, new_out: str) -> dict:
    """Write NEW's table (the run's format) and run record; the figures (rows, rows per
    second)."""
    started = time.perf_counter()
    record = finished_run(out)
    store, fmt = finished_table(out)
    head, names, meta = load_head(weights, record.backbone)
    batches = _batches(store, fmt)
    first = next(batches, None)
    if first is None or "embedding" not in first.column_names:
        raise UsageError(f"{out} has no embeddings: label it with --embeddings")
    top_k = min(int(record.fingerprint.get("top_k") or 5), len(names))
    digest = "sha256:" + hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    schema = first.schema.with_metadata({**(first.schema.metadata or {}),
                                         b"label_images.weights": digest.encode(),
                                         b"label_images.top_k": str(top_k).encode()})
    new, new_fmt = Store(new_out), formats.recorded({"format": fmt.name})  # its default place
    if new_fmt.exists(new) or new.exists(RUN_FILE):
        raise UsageError(f"{new.url()} holds a table already: relabel writes a new one; "
                         "choose another --out")
    new.makedirs()  # where a table format's own files (a SQLite catalog) go
    categories = np.array(names, dtype=object)
    counted = {"rows": 0}

    def tables():
        for table in itertools.chain([first], batches):
            counted["rows"] += table.num_rows
            yield relabelled(table, head, categories, top_k).cast(schema)

    fingerprint = {**record.fingerprint, "weights": digest, "num_classes": len(names),
                   "top_k": top_k}
    run_id = hashlib.sha256(f"{digest} {record.get('run_id')}".encode()).hexdigest()[:32]
    new_fmt.assemble(new, schema, tables(), Commit(id=run_id, properties={
        "label_images.run_id": run_id, "label_images.model": str(fingerprint.get("model")),
        "label_images.weights": digest, "label_images.run_dir": new.url()}))
    seconds = time.perf_counter() - started
    rows = counted["rows"]
    figures = {"rows": rows, "seconds": round(seconds, 3),
               "rows_per_second": round(rows / seconds, 1) if seconds else 0.0,
               "from": str(Path(out).resolve()) if "://" not in out else out,
               "weights": str(Path(weights).resolve()), "head": meta["head"],
               "output": new_fmt.location(new)}
    config = {**record.config, "out": new_out, "weights": figures["weights"], "top_k": top_k,
              "embeddings": True, "options": {}}
    write_json(new, RUN_FILE, {"config": config, "fingerprint": fingerprint, "run_id": run_id,
                               "started_at": record.started_at, "relabel": figures})
    write_json(new, SUMMARY_FILE, {"output": figures["output"], "items": rows,
                                   "relabel": figures})
    return figures


def _batches(store: Store, fmt: Format):
    """The run's table a batch of BATCH_ROWS rows at a time. A Parquet table is read without
    pre-buffering (a row group of embeddings is 512 MB; a batch is what is held); a table
    format's batches, as its library gives them, are cut to that size."""
    if fmt.name == "parquet":
        for name in fmt.files(store):  # one file, or a nightly table's parts
            with store.open(name) as source:
                for batch in pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20
                                            ).iter_batches(batch_size=BATCH_ROWS):
                    yield pa.Table.from_batches([batch])
        return
    if not fmt.embeddings:
        raise UsageError(f"relabel reads the stored embeddings; a {fmt.name} table holds none")
    for table in fmt.batches(store, None):  # every column
        for start in range(0, table.num_rows, BATCH_ROWS):
            yield table.slice(start, BATCH_ROWS)


def relabelled(table: pa.Table, head: torch.nn.Module, categories: np.ndarray,
                top_k: int) -> pa.Table:
    """The batch with its top-k from the head; error rows (no embedding) unchanged."""
    ok = pc.fill_null(pc.equal(table["status"], "ok"), False).to_numpy(zero_copy_only=False)
    vectors = fitting.embeddings_of(table["embedding"])
    with torch.no_grad():
        probs = head(torch.from_numpy(np.ascontiguousarray(vectors[ok], np.float32)))
        scores, ids = probs.softmax(dim=1).topk(top_k, dim=1)
    scores, ids = scores.numpy(), ids.numpy().astype(np.int32)
    n = table.num_rows
    where = np.flatnonzero(ok)

    def lists(values: np.ndarray, kind: pa.DataType) -> pa.Array:
        full = np.zeros((n, top_k), dtype=values.dtype)
        full[where] = values
        offsets = pa.array(np.arange(0, n * top_k + 1, top_k, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(full.ravel(), kind),
                                        mask=pa.array(~ok))

    labels = categories[ids] if len(where) else np.zeros((0, top_k), dtype=object)
    full_labels = np.empty((n, top_k), dtype=object)
    full_labels[where] = labels
    offsets = pa.array(np.arange(0, n * top_k + 1, top_k, dtype=np.int32))
    label_lists = pa.ListArray.from_arrays(offsets, pa.array(full_labels.ravel(), pa.string()),
                                           mask=pa.array(~ok))
    top1_label = np.full(n, None, dtype=object)
    top1_label[where] = labels[:, 0] if len(where) else []
    top1_score = np.full(n, np.nan, dtype=np.float32)
    top1_score[where] = scores[:, 0] if len(where) else []
    replaced = {"labels": label_lists, "scores": lists(scores, pa.float32()),
                "class_ids": lists(ids, pa.int32()),
                "top1_label": pa.array(top1_label, pa.string()),
                "top1_score": pa.array(top1_score, pa.float32(), mask=~ok)}
    for name, column in replaced.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table
