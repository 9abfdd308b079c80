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
    cache: Path = Path(".")
    options: dict = field(default_factory=dict)  # those it declares, typed (options.py)


@dataclass(frozen=True)
class Expected:
    """What a runtime would take here, for `auto`: the model's images/s at its best batch and
    what it costs once before the first batch (a compile, a conversion), and where the
    figures come from (measured now, kept from this machine's last time, or our prior)."""

    images_per_second: float
    once_seconds: float = 0.0
    source: str = "measured here"

    def seconds(self, pending: int) -> float:
        """What labelling `pending` images would take on it, the once-cost included."""
        rate = self.images_per_second
        return self.once_seconds + (pending / rate if rate else float("inf"))

    def to_dict(self, pending: int) -> dict:
        return {"images_per_second": round(self.images_per_second or 0, 1),
                "once_seconds": round(self.once_seconds, 1), "from": self.source,
                "seconds_for_pending": round(self.seconds(pending), 1)}


class Runtime:
    """A runtime: one module defines one and the registry names it (runtimes/__init__.py).

    `own_kernels`: the network runs outside torch (no torch features, so no embeddings;
    `auto` measures it against torch at its own best batch). `precisions`: the --precision
    values it runs; one that only it offers (int8) makes it the run's runtime.
    Its measured speeds are kept apart from torch eager's under the `speed_key` its
    `prepare` gives the classifier (Classifier.use_network).
    """

    name: str = ""
    own_kernels: bool = False
    precisions: tuple[str, ...] = ("fp16", "bf16", "fp32")
    options: tuple = ()  # options.Option: what it declares (--option NAME=VALUE)
    one_shape: bool = False  # every batch padded to the one shape it was prepared for

    def check(self, device, precision: str = "auto") -> None:
        """A one-line UsageError where it cannot run (its extra missing, another device)."""

    def sample_size(self, precision: str) -> int:
        """How many of the job's first images `prepare` needs (0: none)."""
        return 0

    def prepare(self, classifier, preparing: Preparing = Preparing()) -> dict:
        """Make the classifier run its network this way; the figures to record (run.json's
        `resolved.measured`), by name."""
        raise NotImplementedError

    # What `auto` and the run's settings ask of it (settings.py), over the machine's
    # measurements (tuning.Measurements: measured when first asked, kept per machine).

    def not_weighed(self, measure) -> str | None:
        """Why `auto` does not weigh it for this job (a job too small to repay measuring
        it), cheaply, before anything is measured; None: weighed."""
        return None if measure.worth_measuring else measure.too_few()

    def expected(self, classifier, measure) -> Expected:
        """How fast it labels here and what it costs once. Measuring may prepare the
        classifier for it: `take` keeps what is prepared."""
        with measure.step(f"measuring {classifier.spec.model} on {self.name} against torch "
                          "(prepared once, then cached)"):
            if classifier.runtime != self.name:
                self.prepare(classifier, Preparing(cache=measure.cache))
            speed = measure.speed(self.name, announce=False)
            return Expected(speed.images_per_second() or 0.0)

    def take(self, classifier, measure, preparing: Preparing):
        """Make it the run's: the classifier prepared for it (a preparation made while
        measuring is kept) and its speed here (tuning.Speed: batch size and rate)."""
        if classifier.runtime != self.name:
            model = classifier.spec.model
            what = (f"quantizing {model} to {preparing.precision.upper()} on this job's first "
                    "images and checking it against fp32" if self.sample_size(preparing.precision)
                    else f"preparing {model} for {self.name}")
            with measure.step(what, self.own_kernels):  # the others' preparing is instant
                measure.record.update(self.prepare(classifier, preparing))
        return measure.speed(self.name)

    def settled(self, classifier, measure, speed, batch_size: int) -> None:
        """Once the batch size is final (memory may lower it): figures it keeps or records
        (`speed`: what `take` gave)."""
