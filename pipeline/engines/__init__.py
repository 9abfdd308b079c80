"""The engine seam: who labels a plan's shards, and where. One module each, one line here.

`local` is this process with the launchers' fixed shares (one process, torchrun ranks,
array-job slices); `ray` a queue that Ray actors take shards from as they free up (Ray is
an optional extra: imported when the engine is used). Every engine runs through one
sequence (runner.run_in); engines/base.py says what an engine decides.
"""

from __future__ import annotations

from pipeline.engines import local, ray
from pipeline.engines.base import Engine
from pipeline.errors import UsageError

ENGINES: dict[str, Engine] = {e.name: e for e in (local.ENGINE, ray.ENGINE)}
__all__ = ["ENGINES", "Engine", "get"]


def get(name: str) -> Engine:
    if name not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {name!r}")
    return ENGINES[name]
