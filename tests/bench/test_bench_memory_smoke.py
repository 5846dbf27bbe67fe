"""bench_memory.py still runs: two real `trtcal calibrate` process trees (local Ray) sampled from /proc."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_memory_small_runs(efficientnet_path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_memory.py"), "--cases", "npz", "--n", "4,6", "--data-dir", str(tmp_path),
         "--write", str(tmp_path / "rows.jsonl"), "--", "-a", "minmax", "--no-verdict"],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "npz: N 4 -> 6: PSS x" in out.stdout
    rows = json.loads((tmp_path / "rows.jsonl").read_text())["rows"]
    assert [r["n"] for r in rows] == [4, 6]
    # The tree holds the CLI, Ray's processes and the actor: far more than one Python process.
    assert all(r["peak_pss_gib"] > 0.3 and r["peak_rss_gib"] >= r["peak_pss_gib"] and r["tensors"] > 0 for r in rows)
