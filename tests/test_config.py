"""Configuration: defaults < TOML file < flags, validated before any work."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest

from pipeline import engines, formats, runtimes
from pipeline.config import RunConfig, read_toml, resolve
from pipeline.errors import UsageError
from pipeline.kinds import registries
from pipeline.options import ALIASED, check, declared
from tests.conftest import REPO


@pytest.mark.parametrize("name", ["default.toml", "nightly.toml"])
def test_shipped_configs_are_valid(name):
    values = read_toml(str(REPO / "configs" / name))
    config = resolve(values, {"source": "photos"})
    assert isinstance(config, RunConfig)


def test_default_toml_lists_every_option_at_its_default():
    """configs/default.toml says it lists every option at its default: hold it to that."""
    text = (REPO / "configs" / "default.toml").read_text()
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)
                if f.default is not dataclasses.MISSING}
    defaults["keep_columns"] = []
    for name, value in tomllib.loads(text).items():
        assert value == defaults[name], name
    listed = set(tomllib.loads(text)) | set(re.findall(r"^# (\w+) = ", text, re.MULTILINE))
    # and the options that kept a key of their own (ALIASED), as the kinds declare them
    assert listed == {f.name for f in dataclasses.fields(RunConfig)} | set(ALIASED)
    assert "float16" not in text  # embeddings have been float32 since Spark refused float16


def test_precedence_and_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('source = "a"\ntop-k = 3\nkeep_columns = ["x", "y"]\nworkers = 2\n')
    config = resolve(read_toml(str(path)), {"top_k": 7, "workers": None, "source": None})
    assert config.top_k == 7  # flag beats file
    assert config.workers == 2  # a flag not given leaves the file's value
    assert config.keep_columns == ("x", "y")
    assert config.model == "resnet50" and config.shard_size is None  # defaults (sized later)
    assert config.out == "outputs/a"


def test_keep_columns_flag_is_comma_separated():
    assert resolve({}, {"source": "m.csv", "keep_columns": "a, b"}).keep_columns == ("a", "b")


@pytest.mark.parametrize("flags, message", [
    ({}, "no SOURCE given"),
    ({"source": "s", "device": "gpu"}, "--device must be auto, cpu, cuda or cuda:N"),
    ({"source": "s", "top_k": 0}, "--top-k must be at least 1"),
    ({"source": "s", "workers": -1}, "--workers must be 0 or more"),
    ({"source": "s", "quiet": "yes"}, "--quiet must be true or false"),
    ({"source": "s", "keep_columns": "a,a"}, "names a column twice"),
])
def test_bad_values_name_the_option(flags, message):
    with pytest.raises(UsageError, match=message):
        resolve({}, flags)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        read_toml(str(tmp_path / "missing.toml"))
    broken = tmp_path / "broken.toml"
    broken.write_text("top_k = [\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        read_toml(str(broken))


def test_a_weights_file_is_recorded_as_its_absolute_path(tmp_path, monkeypatch):
    """run.json and the report show the weights as a path that finds them later, not as
    typed in the folder the command ran in; names stay names."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "w.pth").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    config = resolve({}, {"source": "photos", "weights": "models/w.pth"})
    assert config.weights == str(tmp_path / "models" / "w.pth")
    assert resolve({}, {"source": "photos", "weights": "IMAGENET1K_V2"}).weights == \
        "IMAGENET1K_V2"
    assert resolve({}, {"source": "photos"}).weights == "DEFAULT"


def test_the_flags_kept_for_declared_options_are_those_options(tmp_path):
    """--table, --catalog, --int8-agreement, --ray-address, --actors (and their config-file
    keys) are the options their kinds declare: told to those kinds, typed and checked there,
    refused for a run whose kinds do not take them, naming the kinds that do."""
    in_file = tmp_path / "job.toml"
    in_file.write_text('table = "from_file"\n[options]\ncatalog = "sqlite:///c.db"\n')
    config = resolve(read_toml(str(in_file)), {"source": "s", "format": "iceberg"})
    assert config.options == {"table": "from_file", "catalog": "sqlite:///c.db"}
    config = resolve(read_toml(str(in_file)), {"source": "s", "format": "delta",
                                               "table": "from_flag"})
    assert config.options["table"] == "from_flag"  # the flag over the file, as for any
    assert formats.of(config).table == "from_flag"  # told to the format that declares it
    with pytest.raises(UsageError, match="--table and --option table say the same thing"):
        resolve({}, {"source": "s", "table": "a", "options": {"table": "b"}})
    # a run recorded before they were options still finds its table
    assert formats.recorded({"format": "delta", "table": "old", "options": {}}).table == "old"
    ray, local = engines.get("ray"), engines.get("local")
    assert declared(ray, {"actors": "2"}) == {"actors": 2}
    with pytest.raises(UsageError, match=r"^--actors must be at least 1, got 0$"):
        check({"actors": "0"}, {"engine ray": ray}, registries())
    with pytest.raises(UsageError, match=r"^--actors is for --engine ray$"):
        check({"actors": "2"}, {"engine local": local}, registries())
    with pytest.raises(UsageError, match=r"^--table is for --format delta or iceberg$"):
        check({"table": "x"}, {"format parquet": formats.get("parquet")}, registries())
    openvino = runtimes.get("openvino")
    assert declared(openvino, {}) == {"int8_agreement": 0.99}  # its default, told
    with pytest.raises(UsageError, match="--int8-agreement is a share of images"):
        declared(openvino, {"int8_agreement": "1.5"})
    with pytest.raises(UsageError, match=r"--option spark_master: a str"):
        declared(engines.get("spark"), {"spark_master": 7})
