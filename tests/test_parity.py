"""The pipeline gives the tutorials' plain loop's labels and scores on the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

from tests.conftest import read_output, write_colour_images

# Scores are softmax probabilities. fp32 differs from the reference only through the
# decoder (libjpeg-turbo vs PIL) and the tensor resize (vs PIL's): at most 3e-4 measured
# here. bf16 keeps 8 bits of mantissa through the network: at most 6e-3 measured.
TOLERANCE = {"fp32": 2e-3, "bf16": 2e-2}


def reference_top_k(paths, checkpoint, resize, crop, k):
    """The tutorials' loop: PIL, Resize, CenterCrop, ToTensor, Normalize, fp32, one at a time."""
    saved = torch.load(checkpoint, weights_only=True)
    net = torchvision.models.resnet18(num_classes=len(saved["categories"]))
    net.load_state_dict(saved["state_dict"])
    net.eval()
    transform = T.Compose([
        T.Resize(resize), T.CenterCrop(crop), T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    results = []
    with torch.no_grad():
        for path in paths:
            x = transform(Image.open(path).convert("RGB")).unsqueeze(0)
            probs = net(x).softmax(dim=1)[0]
            scores, ids = probs.topk(k)
            results.append(([saved["categories"][i] for i in ids], scores.numpy()))
    return results


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preprocessing", [["--resize", "72", "--crop", "64"], []],
                         ids=["72-64", "default-256-224"])
def test_pipeline_matches_the_reference_loop(cli, tmp_path, colour_checkpoint, precision,
                                             preprocessing):
    folder = tmp_path / "imgs"
    write_colour_images(folder, 10, seed=3)
    result = cli("run", folder, "--out", tmp_path / "run", "--model", "resnet18",
                 "--weights", colour_checkpoint, "--top-k", "3", "--precision", precision,
                 "--workers", "1", "--batch-size", "4", "--quiet", *preprocessing)
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "run" / "labels.parquet")
    resize, crop = (72, 64) if preprocessing else (256, 224)
    reference = reference_top_k([folder / k for k in table["key"]], colour_checkpoint,
                                resize, crop, k=3)
    tolerance = TOLERANCE[precision]
    for (ref_labels, ref_scores), labels, scores in zip(reference, table["labels"],
                                                        table["scores"]):
        assert labels[0] == ref_labels[0]
        np.testing.assert_allclose(scores, ref_scores, atol=tolerance)
        # Lower ranks may only swap where the reference itself cannot tell them apart.
        for rank in range(1, 3):
            if labels[rank] != ref_labels[rank]:
                assert abs(ref_scores[rank] - ref_scores[rank - 1]) < 2 * tolerance or \
                       abs(ref_scores[rank] - ref_scores[min(rank + 1, 2)]) < 2 * tolerance
