"""--embeddings: pooled penultimate features beside the labels, from the same forward pass."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tests.conftest import FAST, colour_array, write_colour_images
from tests.photos import photo


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_reencoded_copies_are_near_and_unrelated_images_are_not(cli, tmp_path,
                                                                colour_checkpoint):
    folder = tmp_path / "imgs"
    folder.mkdir()
    original = photo(320, 240, seed=5)
    original.save(folder / "a.png")
    buffer = io.BytesIO()
    original.save(buffer, format="JPEG", quality=70)  # the same picture, re-encoded
    (folder / "a-copy.jpg").write_bytes(buffer.getvalue())
    photo(320, 240, seed=6).save(folder / "b.png")
    Image.fromarray(colour_array("blue", 320, 240, seed=1)).save(folder / "c.png")
    (folder / "broken.jpg").write_bytes(b"nope")
    result = cli("run", folder, "--out", tmp_path / "run", "--model", "resnet18", "--weights",
                 colour_checkpoint, "--top-k", "2", "--embeddings", "--workers", "0", "-q",
                 *FAST)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "run" / "labels.parquet")
    field = table.schema.field("embedding")
    assert field.type.list_size == 512  # resnet18's pooled features
    # Stored as Parquet's plain 32-bit floats, which every reader takes; Spark and Trino
    # refuse a file with a FLOAT16 (2-byte fixed-length) column in it.
    columns = pq.read_metadata(tmp_path / "run" / "labels.parquet").schema
    leaf, = [columns.column(i) for i in range(len(columns))
             if columns.column(i).path.startswith("embedding.")]
    assert (leaf.physical_type, leaf.logical_type.type) == ("FLOAT", "NONE")
    assert field.type.value_type == pa.float32()
    rows = {k: e for k, e in zip(table["key"].to_pylist(), table["embedding"].to_pylist())}
    assert rows["broken.jpg"] is None
    # The test network's weights are random, so all its features share a large common part
    # and raw cosines are all high; what must hold is the ordering by a wide margin: the
    # re-encoded copy is far nearer than any other picture.
    copy_distance = 1 - cosine(rows["a.png"], rows["a-copy.jpg"])
    assert copy_distance < 0.002
    for other in ("b.png", "c.png"):
        assert 1 - cosine(rows["a.png"], rows[other]) > 20 * copy_distance


def test_embeddings_need_parquet(cli, tmp_path, colour_checkpoint):
    write_colour_images(tmp_path / "imgs", 2)
    refused = cli("run", tmp_path / "imgs", "--out", tmp_path / "run", "--format", "csv",
                  "--embeddings", "--model", "resnet18", "--weights", colour_checkpoint)
    assert refused.exit_code == 2
    assert "--embeddings cannot be written to csv: use --format parquet" in refused.output
    assert not (tmp_path / "run").exists()
