"""torch eager: the network as the backend built it, on the classifier's device and dtype."""

from __future__ import annotations

name = "torch"
own_kernels = False  # torch runs the network: its features (embeddings) are there


def check(device) -> None:
    """Runs wherever torch does."""


def use(classifier, precision=None) -> None:
    classifier.use_network(classifier.eager_net, name)
