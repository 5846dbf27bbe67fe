"""Benchmarks still run (no timing asserts: machines are noisy; the figures live in BENCHMARKS.md)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_core_quick_runs() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_core.py"), "--quick"], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "entropy2 (trtcal" in out.stdout and "ONNX Runtime HistogramCollector" in out.stdout
    assert "GB/s" in out.stdout


def test_bench_auto_small_runs(efficientnet_path) -> None:
    model = efficientnet_path
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_auto.py"), "--calib", "12", "--eval", "4",
                          "--model", str(model)], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "auto search:" in out.stdout and "x the statistics" in out.stdout
    assert "| auto |" in out.stdout and "auto - best single method" in out.stdout
