"""Options a kind declares for itself (a format's, an engine's, a runtime's): given as
`--option NAME=VALUE` or in the config file's `[options]` table, checked and typed by the
kind that declares them, so a new kind with options is still its module and one line."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UsageError


@dataclass(frozen=True)
class Option:
    name: str
    type: type = str  # str, int, float or bool
    help: str = ""

    def parse(self, value):
        """The value as this option's type; from a flag it is text."""
        if isinstance(value, str) and self.type is not str:
            text = value.strip().lower()
            try:
                if self.type is bool:
                    if text not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    return text in ("true", "1", "yes")
                return self.type(text)
            except ValueError:
                raise UsageError(f"--option {self.name}={value}: not a {self.type.__name__}"
                                 ) from None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise UsageError(f"--option {self.name}: a {self.type.__name__}, got {value!r}")
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
    """The options among `given` that `kind` declares, typed: what the kind is told."""
    return {o.name: o.parse(given[o.name]) for o in getattr(kind, "options", ())
            if o.name in given}


def check(given: dict, kinds: dict[str, object]) -> None:
    """Every option given is declared by one of this run's kinds ({'format parquet': ...})."""
    known = {o.name for kind in kinds.values() for o in getattr(kind, "options", ())}
    unknown = sorted(set(given) - known)
    if unknown:
        takes = ", ".join(f"{what}: {', '.join(o.name for o in kind.options)}"
                          for what, kind in kinds.items() if getattr(kind, "options", ()))
        raise UsageError(f"--option {unknown[0]}: none of this run's kinds ("
                         f"{', '.join(kinds)}) takes it" + (f"; they take {takes}" if takes
                                                              else ""))
    for kind in kinds.values():
        declared(kind, given)  # each value of its type, or one line
