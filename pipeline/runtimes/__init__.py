"""The runtime seam: what runs the network once it is built; one module each, one line here.

A runtime module has `name`, `own_kernels` (True where the network runs outside torch: no
torch features, so no embeddings; auto measures it against torch), `check(device)` (a
one-line refusal where it cannot run: its extra missing, a device it does not run on), and
`use(classifier, precision, ...)`, which makes the classifier run its network that way; a
network with threads of its own has `with_threads(n)` (those the decode workers leave).
torch eager is the network as built; compile is torch.compile of it (settings measures
whether it pays); OpenVINO converts it and runs it with its own CPU kernels. `auto`
measures the installed ones (settings.resolve).
Imported when used: a module's library is an optional extra.
"""

from __future__ import annotations

import importlib

from pipeline.errors import UsageError

RUNTIMES = {"torch": "pipeline.runtimes.eager", "compile": "pipeline.runtimes.compiled",
            "openvino": "pipeline.runtimes.openvino"}
NAMES = ("auto", *RUNTIMES)


def get(name: str):
    if name not in RUNTIMES:
        raise UsageError(f"--runtime must be one of {', '.join(NAMES)}, got {name!r}")
    return importlib.import_module(RUNTIMES[name])


def installed(device) -> list[str]:
    """The runtimes that can run here, for `auto` to measure."""
    found = []
    for name in RUNTIMES:
        try:
            get(name).check(device)
        except UsageError:
            continue
        found.append(name)
    return found
