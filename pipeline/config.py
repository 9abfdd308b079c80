"""One frozen run configuration: defaults, then a TOML file, then command-line flags."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import formats, options, runtimes
from pipeline.errors import UsageError
from pipeline.options import ALIASED
from pipeline.preprocess import INPUT_MODES

FORMATS = formats.NAMES  # the built-in ones, for help texts; checks ask the registries
PRECISIONS = ("auto", *runtimes.precisions())
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


@dataclass(frozen=True)
class RunConfig:
    """Everything `label-images run` needs; each field is also a key in the TOML file."""

    source: str
    out: str
    model: str = "resnet50"
    weights: str = "DEFAULT"
    labels: str | None = None
    resize: int | None = None
    crop: int | None = None
    input_mode: str | None = None  # preprocess.INPUT_MODES: colour order and pixel range
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None  # None: chosen for the device
    workers: int | None = None  # None: chosen for the device
    format: str = "parquet"
    top_k: int | None = None  # None: 5, or the model's classes if it has fewer
    shard_size: int | None = None  # None: sized for the job (plan.shard_size_for)
    path_column: str | None = None
    id_column: str | None = None
    image_column: str | None = None  # Parquet with the images' bytes in a column
    root: str | None = None
    keep_columns: tuple[str, ...] = field(default_factory=tuple)
    max_pixels: int = 100_000_000
    allow_duplicates: bool = False
    overwrite: bool = False
    quiet: bool = False
    runtime: str = "auto"  # runtimes.NAMES: what runs the network; auto measures
    num_slices: int | None = None  # slices of an array job; each labels every n-th shard
    slice_index: int | None = None
    incremental: bool = False
    drift_threshold: float = 0.1  # --incremental: the PSI of a shift said in one line (drift.py)
    embeddings: bool = False
    engine: str = "local"  # who hands out the shards: engines.ENGINES
    # what a kind declares for itself (options.py): its format, engine or runtime checks it;
    # --table, --catalog, --int8-agreement, --ray-address and --actors arrive here too
    options: dict[str, Any] = field(default_factory=dict)

    def source_spec(self):
        """What the source seam is asked to open (sources.open_source)."""
        from pipeline.sources.base import SourceSpec

        return SourceSpec(location=self.source, path_column=self.path_column,
                          id_column=self.id_column, root=self.root,
                          keep_columns=self.keep_columns,
                          allow_duplicates=self.allow_duplicates,
                          image_column=self.image_column, options=self.options)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["keep_columns"] = list(self.keep_columns)
        return data


DEFAULT_TOP_K = 5
FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
# The types as Python resolves them, so a new field is type-checked without being listed.
_TYPES = typing.get_type_hints(RunConfig)
# Earlier names, still read from config files and flags: "shards" there meant slices.
ALIASES = {"num_shards": "num_slices", "shard_index": "slice_index"}
# --compile / --no-compile (and `compile = true|false` in a file) say --runtime compile or
# torch: resolved here, so only the runtime travels.
COMPILE_ALIAS = "compile"


def default_out(source: str) -> str:
    """outputs/<source name without suffix>: where a run goes when --out is not given."""
    name = Path(source.rstrip("/")).stem or "run"
    return str(Path("outputs") / name)


def read_toml(path: str) -> dict[str, Any]:
    """Read a config file; keys may be spelled with dashes or underscores."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in FIELDS and name != COMPILE_ALIAS and name not in ALIASED:
            known = ", ".join(sorted([*FIELDS, *ALIASED]))
            raise UsageError(f"unknown key '{key}' in {path} (known keys: {known})")
        values[name] = value
    return values


def resolve(file_values: dict[str, Any], flag_values: dict[str, Any]) -> RunConfig:
    """Merge defaults < config file < flags (flags that are None were not given) and validate."""
    values = dict(file_values)
    values.update({k: v for k, v in flag_values.items() if v is not None})
    if isinstance(file_values.get("options"), dict):  # a flag adds to the file's, or overrides one
        values["options"] = {**file_values["options"], **(flag_values.get("options") or {})}
    _runtime_from_compile(values, flag_values)
    _options_from_their_flags(values, file_values, flag_values)
    if not values.get("source"):
        raise UsageError("no SOURCE given: pass a folder or manifest, or set 'source' in --config")
    if isinstance(values.get("keep_columns"), str):
        values["keep_columns"] = [c.strip() for c in values["keep_columns"].split(",") if c.strip()]
    values.setdefault("out", None)
    if not values["out"]:
        values["out"] = default_out(str(values["source"]))
    for name, value in values.items():
        _check_type(name, value)
    values["keep_columns"] = tuple(values.get("keep_columns", ()))
    values["options"] = {k.replace("-", "_"): v for k, v in (values.get("options") or {}).items()}
    for name in ("source", "out", "labels", "root"):
        if values.get(name) is not None:
            values[name] = os.fspath(values[name])
    weights = values.get("weights")
    if weights is not None and os.path.isfile(weights):
        # a file of the user's: recorded (run.json, the report) as the path that finds it
        # from anywhere later, not as typed in the folder the command ran in
        values["weights"] = os.path.abspath(weights)
    config = RunConfig(**values)
    _check_values(config)
    only = runtimes.offering(config.precision)
    if config.runtime == "auto" and len(only) == 1:  # a precision one runtime offers (int8):
        config = dataclasses.replace(config, runtime=only[0])  # auto never picks it unasked
    return config


