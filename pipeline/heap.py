"""The process's heap kept between batches: large buffers are not handed back to the OS.

glibc's malloc serves a large allocation (above 32 MB at most, 128 KB at first) with a
fresh mmap and returns it at free, and trims freed memory at the top of its heap: every
batch then faults its activations' pages in again, and the kernel zeroes each one. A
ResNet-50 batch of 64 in bf16 has several buffers of ~100 MB. Measured on 2 EPYC cores
(docs/benchmarks.md): the eager model at batch 64 went from 44-48 to 75-81 images/s and
at batch 8 from 54-74 (varying with the process's history) to 72-76. This is what
PyTorch's CPU tuning guides get from jemalloc or tcmalloc, done with glibc's own knobs.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_LARGEST = 2**31 - 1  # mallopt takes an int
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


_state = "unchanged"  # what keep_freed_memory did in this process


def state() -> str:
    """What this process's heap does with freed memory: part of the key under which a
    measurement of the model's speed is kept, since it changes that speed."""
    return _state


def keep_freed_memory() -> str:
    """Large allocations from the heap, and freed memory kept there for the next batch;
    says what was done (for run.json). A malloc setting or allocator of the user's own
    (GLIBC_TUNABLES, LD_PRELOAD) is left as it is."""
    global _state
    _state = _keep_freed_memory()
    return _state


def _keep_freed_memory() -> str:
    preloaded = os.environ.get("LD_PRELOAD", "")
    if any(name in preloaded for name in _OTHER_ALLOCATORS):
        return f"the user's: LD_PRELOAD={preloaded}"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "the user's: GLIBC_TUNABLES"
    if platform.libc_ver()[0] != "glibc":
        return "the platform's, unchanged (not glibc)"
    libc = ctypes.CDLL(None)
    # Set once for the process: the decode workers it forks inherit it. The heap then
    # stays at its peak (the largest batch's working set) until the process ends.
    if libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST):
        return "glibc, freed memory kept (mallopt: no mmap, no trim)"
    return "glibc, unchanged (mallopt refused)"
