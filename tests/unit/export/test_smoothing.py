"""SmoothQuant-style smoothing (trtcal.export.smoothing) on a small post-LN block with outlier channels:
same FP32 function, the residual keeps the unscaled LayerNorm output, the padded positions do not
count, less INT8 error after calibration, same bytes twice, a model without LayerNorm unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtcal.errors import ConfigError
from trtcal.export.smoothing import channel_amax, smooth_model, smoothing_groups, smoothing_scales

K = 16


def post_ln_block() -> onnx.ModelProto:
    """h = LayerNorm(x) (gamma with two outlier channels); y = h @ Wq + (h @ Wk) + h (a residual)."""
    rng = np.random.default_rng(0)
    gamma = np.ones(K, np.float32)
    gamma[[3, 11]] = [12.0, -9.0]  # the outlier channels BERT-class LayerNorm outputs have
    inits = [
        numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.zeros(K, np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal((K, K)).astype(np.float32) * 0.2, "Wq"),
        numpy_helper.from_array(rng.standard_normal((K, K)).astype(np.float32) * 0.2, "Wk"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h", "Wq"], ["q"], name="q_dense"),
        helper.make_node("MatMul", ["h", "Wk"], ["k"], name="k_dense"),
        helper.make_node("Add", ["q", "k"], ["qk"], name="add_qk"),
        helper.make_node("Add", ["qk", "h"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes, "post_ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", K]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", K])], inits,
    )
    # `mask` is read by nothing but the smoothing statistics (as an attention mask input would be).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def feeds(n: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        x = rng.standard_normal((n, 5, K)).astype(np.float32)
        mask = np.ones((n, 5), np.int64)
        mask[:, 3:] = 0
        out.append({"x": x, "mask": mask})
    return out


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in model.graph.input}
    return session.run(["y"], {k: v for k, v in feed.items() if k in names})[0]


def test_same_function_and_the_residual_keeps_the_unscaled_output():
    model = post_ln_block()
    smoothed, report = smooth_model(model, feeds(), alpha=0.5, mask_input="mask")
    onnx.checker.check_model(smoothed, full_check=True)
    assert report.smoothed == {"h": ("q_dense", "k_dense")}
    for feed in feeds(seed=7):
        np.testing.assert_allclose(run(smoothed, feed), run(model, feed), rtol=1e-4, atol=1e-4)
    by_name = {n.name: n for n in smoothed.graph.node}
    assert by_name["q_dense"].input[0] == by_name["k_dense"].input[0] == "h_smoothed"
    assert by_name["residual"].input[1] == "h"
    assert {t.name for t in smoothed.graph.initializer} >= {"h_smooth_inverse", "gamma", "beta"}
    assert not {"Wq", "Wk"} & {t.name for t in smoothed.graph.initializer}  # unscaled weights are read no more


def test_scales_follow_the_formula_and_ignore_padded_positions():
    model = post_ln_block()
    data = feeds()
    for feed in data:
        feed["x"][:, 3:, :] = 1e4  # padding garbage: LayerNorm of it is bounded, but not what real tokens see
    maxima = channel_amax(model, data, ["h"], "mask")["h"]
    real = [np.abs(run_h(model, f))[f["mask"] != 0].max(axis=0) for f in data]
    np.testing.assert_array_equal(maxima, np.maximum(*real))
    w_max = np.maximum(np.abs(numpy_helper.to_array(model.graph.initializer[2])).max(axis=1),
                       np.abs(numpy_helper.to_array(model.graph.initializer[3])).max(axis=1))
    s = smoothing_scales(maxima, w_max, 0.5)
    np.testing.assert_allclose(s, np.sqrt(maxima) / np.sqrt(w_max), rtol=1e-6)
    smoothed, _ = smooth_model(model, data, alpha=0.5, mask_input="mask")
    inverse = next(t for t in smoothed.graph.initializer if t.name == "h_smooth_inverse")
    np.testing.assert_array_equal(numpy_helper.to_array(inverse), (np.float32(1.0) / s).astype(np.float32))
    with pytest.raises(ConfigError, match="alpha"):
        smoothing_scales(maxima, w_max, 1.5)


def run_h(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    from trtcal.model import with_extra_outputs

    session = ort.InferenceSession(with_extra_outputs(model, ["h"]).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["h"], feed)[0]


def test_smoothing_lowers_the_int8_error_of_the_outlier_activation():
    """Calibrated with minmax and simulated exactly: the smoothed block's output is closer to FP32."""
    import trtcal
    from trtcal.batch import batch_from_arrays
    from trtcal.export.qdq import activation_scales, build_qdq

    model = post_ln_block()
    data = feeds(n=16)
    smoothed, _ = smooth_model(model, data, alpha=0.5)
    batch = batch_from_arrays({"x": np.concatenate([f["x"] for f in data])})
    test = feeds(n=16, seed=9)[0]
    reference = run(model, test)
    errors = {}
    for label, m in (("plain", model), ("smoothed", smoothed)):
        m = onnx.ModelProto.FromString(m.SerializeToString())
        del m.graph.input[1]  # the calibration batch feeds x only
        # smooth="off": calibrate's own smoothing (auto) would smooth the plain model as well
        result = trtcal.calibrate(m, batch, algorithms=("minmax",), verdict=False, smooth="off")
        qdq = build_qdq(m, activation_scales(result.amax["minmax"])).model
        errors[label] = float(np.mean((run(qdq, test) - reference) ** 2))
    assert errors["smoothed"] < 0.5 * errors["plain"], errors


def test_same_bytes_twice_and_nothing_to_smooth_without_layernorm():
    model = post_ln_block()
    first, _ = smooth_model(model, feeds(), alpha=0.5, mask_input="mask")
    second, _ = smooth_model(model, feeds(), alpha=0.5, mask_input="mask")
    assert first.SerializeToString() == second.SerializeToString()
    plain = post_ln_block()
    plain.graph.node[0].op_type = "Identity"  # no normalisation: nothing qualifies
    del plain.graph.node[0].input[1:]
    plain.graph.node[0].ClearField("attribute")
    assert smoothing_groups(plain) == {}
    unchanged, report = smooth_model(plain, feeds())
    assert unchanged.SerializeToString() == plain.SerializeToString() and report.smoothed == {}


def test_cli_export_smooth_writes_the_same_model_as_the_api(tmp_path, capsys):
    from trtcal.cli import main

    model = post_ln_block()
    onnx.save(model, tmp_path / "m.onnx")
    data = feeds()
    np.savez(tmp_path / "d.npz", x=np.concatenate([f["x"] for f in data]), mask=np.concatenate([f["mask"] for f in data]))
    rc = main(["export", "smooth", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--mask-input", "mask",
               "--micro-batch", "8", "-o", str(tmp_path / "s.onnx")])
    assert rc == 0
    assert "smoothed 1 tensor(s) read by 2 MatMul(s)" in capsys.readouterr().out
    expected, _ = smooth_model(model, data, alpha=0.5, mask_input="mask")
    from trtcal.export.qdq import serialize_model

    assert (tmp_path / "s.onnx").read_bytes() == serialize_model(expected)
    assert main(["export", "smooth", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--mask-input", "nope",
                 "-o", str(tmp_path / "t.onnx")]) == 2
    assert "--mask-input 'nope' is not in the data" in capsys.readouterr().err
