"""The output-format seam: a format registered by one line is written, committed, read back,
counted and cleared by the run without the runner, report or run directory naming it."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from pipeline import formats, report, runner
from pipeline.config import RunConfig
from pipeline.errors import UsageError
from pipeline.formats.base import Format
from tests.conftest import write_colour_images


class ArrowFormat(Format):
    """Arrow IPC written as a table format would be: assembled whole, one commit per run."""

    name = "arrow"
    embeddings = False  # as a format that cannot carry them says
    commits = 0

    def assemble(self, store, schema, tables, commit=None):
        ArrowFormat.commits += 1
        with store.writing(self.table_name()) as target:
            with pa.ipc.new_file(target, schema) as sink:
                for table in tables:
                    sink.write_table(table)

    def read(self, store, columns):
        with store.open(self.table_name()) as fh:
            return feather.read_table(fh, columns=columns)

    def statuses(self, store):
        yield self.read(store, ["status"])["status"].combine_chunks()


@pytest.fixture
def arrow(monkeypatch):
    monkeypatch.setitem(formats.FORMATS, "arrow", ArrowFormat())  # the one registry line
    ArrowFormat.commits = 0


def config(tmp_path, checkpoint, **kwargs) -> RunConfig:
    return RunConfig(source=str(tmp_path / "imgs"), out=str(tmp_path / "run"), model="resnet18",
                     weights=str(checkpoint), resize=72, crop=64, workers=0, batch_size=4,
                     shard_size=3, top_k=2, quiet=True, runtime="torch", **kwargs)


def test_a_registered_format_is_assembled_in_one_commit_and_read_back(tmp_path, arrow,
                                                                     colour_checkpoint):
    write_colour_images(tmp_path / "imgs", 7)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    summary = runner.run(config(tmp_path, colour_checkpoint, format="arrow"))
    assert (summary.items, summary.ok, summary.errors) == (8, 7, 1)
    assert ArrowFormat.commits == 1  # three shards, one table commit
    written = feather.read_table(tmp_path / "run" / "labels.arrow")
    assert written.schema.field("labels").type == pa.list_(pa.string())  # the Parquet layout
    assert sorted(written["key"].to_pylist())[0] == "broken.jpg"
    # the report finds it through the format, as it finds Parquet and CSV
    table = pa.concat_tables(report.read_batches(str(tmp_path / "run")))
    assert table.num_rows == 8 and set(table["status"].to_pylist()) == {"ok", "error"}
    # a rerun counts the finished table through the format, and does not commit again
    again = runner.run(config(tmp_path, colour_checkpoint, format="arrow"))
    assert again.already_complete and ArrowFormat.commits == 1
    # --overwrite clears every registered format's table
    runner.run(config(tmp_path, colour_checkpoint, format="parquet", overwrite=True))
    assert not (tmp_path / "run" / "labels.arrow").exists()
    assert pq.read_table(tmp_path / "run" / "labels.parquet").num_rows == 8


def test_what_a_format_cannot_carry_is_refused_before_any_work(tmp_path, arrow,
                                                              colour_checkpoint):
    write_colour_images(tmp_path / "imgs", 2)
    with pytest.raises(UsageError, match="--embeddings cannot be written to arrow: use "
                                         "--format parquet"):
        runner.run(config(tmp_path, colour_checkpoint, format="arrow", embeddings=True))
    assert not (tmp_path / "run").exists()
