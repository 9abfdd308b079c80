"""The engine seam: who hands out a plan's shards. One module each, one line in ENGINES.

`local` is this process with the launchers' fixed shares (one process, torchrun ranks,
array-job slices); `ray` a queue that Ray actors take shards from as they free up. Each
module has `run(config, *, started)` (a whole run) and `run_in(run_dir, job, progress)`
(the plan of an open run directory: an incremental night's increment), imported only when
chosen: Ray is an optional extra.
"""

from __future__ import annotations

import importlib

from pipeline.errors import UsageError

ENGINES = {"local": "pipeline.runner", "ray": "pipeline.ray_engine"}


def run(config, *, started: float | None = None):
    """Label config.source into config.out with the configured engine; its RunSummary."""
    return engine(config).run(config, started=started)


def run_in(run_dir, job, progress: bool | None = None):
    """Label the plan in an open run directory with the job's engine; its RunSummary."""
    return engine(job.config).run_in(run_dir, job, progress=progress)


def engine(config):
    """The configured engine's module, its own checks of the configuration passed (a
    `check(config)`, where it has one): before anything is listed or loaded."""
    if config.engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {config.engine!r}")
    module = importlib.import_module(ENGINES[config.engine])
    if hasattr(module, "check"):
        module.check(config)
    return module
