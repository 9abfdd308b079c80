"""The local engine: this process labels its share (one process, a torchrun rank, a slice
of an array job: launchers.py says which)."""

from __future__ import annotations

from contextlib import contextmanager

from pipeline import launchers
from pipeline.engines.base import Engine
from pipeline.errors import UsageError
from pipeline.launchers import ProcessGroup, Slice


class Local(Engine):
    name = "local"

    def part(self, config) -> Slice:
        part = launchers.from_environment(config.num_slices, config.slice_index)
        if config.overwrite and not part.whole and not part.distributed:
            raise UsageError("--overwrite would let each slice wipe the others' work: clear "
                             "the run directory once before starting the array job instead")
        return part

    @contextmanager
    def session(self, job, store):
        # torchrun's ranks share the plan's verdict and wait for each other's shards
        group = ProcessGroup(job.part, backend="gloo") if job.part.distributed else None
        try:
            yield group
        finally:
            if group is not None:
                group.close()

    def label(self, run_dir, job, plan, shards, summary, progress) -> None:
        from pipeline import labeller  # torch: imported when labelling, not for --help

        labeller.label(run_dir, job, plan, summary, progress, shards)


ENGINE = Local()
