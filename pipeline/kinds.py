"""The registered kinds of the run's seams, asked across seams: the options they declare.

A kind declares its options (options.py); what the run gives is checked here against the
kinds it uses, and an option another kind declares is refused naming that kind. The CLI's
help lists them from here. Not imported by the job: the engines' registry reaches it.
"""

from __future__ import annotations

from pipeline import engines, formats, options, runtimes
from pipeline.config import RunConfig

REGISTRIES = {"--format": formats.FORMATS, "--engine": engines.ENGINES,
              "--runtime": runtimes.RUNTIMES}


def of_run(config: RunConfig) -> dict[str, object]:
    """The kinds this run uses that may declare options; auto: any runtime it may pick."""
    chosen = ([config.runtime] if config.runtime in runtimes.RUNTIMES
              else list(runtimes.RUNTIMES))
    return {f"format {config.format}": formats.get(config.format),
            f"engine {config.engine}": engines.get(config.engine),
            **{f"runtime {name}": runtimes.get(name) for name in chosen}}


def check_options(config: RunConfig) -> None:
    """Every option given is one of this run's kinds', of its type: else one line."""
    options.check(config.options, of_run(config), REGISTRIES)


def declared(name: str | None = None) -> list[tuple[str, options.Option]]:
    """(the kind as a flag says it, option) of every option the registered kinds declare
    (or of those named `name`)."""
    return [(f"{seam} {kind_name}", option)
            for seam, registry in REGISTRIES.items()
            for kind_name, kind in registry.items() for option in getattr(kind, "options", ())
            if name is None or option.name == name]
