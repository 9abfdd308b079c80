"""The registered kinds of the run's six seams, asked across seams: the options they declare.

A kind declares its options (options.py); what the run gives is checked here against the
kinds it uses, and an option another kind declares is refused naming that kind. The CLI's
help lists them from here. Not imported by the job: the engines' registry reaches it.
"""

from __future__ import annotations

from pipeline import engines, formats, options, runtimes, sources
from pipeline.config import RunConfig


def registries(models: bool = False) -> dict[str, dict[str, object]]:
    """Every registered kind by seam, as a flag names it, read now (a kind registered
    later, a plugin's or a test's, counts). `models`: the model families too, whose
    registry loads torch (not for --help)."""
    found = {"--format": formats.FORMATS, "--engine": engines.ENGINES,
             "--runtime": runtimes.RUNTIMES,
             "source": {kind.kind(): kind for kind in sources.KINDS}}
    if models:
        from pipeline import backends

        found["--model"] = {(b.prefix or "torchvision:").rstrip(":"): b
                            for b in backends.BACKENDS}
    return found


def of_run(config: RunConfig) -> dict[str, object]:
    """The kinds this run uses that may declare options; auto: any runtime it may pick."""
    from pipeline.backends import backend_for

    chosen = ([config.runtime] if config.runtime in runtimes.RUNTIMES
              else list(runtimes.RUNTIMES))
    source = type(sources.open_source(config.source_spec()))
    backend = backend_for(config.model)[0]
    return {f"format {config.format}": formats.get(config.format),
            f"engine {config.engine}": engines.get(config.engine),
            **{f"runtime {name}": runtimes.get(name) for name in chosen},
            f"source {source.kind()}": source,
            f"model {(backend.prefix or 'torchvision:').rstrip(':')}": backend}


def check_options(config: RunConfig) -> None:
    """Every option given is one of this run's kinds', of its type: else one line."""
    options.check(config.options, of_run(config), registries(models=True))


def declared(name: str | None = None) -> list[tuple[str, options.Option]]:
    """(the kind as a flag says it, option) of every option the registered kinds declare
    (or of those named `name`), model families' aside (their registry loads torch)."""
    return [(f"{seam} {kind_name}", option)
            for seam, registry in registries().items()
            for kind_name, kind in registry.items() for option in getattr(kind, "options", ())
            if name is None or option.name == name]
