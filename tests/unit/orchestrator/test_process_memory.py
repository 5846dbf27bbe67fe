"""The calibration actor's malloc settings: freed tensors of a worker thread go back to the system.

Each case runs in a fresh process (malloc settings are per process). The pattern is the auto search's:
a thread allocates many MiB-sized arrays, keeps the last one and frees the rest. With glibc's defaults
the freed blocks stay in the thread's arena once a larger block has raised the dynamic mmap threshold;
with `return_freed_memory_early` each one was mapped on its own and is unmapped when freed.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc settings"
)

PROBE = r"""
import json, sys, threading
import numpy as np
from trtcal.orchestrator.process_memory import return_freed_memory_early

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))

tuned = return_freed_memory_early() if sys.argv[1] == "tuned" else None
result = {}

def work():
    big = np.ones(16 << 17)  # 16 MiB allocated and freed: glibc's dynamic threshold rises to it
    del big
    before = rss_mib()
    arrays = [np.ones(2 << 17) for _ in range(100)]  # 100 x 2 MiB, touched
    held = rss_mib()
    del arrays[:-1]  # the last one stays: the heap cannot shrink from its top
    result.update(before=before, held=held, after=rss_mib())

thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({"tuned": tuned, **result}))
"""


def _run(mode: str) -> dict[str, int]:
    root = str(Path(__file__).resolve().parents[3])
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_blocks_of_a_worker_thread_return_to_the_system() -> None:
    tuned = _run("tuned")
    assert tuned["tuned"] is True
    assert tuned["held"] - tuned["before"] >= 150  # the 200 MiB were really resident
    assert tuned["after"] - tuned["before"] < 30, tuned  # all but the last 2 MiB went back
    default = _run("default")  # the anchor: glibc's defaults keep them
    assert default["held"] - default["before"] >= 150
    assert default["after"] - default["before"] > 150, default
