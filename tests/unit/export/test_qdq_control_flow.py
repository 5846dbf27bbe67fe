"""Control flow (If bodies reading outer initializers): a valid Q/DQ model, per-tensor report lines,
and an error instead of a silent empty result."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.unit.export.graphs import make_model, rng_weights, run, vi
from trtcal.cli import main
from trtcal.errors import ModelError
from trtcal.export.qdq import activation_scales, build_qdq, require_quantized


def branching(with_top_level_matmul: bool = True) -> onnx.ModelProto:
    """x[N,4] -> (MatMul w0 -> h) -> If(cond): then MatMul(h, w_then), else MatMul(h, w_else) -> y.

    w_then and w_else are top-level initializers that only the If bodies read.
    """
    source = "h" if with_top_level_matmul else "x"

    def body(name: str, weight: str) -> onnx.GraphProto:
        node = helper.make_node("MatMul", [source, weight], [f"{name}_out"], name=f"{name}_matmul")
        return helper.make_graph([node], name, [], [vi(f"{name}_out", ["N", 4])])

    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=body("then", "w_then"),
                              else_branch=body("else", "w_else"))]
    if with_top_level_matmul:
        nodes.insert(0, helper.make_node("MatMul", ["x", "w0"], ["h"], name="top_matmul"))
    inits = [("w_then", rng_weights(2, 4, 4)), ("w_else", rng_weights(3, 4, 4))]
    if with_top_level_matmul:
        inits.insert(0, ("w0", rng_weights(1, 4, 4)))
    inputs = [vi("x", ["N", 4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    return make_model(nodes, inputs, [vi("y", ["N", 4])], inits)


def test_initializers_read_only_by_if_bodies_are_kept_and_the_model_passes_the_full_check() -> None:
    model = branching()
    export = build_qdq(model, activation_scales({"x": 2.0, "h": 3.0, "y": 4.0}))
    q = export.model
    onnx.checker.check_model(q, full_check=True)
    kept = {t.name for t in q.graph.initializer}
    assert {"w_then", "w_else"} <= kept and "w0" not in kept  # w0 became its int8 copy
    assert export.report.quantized_nodes == ("top_matmul",)
    x = np.random.default_rng(0).uniform(-2, 2, (3, 4)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(run(q, feed), run(model, feed), rtol=0.1, atol=0.2)


def test_weighted_layers_inside_bodies_get_one_report_line_per_tensor() -> None:
    export = build_qdq(branching(), activation_scales({"x": 2.0, "h": 3.0}))
    lines = export.report.float_in_subgraphs
    assert len(lines) == 2
    then_line = next(line for line in lines if "then_matmul" in line)
    assert then_line.startswith("h (input of MatMul 'then_matmul' in If 'branch'.then_branch): kept float")
    assert all("not calibrated" in line for line in lines)
    assert export.report.to_dict()["float_in_subgraphs"] == list(lines)


def test_an_export_that_quantizes_nothing_is_an_error_unless_allowed(caplog: pytest.LogCaptureFixture) -> None:
    export = build_qdq(branching(with_top_level_matmul=False), activation_scales({"x": 2.0}))
    assert export.report.is_empty
    onnx.checker.check_model(export.model, full_check=True)
    with pytest.raises(ModelError, match=r"quantized nothing: 2 weighted-layer input\(s\) lie inside If/Loop/Scan"):
        require_quantized(export.report, allow_empty=False)
    require_quantized(export.report, allow_empty=True)
    assert "allowed by allow_empty" in caplog.text


def test_cli_export_exits_non_zero_on_an_empty_result_and_writes_with_allow_empty(tmp_path, capsys) -> None:
    import json

    onnx.save(branching(with_top_level_matmul=False), tmp_path / "m.onnx")
    (tmp_path / "r.json").write_text(json.dumps({"x": 2.0}))
    args = ["export", "qdq", str(tmp_path / "m.onnx"), "--ranges", str(tmp_path / "r.json"), "-o", str(tmp_path / "q.onnx")]
    assert main(args) != 0
    assert "quantized nothing" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()
    assert main([*args, "--allow-empty"]) == 0
    err = capsys.readouterr().err
    assert "kept float: x (input of MatMul 'then_matmul'" in err
    onnx.checker.check_model(onnx.load(str(tmp_path / "q.onnx")), full_check=True)
