"""glibc malloc settings for the calibration actor's own process: at most `ARENA_MAX` malloc arenas.

glibc gives threads that allocate at the same time their own arenas (up to 8 per core), each a chain
of 64 MiB heaps that keeps what was freed in it. In the actor, the calibration runs in a Ray worker
thread beside ONNX Runtime's intra-op threads and Ray's own: 6 min into an OCR recogniser's run its
/proc/PID/smaps showed eight ~64 MiB anonymous regions on 64 MiB boundaries (0.75 of its 0.95 GB RSS
anonymous). Fewer arenas let one thread reuse what another freed. A fixed mmap threshold (every
block of 1 MiB or more mapped and unmapped on its own) cut the search's peak further but made each
ONNX Runtime run of the search 2-3x slower (page faults on every tensor; BENCHMARKS.md), so it is
not used. Only where memory comes from changes; no value computed does.

Applied only in the process trtcal owns (the actor), never in a library caller's process; a no-op where
the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["ARENA_MAX", "limit_malloc_arenas"]

logger = logging.getLogger(__name__)

ARENA_MAX = 2
_M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas() -> bool:
    """At most `ARENA_MAX` arenas in this process from now on (once); whether glibc took it.

    Threads that already have an arena keep it; new ones share the existing ones once the limit is reached.
    """
    global _applied
    if _applied is None:
        libc = _glibc()
        _applied = bool(libc is not None and libc.mallopt(_M_ARENA_MAX, ARENA_MAX) == 1)
        logger.debug("malloc: at most %d arenas: %s", ARENA_MAX, _applied)
    return _applied
