"""A real model with control flow and an LSTM (silero-vad 6.2.3) through `trtcal calibrate` on real local
Ray, fed deterministic speech-like audio streamed through the model (tests/fixtures/audio.py says how).

* `silero_vad_16k_op15.onnx`: Conv feature extractor at the top level, the LSTM decoder inside `If`
  branches. Its `state` input carries the batch on axis 1 and `sr` is a scalar: without `--inputs`
  the refusal names both and the exact `--inputs` to pass; with it, the top-level tensors are
  calibrated, the six Convs get Q/DQ, the LSTM inputs inside the branches stay float with one
  report line each, and the Q/DQ model passes the full ONNX check and stays close to FP32.
* `silero_vad.onnx`: everything (the whole network) inside one `If`: the export quantizes nothing,
  so the run fails (exit 2) saying why, unless `--allow-empty`.

Skipped with the reason when pip cannot download the pinned wheel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.fixtures.audio import SAMPLE_RATE, fetch_silero_vad, speech_like, streaming_rows
from tests.fixtures.data import MODEL_CACHE_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INPUTS = json.dumps({"state": {"batch_axis": 1}, "sr": {"value": SAMPLE_RATE}})


def _model(member: str) -> Path:
    try:
        return fetch_silero_vad(MODEL_CACHE_DIR, member)
    except RuntimeError as exc:
        pytest.skip(f"silero-vad is not available: {exc}")


@pytest.fixture(scope="module")
def vad_model() -> Path:
    return _model("silero_vad/data/silero_vad_16k_op15.onnx")


@pytest.fixture(scope="module")
def streamed(vad_model: Path) -> dict[str, np.ndarray]:
    """8 calibration waveforms (seeds 0-7) and 4 evaluation ones (seeds 100-103), 4 s each, streamed."""
    return {
        "calibration": streaming_rows(vad_model, [speech_like(4.0, seed) for seed in range(8)]),
        "evaluation": streaming_rows(vad_model, [speech_like(4.0, seed) for seed in range(100, 104)]),
    }


@pytest.fixture(scope="module")
def vad_batch(streamed: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = streamed["calibration"]
    assert 0.2 < float(np.mean(rows["speech"] > 0.5)) < 0.9  # the model hears speech and pauses in it
    path = tmp_path_factory.mktemp("vad") / "vad.npz"
    np.savez(path, input=rows["input"][::4], state=rows["state"][::4])  # 250 of the 1000 calls
    return path


def test_undeclared_state_axis_and_constant_are_refused_naming_the_inputs(
    ray_local, vad_model: Path, vad_batch: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trtcal.cli import main

    out = tmp_path / "out"
    rc = main(["calibrate", str(vad_model), "--data", str(vad_batch), "--output", str(out),
               "--store", str(tmp_path / "store")])
    assert rc == 2
    err = capsys.readouterr().err
    assert """--inputs '{"sr": {"value": VALUE}, "state": {"batch_axis": 1}}'""" in err, err
    assert not out.exists()


def test_top_level_calibrated_subgraphs_float_and_reported(
    ray_local, vad_model: Path, vad_batch: Path, streamed: dict[str, np.ndarray], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import onnxruntime as ort

    from trtcal.cli import main

    out = tmp_path / "out"
    rc = main(["calibrate", str(vad_model), "--data", str(vad_batch), "--inputs", INPUTS, "--output", str(out),
               "--store", str(tmp_path / "store")])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    # The LSTM inputs inside the If branches stay float: one warning line each in the result table,
    # naming the tensor, the layer and the branch.
    for branch in ("then_branch", "else_branch"):
        assert f"(input of LSTM '/model/decoder/rnn{'' if branch == 'then_branch' else '_1'}/LSTM' in If " \
               f"'/model/decoder/If_1'.{branch}): kept float" in printed.out, printed.out
    qdq = onnx.load(str(out / "model.qdq.onnx"))
    onnx.checker.check_model(qdq, full_check=True)
    quantized = {n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in qdq.graph.node if n.op_type == "Conv"]
    assert len(convs) == 6 and all(n.input[0] in quantized and n.input[1] in quantized for n in convs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensors"] >= 6  # the top-level tensors (subgraph tensors are not exposed)

    # Exact simulation on held-out audio: the speech probability stays close to FP32's.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    rows = streamed["evaluation"]
    feed = {"input": rows["input"], "state": np.ascontiguousarray(np.moveaxis(rows["state"], 0, 1)),
            "sr": np.array(SAMPLE_RATE, dtype=np.int64)}
    fp32 = ort.InferenceSession(str(vad_model), options, providers=["CPUExecutionProvider"]).run(["output"], feed)[0]
    int8 = ort.InferenceSession(str(out / "model.qdq.onnx"), options, providers=["CPUExecutionProvider"]).run(["output"], feed)[0]
    error, agreement = float(np.abs(int8 - fp32).mean()), float(np.mean((int8 > 0.5) == (fp32 > 0.5)))
    print(f"speech probability: mean |INT8 - FP32| {error:.4f}, decisions agree {agreement:.4f} ({len(fp32)} chunks)")
    assert error < 0.02 and agreement >= 0.95


def test_a_model_with_everything_inside_if_fails_naming_why(
    ray_local, vad_batch: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trtcal.cli import main

    model = _model("silero_vad/data/silero_vad.onnx")
    args = ["calibrate", str(model), "--data", str(vad_batch), "--inputs", INPUTS,
            "--store", str(tmp_path / "store")]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "quantized nothing" in err and "inside If/Loop/Scan bodies" in err and "--allow-empty" in err, err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--output", str(tmp_path / "allowed"), "--allow-empty"]) == 0
    onnx.checker.check_model(onnx.load(str(tmp_path / "allowed" / "model.qdq.onnx")), full_check=True)
