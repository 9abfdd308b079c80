"""`label-images relabel RUN --weights HEAD --out NEW`: every row of a run labelled again from
its stored embeddings with a head `fit` wrote: no image decoded, no backbone run.

The table is streamed a batch at a time (memory set by the batch); the new head runs on
each ok row's embedding in float32, and the rows' top-k, top-1 and the table's model
metadata are replaced; keys, paths, sizes, errors, kept columns and the embeddings
themselves stay as they were. The head must have been fitted on this run's backbone (the
checkpoint says which), or its labels would not be what a full run with it gives.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import fit as fitting
from pipeline.errors import UsageError
from pipeline.report import finished_table
from pipeline.rundir import RUN_FILE, SUMMARY_FILE, finished_run, write_json
from pipeline.storage import Store

TABLE = "labels.parquet"
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
    """Write NEW/labels.parquet; the figures (rows, rows per second)."""
    started = time.perf_counter()
    record = finished_run(out)
    store, fmt = finished_table(out)
    if fmt.name != "parquet":
        raise UsageError(f"relabel reads a Parquet table; {out} holds {fmt.name}")
    head, names, meta = load_head(weights, record.backbone)
    with store.open(fmt.table_name()) as fh:
        schema = pq.read_schema(fh)
    if "embedding" not in schema.names:
        raise UsageError(f"{out} has no embeddings: label it with --embeddings")
    top_k = min(int(record.fingerprint.get("top_k") or 5), len(names))
    digest = "sha256:" + hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    schema = schema.with_metadata({**(schema.metadata or {}),
                                   b"label_images.weights": digest.encode(),
                                   b"label_images.top_k": str(top_k).encode()})
    new = Store(new_out)
    if new.exists(TABLE):
        raise UsageError(f"{new.url(TABLE)} exists: relabel writes a new table; choose "
                         "another --out")
    categories = np.array(names, dtype=object)
    rows = 0
    with store.open(fmt.table_name()) as source, new.writing(TABLE) as sink, \
            pq.ParquetWriter(sink, schema) as writer:
        # no pre-buffering: a row group of embeddings is 512 MB; a batch is what is held
        for batch in pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20).iter_batches(
                batch_size=BATCH_ROWS):
            table = pa.Table.from_batches([batch])
            writer.write_table(relabelled(table, head, categories, top_k).cast(schema))
            rows += table.num_rows
    seconds = time.perf_counter() - started
    figures = {"rows": rows, "seconds": round(seconds, 3),
               "rows_per_second": round(rows / seconds, 1) if seconds else 0.0,
               "from": str(Path(out).resolve()) if "://" not in out else out,
               "weights": str(Path(weights).resolve()), "head": meta["head"]}
    config = {**record.config, "out": new_out,
              "weights": figures["weights"], "top_k": top_k, "embeddings": True}
    fingerprint = {**record.fingerprint, "weights": digest,
                   "num_classes": len(names), "top_k": top_k}
    write_json(new, RUN_FILE, {"config": config, "fingerprint": fingerprint,
                               "started_at": record.started_at, "relabel": figures})
    write_json(new, SUMMARY_FILE, {"output": new.url(TABLE), "items": rows,
                                   "relabel": figures})
    return figures


def relabelled(table: pa.Table, head: torch.nn.Module, categories: np.ndarray,
                top_k: int) -> pa.Table:
    """The batch with its top-k from the head; error rows (no embedding) unchanged."""
    ok = pc.fill_null(pc.equal(table["status"], "ok"), False).to_numpy(zero_copy_only=False)
    embedding = table["embedding"].combine_chunks()
    width = embedding.type.list_size
    vectors = embedding.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    # a null embedding's slot is zeros in the flat values (fixed-size lists keep the slot)
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
