"""The runtime seam: what runs the network once it is built; one module each, one line here.

Each module defines a `Runtime` (runtimes/base.py): how it prepares the backend's torch
network (torch eager as built, torch.compile, OpenVINO converting it to its own kernels,
INT8 included), the precisions it offers, its measurements' cache key, and what it costs
once and how fast it runs here (`Runtime.expected`), which `fastest` weighs for `auto` (in
settings.py, and in bench).
The modules load their libraries when used: an extra's runtime is listed without it.
"""

from __future__ import annotations

from pipeline.errors import UsageError
from pipeline.runtimes import compiled, eager, openvino
from pipeline.runtimes.base import Expected, Preparing, Runtime

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (eager.RUNTIME, compiled.RUNTIME,
                                                    openvino.RUNTIME)}
EAGER = eager.RUNTIME.name  # the network as built: what every other is measured against
COMPILED = compiled.RUNTIME.name  # torch.compile of it: settings weighs what compiling costs
__all__ = ["COMPILED", "EAGER", "RUNTIMES", "Expected", "Preparing", "Runtime", "fastest", "get",
           "installed", "names", "offering", "precisions"]


def names() -> tuple[str, ...]:
    return ("auto", *RUNTIMES)


def get(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise UsageError(f"--runtime must be one of {', '.join(names())}, got {name!r}")
    return RUNTIMES[name]


def installed(device) -> list[str]:
    """The runtimes that can run here, for `auto` to measure."""
    found = []
    for name, runtime in RUNTIMES.items():
        try:
            runtime.check(device)
        except UsageError:
            continue
        found.append(name)
    return found


def precisions() -> tuple[str, ...]:
    """Every --precision some runtime runs, in the order they are offered."""
    return tuple(dict.fromkeys(p for r in RUNTIMES.values() for p in r.precisions))


def offering(precision: str) -> list[str]:
    """The runtimes that run `precision`."""
    return [name for name, r in RUNTIMES.items() if precision in r.precisions]


def fastest(pending: int, expected: dict[str, Expected]) -> str:
    """`auto`'s choice: the runtime that labels `pending` images soonest, what it costs once
    included; on a tie, the first named (torch as built, listed first, over the others)."""
    return min(expected, key=lambda name: expected[name].seconds(pending))
