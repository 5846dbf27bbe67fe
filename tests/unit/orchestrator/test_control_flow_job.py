"""The calibration actor and `trtcal.calibrate` on a model whose MatMuls sit inside If bodies:
a warning for --no-qdq, an error (or an allowed warning) for an export that quantizes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.unit.export.graphs import make_model, rng_weights, vi
from trtcal.config import CalibrationConfig
from trtcal.errors import ModelError
from trtcal.orchestrator.actor import ActorRequest, run_calibration


def body_only_model(top_level_matmul: bool) -> onnx.ModelProto:
    """x[N,4] (-> MatMul w0 -> h) ; cond = ReduceSum(x) > 0 ; If(cond): MatMul(., w_then) else MatMul(., w_else)."""
    source = "h" if top_level_matmul else "x"

    def body(name: str, weight: str) -> onnx.GraphProto:
        node = helper.make_node("MatMul", [source, weight], [f"{name}_out"], name=f"{name}_matmul")
        return helper.make_graph([node], name, [], [vi(f"{name}_out", ["N", 4])])

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], name="total", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=body("then", "w_then"),
                         else_branch=body("else", "w_else")),
    ]
    inits = [("zero", np.array(0.0, np.float32)), ("w_then", rng_weights(2, 4, 4)), ("w_else", rng_weights(3, 4, 4))]
    if top_level_matmul:
        nodes.insert(0, helper.make_node("MatMul", ["x", "w0"], ["h"], name="top_matmul"))
        inits.append(("w0", rng_weights(1, 4, 4)))
    return make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])], inits)


def _request(model: onnx.ModelProto, batch: Path, export_qdq: bool, **cal: object) -> ActorRequest:
    config = CalibrationConfig(algorithms=("minmax",), micro_batch=4, **cal)  # type: ignore[arg-type]
    return ActorRequest(model_bytes=model.SerializeToString(), batch_url=str(batch), calibration=config,
                        export_qdq=export_qdq)


@pytest.fixture
def batch(tmp_path: Path) -> Path:
    path = tmp_path / "batch.npy"
    np.save(path, np.random.default_rng(0).uniform(-1, 1, (8, 4)).astype(np.float32))
    return path


def test_no_qdq_on_a_model_with_bodies_warns_that_only_top_level_tensors_were_calibrated(batch: Path) -> None:
    out = run_calibration(_request(body_only_model(True), batch, export_qdq=False))
    assert len(out.warnings) == 1
    assert "1 If/Loop/Scan bodies" not in out.warnings[0]  # two bodies: then and else
    assert "2 If/Loop/Scan bodies (If 'branch'.else_branch, If 'branch'.then_branch)" in out.warnings[0]
    assert f"only the {out.num_tensors} top-level tensors were calibrated" in out.warnings[0]


def test_export_with_bodies_reports_each_float_tensor_and_writes_a_valid_model(batch: Path) -> None:
    out = run_calibration(_request(body_only_model(True), batch, export_qdq=True))
    onnx.checker.check_model(onnx.load_from_string(out.files["model.qdq.onnx"]), full_check=True)
    assert sorted(w.split(" (")[0] for w in out.warnings) == ["kept float: h", "kept float: h"]


def test_an_export_that_quantizes_nothing_fails_with_the_reason_unless_allowed(batch: Path) -> None:
    with pytest.raises(ModelError, match="quantized nothing: 2 weighted-layer input.*inside If/Loop/Scan bodies"):
        run_calibration(_request(body_only_model(False), batch, export_qdq=True))
    out = run_calibration(_request(body_only_model(False), batch, export_qdq=True, allow_empty=True))
    assert any("quantizes nothing (allowed)" in w for w in out.warnings)


def test_calibrate_with_nothing_selected_names_the_bodies(batch: Path) -> None:
    import trtcal

    model = body_only_model(False)
    with pytest.raises(ModelError, match=r"nothing to calibrate: tensors='quantizable' selects no .*If 'branch'"):
        trtcal.calibrate(model, str(batch), tensors="quantizable")
