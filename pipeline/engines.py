"""The engine seam: who hands out a plan's shards. One module each, one line in ENGINES.

`local` is this process with the launchers' fixed shares (one process, torchrun ranks,
array-job slices); `ray` a queue that Ray actors take shards from as they free up. Each
module has `run(config, *, started)`, imported only when chosen: Ray is an optional extra.
"""

from __future__ import annotations

import importlib

from pipeline.errors import UsageError

ENGINES = {"local": "pipeline.runner", "ray": "pipeline.ray_engine"}


def run(config, *, started: float | None = None):
    """Label config.source into config.out with the configured engine; its RunSummary."""
    if config.engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {config.engine!r}")
    if config.incremental and config.engine == "local":
        from pipeline import incremental

        return incremental.run(config, started=started)
    return importlib.import_module(ENGINES[config.engine]).run(config, started=started)
