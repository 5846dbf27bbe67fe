"""The calibration actor's malloc setting: threads that allocate at once share at most ARENA_MAX arenas.

Each case runs in a fresh process (malloc settings are per process): eight threads allocate at the same
time, then glibc's own report (malloc_info) counts the arenas. glibc's default gives them their own
(the anchor); after `limit_malloc_arenas` there are at most ARENA_MAX.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from trtcal.orchestrator.process_memory import ARENA_MAX

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc settings"
)

PROBE = r"""
import ctypes, json, os, sys, tempfile, threading
import numpy as np
from trtcal.orchestrator.process_memory import limit_malloc_arenas

limited = limit_malloc_arenas() if sys.argv[1] == "limited" else None
barrier = threading.Barrier(8)

def work():
    barrier.wait()
    blocks = [np.ones(1000) for _ in range(2000)]  # 8 KB blocks: from the thread's arena
    barrier.wait()
    del blocks

threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = os.path.join(tempfile.mkdtemp(), "info.xml")
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
print(json.dumps({"limited": limited, "arenas": open(path).read().count("<heap nr=")}))
"""


def _arenas(mode: str) -> dict[str, object]:
    root = str(Path(__file__).resolve().parents[3])
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_threads_share_at_most_arena_max_arenas() -> None:
    limited = _arenas("limited")
    assert limited["limited"] is True and 1 <= limited["arenas"] <= ARENA_MAX, limited
    default = _arenas("default")  # the anchor: glibc's default gives the threads more
    assert default["arenas"] > ARENA_MAX, default
