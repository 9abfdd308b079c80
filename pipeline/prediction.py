"""A batch's top-k as the model hands it to the writer: numpy arrays, no tensors, no torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """A batch's top-k as the model side hands it over: numpy arrays, no tensors."""

    class_ids: np.ndarray  # int32 (n, k), best first
    scores: np.ndarray  # float32 (n, k), softmax probabilities
    embeddings: np.ndarray | None = None  # float32 (n, d): the head's input, when asked

    @staticmethod
    def join(parts: list[Prediction]) -> Prediction:
        """The predictions of consecutive parts of a batch, as one."""
        embeddings = None
        if parts[0].embeddings is not None:
            embeddings = np.concatenate([p.embeddings for p in parts])
        return Prediction(class_ids=np.concatenate([p.class_ids for p in parts]),
                          scores=np.concatenate([p.scores for p in parts]),
                          embeddings=embeddings)
