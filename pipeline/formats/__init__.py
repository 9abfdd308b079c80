"""The output format seam: how the final table is written; one module per format, one line each.

Parts are always Parquet (the run's own files); a format decides only the final table.
"""

from __future__ import annotations

from pipeline.errors import UsageError
from pipeline.formats.base import Format
from pipeline.formats.csv import CsvFormat
from pipeline.formats.delta import DeltaFormat
from pipeline.formats.iceberg import IcebergFormat
from pipeline.formats.parquet import ParquetFormat
from pipeline.options import declared

FORMATS: dict[str, Format] = {"parquet": ParquetFormat(), "csv": CsvFormat(),
                              "delta": DeltaFormat(), "iceberg": IcebergFormat()}
NAMES = tuple(FORMATS)


def get(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise UsageError(f"--format must be one of {', '.join(NAMES)}, got {name!r}") from None


def of(config) -> Format:
    """The run's format, told the options it declares (a table format: where its table
    lives, --table and --catalog)."""
    return recorded(vars(config) if not isinstance(config, dict) else config)


def recorded(config: dict, name: str | None = None) -> Format:
    """The format `name` (default: the run's) as a run's configuration (run.json's
    `config`) set it up; another format than the run's takes none of its options."""
    name = name or config["format"]
    fmt = get(name)
    if name != config.get("format"):
        return fmt.configured({})
    # a run recorded before these were options kept them beside the others
    earlier = {name: config[name] for name in ("table", "catalog") if config.get(name)}
    return fmt.configured(declared(fmt, {**earlier, **(config.get("options") or {})}))
