"""`trtcal calibrate --min-sqnr`: below the bar the command fails (exit 2), writes no output and publishes nothing;
the verdict's warning and table reach the user. The command runs as a user runs it (child process, own Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.test_calibrate_dataset import _env
from tests.unit.orchestrator.test_auto_calibrate import outlier_data, outlier_model

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _trtcal(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trtcal", *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=600, check=False)


def test_min_sqnr_below_the_bar_fails_and_publishes_nothing(tmp_path: Path) -> None:
    import onnx

    model = tmp_path / "outlier.onnx"
    onnx.save(outlier_model(), str(model))
    data = tmp_path / "data.npz"
    np.savez(data, **outlier_data())
    store, out = tmp_path / "store", tmp_path / "out"
    env = _env(tmp_path)
    common = [str(model), "--data", str(data), "--store", str(store), "-a", "minmax", "-a", "mse", "--workers", "1"]

    failed = _trtcal("calibrate", *common, "--output", str(out), "--min-sqnr", "200", env=env)
    assert failed.returncode == 2, failed.stderr
    assert "--min-sqnr 200 dB not met" in failed.stderr and "nothing was published" in failed.stderr
    assert not out.exists()

    # Nothing was published: the same calibration is not a store hit (computed again, read-only).
    again = _trtcal("calibrate", *common, "--read-only", "--json", env=env)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["cache_hit"] is False and result["published"] is False
    assert result["verdict"]["default"] == "minmax" and result["verdict"]["warning"].startswith("the written default")
    assert any(w.startswith("the written default 'minmax'") for w in result["warnings"])

    shown = _trtcal("calibrate", *common, "--read-only", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "quality verdict (held-out slice" in shown.stdout and "minmax" in shown.stdout
    assert sum(line.startswith("warning") and "written default" in line for line in shown.stdout.splitlines()) == 1
