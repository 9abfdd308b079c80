"""What a runtime is: how it makes the backend's torch network run, and what it offers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Preparing:
    """What a runtime is given to prepare the network, beside the classifier.

    `images(n)`: (crops, looked at): the decodable images among the job's first n (fewer
    in a smaller job: how many were looked at) as uint8 crops; a runtime that calibrates on
    the job's own images, as INT8 does, asks for its `sample_size`;
    `batch_size`: the one batch shape a runtime that compiles for it should take;
    `cache`: the machine's measurement cache, where a runtime keeps what it converts.
    """

    precision: str = "auto"
    batch_size: int | None = None
    images: Callable[[int], tuple[list, int]] | None = None
    agreement: float = 0.99  # a lossy precision's least top-1 agreement with fp32
    cache: Path = Path(".")
    options: dict = field(default_factory=dict)  # those it declares, typed (options.py)


class Runtime:
    """A runtime: one module defines one and the registry names it (runtimes/__init__.py).

    `own_kernels`: the network runs outside torch (no torch features, so no embeddings;
    `auto` measures it against torch at its own best batch). `precisions`: the --precision
    values it runs; one that only it offers (int8) makes it the run's runtime.
    `cache_key`: its measurements (batch sizes, rates) are kept apart from torch eager's
    under it; None shares torch's.
    """

    name: str = ""
    own_kernels: bool = False
    precisions: tuple[str, ...] = ("fp16", "bf16", "fp32")
    cache_key: str | None = None
    options: tuple = ()  # options.Option: what it declares (--option NAME=VALUE)

    def check(self, device, precision: str = "auto") -> None:
        """A one-line UsageError where it cannot run (its extra missing, another device)."""

    def sample_size(self, precision: str) -> int:
        """How many of the job's first images `prepare` needs (0: none)."""
        return 0

    def prepare(self, classifier, preparing: Preparing = Preparing()) -> dict:
        """Make the classifier run its network this way; the figures to record (run.json's
        `resolved.measured`), by name."""
        raise NotImplementedError
