"""glibc malloc settings for the calibration actor's own process, so freed tensors go back to the system.

The auto search's ONNX Runtime sessions run without a memory arena (`simulation_session(low_memory=True)`)
and numpy allocates each micro-batch's arrays anew: every run allocates and frees hundreds of MiB. By
default glibc serves a block below its dynamic mmap threshold (it rises up to 32 MiB with each larger
block freed) from the heap of the allocating thread's arena (64 MiB heaps, up to 8 arenas per core), and
a freed block stays there: the actor's RSS climbed to the arenas' high-water marks, well above what is
live (BENCHMARKS.md, the OCR recogniser's whole-tree peak). With a fixed threshold every block of
`MMAP_THRESHOLD_BYTES` or more is mapped on its own and unmapped when freed; `ARENA_MAX` bounds the
rest. Only where memory comes from changes; no value computed does. The price is time: each block
is mapped and faulted in anew, so one Q/DQ run of the search took 7.7-8.2 s instead of 2.7-4.0 s
(OCR recogniser, 32 lines, loaded VM; BENCHMARKS.md). Two arenas without the fixed threshold did not
bring the tree under 1.5 GiB (1.59 GiB PSS, measured).

Applied only in the process trtcal owns (the actor), never in a library caller's process; a no-op where
the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["ARENA_MAX", "MMAP_THRESHOLD_BYTES", "return_freed_memory_early"]

logger = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 1 << 20  # smaller blocks (Python objects, small tensors) stay in the arenas
ARENA_MAX = 2
# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory_early() -> bool:
    """Set the fixed mmap threshold, the trim threshold and the arena limit in this process (once).

    Returns whether glibc took them. Affects allocations made afterwards.
    """
    global _applied
    if _applied is None:
        libc = _glibc()
        _applied = bool(
            libc is not None
            and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            and libc.mallopt(_M_ARENA_MAX, ARENA_MAX) == 1
        )
        logger.debug("malloc: fixed mmap threshold %d bytes, %d arenas: %s", MMAP_THRESHOLD_BYTES, ARENA_MAX, _applied)
    return _applied

