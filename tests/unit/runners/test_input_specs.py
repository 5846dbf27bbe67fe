"""Declared inputs (InputSpec, stored in the batch's spec) fed by the runners: a batch axis that is not
0 (an RNN-style state [2, N, 8]), a scalar constant (sr=16000), a zero state constant."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from trtcal.batch import batch_from_arrays
from trtcal.config import input_specs_to_dict, parse_input_specs
from trtcal.errors import DataError
from trtcal.runners.factory import make_runner


def vad_like_model() -> onnx.ModelProto:
    """y = x @ W + sum(state, axis 0) * float(sr) / 16000: inputs x [N, 16], state [2, N, 8], sr (scalar int64)."""
    w = np.linspace(-1.0, 1.0, 16 * 8, dtype=np.float32).reshape(16, 8)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("ReduceSum", ["state", "axes0"], ["s"], keepdims=0),
        helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["sr_f", "k16000"], ["sr_scale"]),
        helper.make_node("Mul", ["s", "sr_scale"], ["s_scaled"]),
        helper.make_node("Add", ["h", "s_scaled"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "vad_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 8]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor("W", TensorProto.FLOAT, [16, 8], w.ravel()),
         helper.make_tensor("axes0", TensorProto.INT64, [1], [0]),
         helper.make_tensor("k16000", TensorProto.FLOAT, [], [16000.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _data(n: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 16)).astype(np.float32), "state": rng.standard_normal((n, 2, 8)).astype(np.float32)}


def test_undeclared_state_axis_is_refused_naming_the_inputs():
    specs = parse_input_specs({"sr": {"value": 16000}})
    batch = batch_from_arrays(_data(), spec={"inputs": input_specs_to_dict(specs)}, source="/tmp/tmpabc.arrow")
    runner = make_runner(vad_like_model(), kind="onnxruntime")
    with pytest.raises(DataError, match=r"inputs disagree on the batch axis: 'state' \(model \[2, \?, 8\] float32.*'x'.*batch_axis"):
        runner.collect_stats(batch)


def test_batch_axis_1_and_a_scalar_constant_are_fed_as_declared():
    data = _data()
    specs = parse_input_specs({"sr": {"value": 8000}, "state": {"batch_axis": 1}})
    batch = batch_from_arrays(data, spec={"inputs": input_specs_to_dict(specs)})
    runner = make_runner(vad_like_model(), kind="onnxruntime", tensors=["y"])
    stats = runner.collect_stats(batch, micro_batch=4)
    w = np.linspace(-1.0, 1.0, 16 * 8, dtype=np.float32).reshape(16, 8)
    expected = data["x"] @ w + data["state"].sum(axis=1) * np.float32(0.5)
    assert stats["y"].amax == pytest.approx(float(np.abs(expected).max()), rel=1e-6)
    assert stats["y"].count == expected.size


def test_a_constant_zero_state_per_sample_is_repeated_along_its_batch_axis():
    data = {"x": _data()["x"]}
    specs = parse_input_specs({"sr": {"value": 16000}, "state": {"value": 0.0, "shape": [2, 8], "batch_axis": 1}})
    batch = batch_from_arrays(data, spec={"inputs": input_specs_to_dict(specs)})
    runner = make_runner(vad_like_model(), kind="onnxruntime", tensors=["y"])
    stats = runner.collect_stats(batch, micro_batch=3)
    w = np.linspace(-1.0, 1.0, 16 * 8, dtype=np.float32).reshape(16, 8)
    assert stats["y"].amax == pytest.approx(float(np.abs(data["x"] @ w).max()), rel=1e-6)


def test_the_refusal_suggests_the_specs_that_fit_the_model():
    batch = batch_from_arrays(_data(), source="/tmp/tmpabc.npz")
    runner = make_runner(vad_like_model(), kind="onnxruntime")
    # sr missing: the constant and, in the same message, the state's batch axis it will need next.
    with pytest.raises(DataError, match=r"""--inputs '\{"sr": \{"value": VALUE\}, "state": \{"batch_axis": 1\}\}'"""):
        runner.collect_stats(batch)
    with_sr = batch_from_arrays({**_data(), "sr": np.full(10, 16000, dtype=np.int64)}, source="/tmp/tmpabc.npz")
    with pytest.raises(DataError, match=r"""disagree on the batch axis.*--inputs '\{"sr": \{"value": VALUE\}, "state": \{"batch_axis": 1\}\}'"""):
        runner.collect_stats(with_sr)


def test_auto_and_the_verdict_feed_the_declared_layout():
    """auto's search and the verdict run the model themselves: they must feed the state on axis 1 and
    the sr constant as the runners do (they fed the raw columns: ONNX Runtime refused the feed)."""
    import trtcal

    specs = parse_input_specs({"sr": {"value": 16000}, "state": {"batch_axis": 1}})
    batch = batch_from_arrays(_data(40), spec={"inputs": input_specs_to_dict(specs)})
    result = trtcal.calibrate(vad_like_model(), batch, micro_batch=3)
    assert result.algorithms[0] == "auto"
    verdict = result.manifest["verdict"]
    assert not verdict.get("skipped"), verdict
    assert verdict["rows"]["auto"]["outputs"]["y"]["sqnr_db"] > 20


def test_declared_inputs_reach_a_given_npz_and_must_match_a_built_arrow(tmp_path):
    """`trtcal calibrate --data x.npz --inputs ...`: the specs go into the .npz batch (they were
    silently ignored); an .arrow batch built with other specs is refused, naming both."""
    from trtcal.batch import write_batch
    from trtcal.errors import ConfigError
    from trtcal.orchestrator.actor import open_given_batch

    model = vad_like_model().SerializeToString()
    declared = input_specs_to_dict(parse_input_specs({"sr": {"value": 8000}, "state": {"batch_axis": 1}}))
    np.savez(tmp_path / "b.npz", **_data())
    batch = open_given_batch(str(tmp_path / "b.npz"), model, {}, declared)
    assert batch.spec["inputs"] == declared
    stats = make_runner(vad_like_model(), kind="onnxruntime", tensors=["y"]).collect_stats(batch, micro_batch=4)
    assert stats["y"].count == 10 * 8
    write_batch(tmp_path / "b.arrow", _data(), [f"r{i}" for i in range(10)], spec={})
    with pytest.raises(ConfigError, match=r"--inputs .*differ from the input specs batch .*b\.arrow.* was built with"):
        open_given_batch(str(tmp_path / "b.arrow"), model, {}, declared)
    assert open_given_batch(str(tmp_path / "b.arrow"), model, {}, {}).num_rows == 10
