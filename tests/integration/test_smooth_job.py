"""`trtcal calibrate` (real local Ray, the calibration actor, a local store) on a post-LN block: the
default smooths, publishes the smoothed model with the cache and says which model the cache belongs
to; the store entry records it; a rerun is a hit with the same line; --smooth off is its own entry
and leaves no smoothed model in --output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.unit.export.test_smoothing import post_ln_block
from tests.unit.orchestrator.test_smooth_calibrate import text_arrays
from trtcal.export.smoothing import SMOOTHED_MODEL


def test_default_calibrate_smooths_publishes_the_smoothed_model_and_keys_it(
    ray_local, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trtcal.cli import main

    model = tmp_path / "block.onnx"
    model.write_bytes(post_ln_block().SerializeToString())
    np.savez(tmp_path / "batch.npz", **text_arrays())
    out, store = tmp_path / "out", tmp_path / "store"
    argv = ["calibrate", str(model), "--data", str(tmp_path / "batch.npz"), "--output", str(out), "--store", str(store),
            "-a", "minmax", "--no-verdict"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"smoothed: calibration.cache and model.qdq.onnx belong to {out}/{SMOOTHED_MODEL}" in printed, printed
    qdq = onnx.load(str(out / "model.qdq.onnx"))
    onnx.checker.check_model(qdq, full_check=True)
    dense_inputs = [n.input[0] for n in qdq.graph.node if n.name in ("q_dense", "k_dense")]
    assert len(dense_inputs) == 2 and all(i.startswith("h_smoothed") for i in dense_inputs), dense_inputs  # Q/DQ of the smoothed input
    entry = json.loads((out / "entry.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert entry["key_inputs"]["extra"]["smoothing"] == {"rule": "smoothquant-norm-matmul/1", "alpha": 0.5}
    assert entry["extra"]["smoothing"] == manifest["smoothing"]
    assert manifest["smoothing"]["sites"] == {"h": ["q_dense", "k_dense"]}
    onnx.checker.check_model(onnx.load(str(out / SMOOTHED_MODEL)), full_check=True)

    assert main([*argv, "--json"]) == 0  # the same request: a hit that still says it is smoothed
    again = json.loads(capsys.readouterr().out)
    assert again["cache_hit"] and again["smoothing"] == manifest["smoothing"]

    assert main([*argv, "--smooth", "off", "--json"]) == 0  # its own key: computed, never the smoothed entry
    off = json.loads(capsys.readouterr().out)
    assert not off["cache_hit"] and off["key"] != again["key"] and off["smoothing"] is None
    assert not (out / SMOOTHED_MODEL).exists()  # the stale smoothed model went with the old artifacts
    assert "smoothing" not in json.loads((out / "entry.json").read_text())["key_inputs"]["extra"]
