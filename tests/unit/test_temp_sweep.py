"""Issue 15 item 9: temp dirs of a run killed with SIGKILL are removed by the next run (real processes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from trtcal._io import owned_temp_dir, sweep_stale_temp_dirs


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_dirs_of_dead_runs_that_nobody_names_are_removed(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = tmp_path / "trtcal-job-abc123"
    (stale / "batch").mkdir(parents=True)
    (stale / "batch" / "batch.arrow").write_bytes(b"x" * 1000)
    (stale / ".trtcal-owner").write_text(str(dead))
    mine = Path(owned_temp_dir("actor", str(tmp_path)))
    foreign = tmp_path / "other-abc"
    foreign.mkdir()
    (foreign / ".trtcal-owner").write_text(str(dead))
    no_owner = tmp_path / "trtcal-ray-zzz"  # not made by owned_temp_dir (e.g. an older trtcal): left alone
    no_owner.mkdir()
    still_used = tmp_path / "trtcal-ray-def456"
    still_used.mkdir()
    (still_used / ".trtcal-owner").write_text(str(dead))
    # A leftover Ray process of the killed run still names its session dir: left alone until it exits.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(still_used / "session_x")])
    while str(still_used).encode() not in Path(f"/proc/{holder.pid}/cmdline").read_bytes():
        time.sleep(0.01)  # until it has exec'd
    try:
        removed = sweep_stale_temp_dirs(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert removed == [str(stale)] and not stale.exists()
    assert mine.exists() and foreign.exists() and still_used.exists() and no_owner.exists()
    assert sweep_stale_temp_dirs(str(tmp_path)) == [str(still_used)]  # its holder is gone now
