"""Options a kind declares for itself (a format's, an engine's, a runtime's): given as
`--option NAME=VALUE` or in the config file's `[options]` table, checked and typed by the
kind that declares them, so a new kind with options is still its module and one line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UsageError

# Options that kept a flag (and a config-file key) of their own from before kinds declared
# them: `--table X` is `--option table=X`, told to whichever kind declares `table`.
ALIASED = ("table", "catalog", "int8_agreement", "ray_address", "actors")


def flag(name: str) -> str:
    """How the user spells an option: its own flag where it kept one."""
    return f"--{name.replace('_', '-')}" if name in ALIASED else f"--option {name}"


def given(name: str, value) -> str:
    """An option with its value, as the user gave it (`--actors 0`, `--option gzip=no`)."""
    return f"{flag(name)} {value}" if name in ALIASED else f"--option {name}={value}"


@dataclass(frozen=True)
class Option:
    name: str
    type: type = str  # str, int, float or bool
    help: str = ""
    default: Any = None  # what the kind is told when it is not given (None: nothing)
    valid: Callable[[Any], bool] | None = None  # a typed value's check
    must: str = ""  # what `valid` asks, as the refusal says it ("must be at least 1")

    def parse(self, value):
        """The value as this option's type (from a flag it is text), checked."""
        typed = self._typed(value)
        if self.valid is not None and not self.valid(typed):
            raise UsageError(f"{flag(self.name)} {self.must}, got {value}")
        return typed

    def _typed(self, value):
        if isinstance(value, str) and self.type is not str:
            text = value.strip().lower()
            try:
                if self.type is bool:
                    if text not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    return text in ("true", "1", "yes")
                return self.type(text)
            except ValueError:
                raise UsageError(f"{given(self.name, value)}: not a {self.type.__name__}"
                                 ) from None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise UsageError(f"{flag(self.name)}: a {self.type.__name__}, got {value!r}")
        return value


def parse_flags(flags: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """`--option NAME=VALUE`, repeated, as a dict."""
    found = {}
    for flag in flags or ():
        name, equals, value = flag.partition("=")
        if not equals or not name.strip():
            raise UsageError(f"--option {flag!r}: give it as NAME=VALUE")
        found[name.strip().replace("-", "_")] = value
    return found


def declared(kind, given: dict) -> dict:
    """The options that `kind` declares, typed: those among `given`, and the defaults of
    those not given: what the kind is told."""
    return {o.name: o.parse(given[o.name]) if o.name in given else o.default
            for o in getattr(kind, "options", ())
            if o.name in given or o.default is not None}


def check(given: dict, kinds: dict[str, object],
          registries: dict[str, dict[str, object]] | None = None) -> None:
    """Every option given is declared by one of this run's kinds ({'format parquet': ...});
    one that another kind declares says which (`registries`: {'--format': FORMATS, ...})."""
    known = {o.name for kind in kinds.values() for o in getattr(kind, "options", ())}
    unknown = sorted(set(given) - known)
    for name in unknown:
        elsewhere = {seam: [k for k, kind in registry.items()
                            if name in {o.name for o in getattr(kind, "options", ())}]
                     for seam, registry in (registries or {}).items()}
        elsewhere = {seam: names for seam, names in elsewhere.items() if names}
        if elsewhere:
            raise UsageError(f"{flag(name)} is for " + "; ".join(
                f"{seam} {' or '.join(names)}" for seam, names in elsewhere.items()))
    if unknown:
        takes = ", ".join(f"{what}: {', '.join(o.name for o in kind.options)}"
                          for what, kind in kinds.items() if getattr(kind, "options", ()))
        raise UsageError(f"--option {unknown[0]}: none of this run's kinds ("
                         f"{', '.join(kinds)}) takes it" + (f"; they take {takes}" if takes
                                                              else ""))
    for kind in kinds.values():
        declared(kind, given)  # each value of its type, or one line
