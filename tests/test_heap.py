"""The heap kept between batches: a batch's large buffers are not faulted in afresh."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO

# A forward pass's large activations, allocated, written and freed batch after batch; the
# page faults each batch costs, before and after keep_freed_memory, in a fresh process
# (the setting is for the whole process and cannot be undone).
_FAULTS = """
import json, resource, statistics
import torch
from pipeline import heap

def faults_per_batch(batches):
    # the median batch's: one in which the heap still grew (when is up to glibc and the
    # process's history) is not the steady state
    faults = []
    for _ in range(batches):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [torch.ones(2**22 * k) for k in (1, 2, 4)]  # 16, 32 and 64 MB
        del buffers
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(faults)

faults_per_batch(2)
before = faults_per_batch(5)
heap_is = heap.keep_freed_memory()
faults_per_batch(4)  # the heap grows to hold a batch (here over three batches)
print(json.dumps({"before": before, "heap": heap_is, "after": faults_per_batch(7)}))
"""


def _faults(env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", _FAULTS], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **env}, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_batchs_buffers_are_not_faulted_in_again_once_the_heap_is_kept():
    found = _faults({})
    pages = 112 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert found["before"] > pages / 2  # glibc maps and unmaps each large buffer
    assert found["heap"].startswith("glibc, freed memory kept")
    assert found["after"] < pages / 10


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_malloc_setting_of_the_users_own_is_left_alone():
    found = _faults({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"})
    assert found["heap"] == "the user's: GLIBC_TUNABLES"
    assert found["after"] > found["before"] / 2  # as many faults as before: untouched
