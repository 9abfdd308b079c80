"""torch.compile (inductor, weights frozen) for one batch shape; settings measures whether
compiling repays its time, and the classifier compiles (Classifier.compile)."""

from __future__ import annotations

name = "compile"
own_kernels = False  # torch runs the network: its features (embeddings) are there


def check(device) -> None:
    """Runs wherever torch does."""


def use(classifier, precision=None, batch_size: int | None = None) -> None:
    classifier.compile(fixed_batch=batch_size or classifier.fixed_batch or 1)
