"""Memory set by the work in flight, not by the collection: planning N and 10N rows, each in
a process of its own, peaks within a bound that holding the listing again would break.

The bound: what DuckDB's duplicate check may hold (its own limit, set low here through
LABEL_IMAGES_KEYS_MEMORY) plus a quarter of what the extra rows take in memory as Arrow.
A planner that kept the listing (or its keys as Python strings) passes it by far. The 10^8
figures are the benchmark's (`python -m benchmarks.scale`, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import benchmarks.scale as scale
from tests.conftest import REPO

ROWS = 300_000
DUCKDB_MB = 64


def plan_peak(tmp_path, rows: int) -> dict:
    manifest = tmp_path / f"manifest-{rows}.parquet"
    scale.make_manifest(manifest, rows)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.plan_probe", str(manifest), str(tmp_path / f"run-{rows}"),
         "1000", "key"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "LABEL_IMAGES_KEYS_MEMORY": f"{DUCKDB_MB}MB"})
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    assert found["rows"] == rows
    found["listing_mb"] = pq.read_table(manifest).nbytes / 2**20  # the listing, held
    return found


def test_planning_ten_times_the_rows_does_not_hold_the_listing(tmp_path, monkeypatch):
    # row groups smaller than both listings: what the reader holds is the same in both
    monkeypatch.setattr(scale, "ROWS_PER_GROUP", 100_000)
    small, large = plan_peak(tmp_path, ROWS), plan_peak(tmp_path, 10 * ROWS)
    growth = large["peak_rss_mb"] - small["peak_rss_mb"]
    held = large["listing_mb"] - small["listing_mb"]
    assert held > 100  # the sizes mean something: the extra rows are worth holding
    assert growth < DUCKDB_MB + held / 4, (
        f"planning {10 * ROWS:,} rows peaked {growth:.0f} MB above {ROWS:,}; the extra "
        f"listing is {held:.0f} MB", small, large)


@pytest.mark.parametrize("rows", [ROWS])
def test_the_probe_reports_its_own_peak_not_its_parents(tmp_path, rows):
    """A child's ru_maxrss starts from its parent's at the fork; VmHWM is its own: a pytest
    process holding 400 MB does not show in the probe's figure."""
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touched: resident
    found = plan_peak(tmp_path, rows)
    assert found["peak_rss_mb"] < 400
    del ballast
