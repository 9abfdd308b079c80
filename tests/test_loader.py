"""The loader: batches in plan order, laid out as the model takes them."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pipeline import plan as planning
from pipeline.decode import decode
from pipeline.preprocess import Preprocess
from pipeline.loader import make_loader
from pipeline.sources import Source, SourceSpec
from pipeline.storage import Store
from tests.photos import photo_jpeg


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_are_channels_last_and_hold_each_decoded_crop(tmp_path, workers):
    """The model runs channels_last: a batch already in that layout needs no transpose there,
    and, the resize leaving each crop's pixels interleaved, is stacked by copying rows."""
    preprocess = Preprocess(resize=72, crop=64)
    sizes = [(500, 375), (375, 500), (1200, 900), (90, 70)]
    paths = []
    for i, size in enumerate(sizes):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(photo_jpeg(*size, seed=i))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")
    paths.insert(2, tmp_path / "broken.jpg")
    items = pa.table({"key": [p.name for p in paths], "path": [str(p) for p in paths]})
    plan = planning.freeze(items, Store(str(tmp_path / "run")), shard_size=3)

    crops = [decode(p.read_bytes(), preprocess, max_pixels=10**8).image for p in paths
             if p.name != "broken.jpg"]
    assert crops[0].stride()[0] == 1  # the resize's pixels come interleaved, channels last

    source = Source(SourceSpec(str(tmp_path)))  # files by path: what every file source reads
    loader = make_loader(plan, [0, 1], source, preprocess, batch_size=3, workers=workers,
                         max_pixels=10**8, pin_memory=False)
    batches = list(loader)
    assert [b.keys for b in batches] == [["0.jpg", "1.jpg", "broken.jpg"], ["2.jpg", "3.jpg"]]
    assert [b.decoded for b in batches] == [[0, 1], [0, 1]]
    for batch in batches:
        assert batch.images.shape[1:] == (3, 64, 64)
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(torch.cat([b.images for b in batches]), torch.stack(crops))
