"""What an engine is: who labels each of a plan's pending shards, and where."""

from __future__ import annotations

from contextlib import contextmanager

from pipeline.config import RunConfig
from pipeline.launchers import Slice


class Engine:
    """An engine (one module each, one line in engines/__init__.py's ENGINES).

    The run's sequence is runner.run_in's, the same for every engine: open the run
    directory, freeze the plan, hand this process's shards to `label`, merge, summarise.
    An engine decides only where each shard's labelling runs (labeller.label does it in a
    process) and what its share of the plan is.
    """

    name: str = ""
    options: tuple = ()  # options.Option: what this engine declares (--option NAME=VALUE)
    # Whether this process labels its shards itself. One that hands them to others (Ray's
    # driver) still measures the settings it records, then releases its model and device
    # memory before the labelling starts elsewhere.
    labels_here: bool = True

    def check(self, config: RunConfig) -> None:
        """Its refusals of the configuration, before anything is listed or loaded."""

    def part(self, config: RunConfig) -> Slice:
        """This process's share of the plan: the whole of it by default."""
        return Slice()

    @contextmanager
    def session(self, job, store):
        """Around the plan and the labelling: what the engine holds while it runs (a
        cluster connection, a process group); yields the process group the plan is shared
        through, if any."""
        yield None

    def label(self, run_dir, job, plan, shards: list[int], summary, progress) -> None:
        """Label those of `shards` not committed yet, each committed as it completes (into
        run_dir, through commit.py), adding to `summary`'s figures."""
        raise NotImplementedError