def _options_from_their_flags(values: dict[str, Any], file_values: dict[str, Any],
                              flags: dict[str, Any]) -> None:
    """--table and the others that kept a flag (or a file key) of their own: options of the
    kind that declares them, like any --option; a flag over the file, as for any setting."""
    given = dict(values.get("options") or {})
    for name in ALIASED:
        value = values.pop(name, None)
        if value is None:
            continue
        by_flag = flags.get(name) is not None
        if by_flag and name in (flags.get("options") or {}):
            raise UsageError(f"{options.flag(name)} and --option {name} say the same thing: "
                             "give one")
        if by_flag or name not in given:
            given[name] = value
    values["options"] = given


def _runtime_from_compile(values: dict[str, Any], flags: dict[str, Any]) -> None:
    """--compile / --no-compile as the runtime they name (torch.compile, or torch eager)."""
    compile = values.pop(COMPILE_ALIAS, None)
    if compile is None:
        return
    if not isinstance(compile, bool):
        raise UsageError(f"--compile must be true or false, got {compile!r}")
    if flags.get("runtime") is not None and flags.get(COMPILE_ALIAS) is not None:
        raise UsageError("--compile/--no-compile and --runtime say the same thing: give one")
    if flags.get("runtime") is None or flags.get(COMPILE_ALIAS) is not None:
        values["runtime"] = runtimes.COMPILED if compile else runtimes.EAGER


def _check_type(name: str, value: Any) -> None:
    if value is None:
        return
    kind = _TYPES[name]
    if kind in (int, int | None):
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "a whole number"
    elif kind in (bool, bool | None):
        ok = isinstance(value, bool)
        expected = "true or false"
    elif kind in (float, float | None):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number"
    elif kind == dict[str, Any]:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        expected = "a table of NAME = VALUE"
    elif kind == tuple[str, ...]:
        ok = isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value)
        expected = "a list of column names"
    else:
        ok = isinstance(value, (str, os.PathLike))
        expected = "a string"
    if not ok:
        raise UsageError(f"{_flag(name)} must be {expected}, got {value!r}")


def _check_values(config: RunConfig) -> None:
    formats.get(config.format)  # one of the registered formats, or one line
    if "://" not in config.out and os.path.exists(config.out) and not os.path.isdir(config.out):
        raise UsageError(f"--out {config.out} is a file: the output is a directory (the run "
                         "directory, with the table in it); name another")
    if config.input_mode is not None and config.input_mode not in INPUT_MODES:
        raise UsageError(f"--input-mode must be one of {', '.join(INPUT_MODES)}, got "
                         f"{config.input_mode!r}")
    if config.runtime not in runtimes.names():
        raise UsageError(f"--runtime must be one of {', '.join(runtimes.names())}, got "
                         f"{config.runtime!r}")
    precisions = ("auto", *runtimes.precisions())
    if config.precision not in precisions:
        raise UsageError(
            f"--precision must be one of {', '.join(precisions)}, got {config.precision!r}"
        )
    if config.runtime != "auto" and (
            config.precision not in ("auto", *runtimes.get(config.runtime).precisions)):
        raise UsageError(f"--precision {config.precision} runs on --runtime "
                         f"{' or '.join(runtimes.offering(config.precision))}, not "
                         f"{config.runtime}")
    if not _DEVICE_PATTERN.match(config.device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    for name in ("top_k", "shard_size", "max_pixels", "batch_size", "resize", "crop",
                 "num_slices"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UsageError(f"{_flag(name)} must be at least 1, got {value}")
    if not config.drift_threshold > 0:
        raise UsageError(f"--drift-threshold is a PSI above 0 (0.1: a moderate shift), got "
                         f"{config.drift_threshold}")
    if config.workers is not None and config.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {config.workers}")
    if len(set(config.keep_columns)) != len(config.keep_columns):
        raise UsageError(f"--keep-columns names a column twice: {','.join(config.keep_columns)}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
