"""Q/DQ export on tiny onnx.helper graphs: placement, axes, zero points, scales, rules, determinism."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.unit.export.graphs import (
    conv_transpose_gemm,
    fake_quant,
    initializer,
    make_model,
    mlp,
    node,
    producer,
    q_of,
    residual_cnn,
    residual_cnn_amax,
    rng_weights,
    run,
    vi,
)
from trtcal.core import write_trt_cache
from trtcal.errors import CacheFormatError, ConfigError, ModelError
from trtcal.export.qdq import (
    QdqConfig,
    activation_scales,
    amax_for_method,
    build_qdq,
    export_qdq,
    last_smoothing_nodes,
    qdq_from_cache,
    read_ranges,
    save_model,
    serialize_model,
)


def dq_feeding(model: onnx.ModelProto, node_name: str, input_index: int) -> onnx.NodeProto | None:
    src = producer(model, node(model, node_name).input[input_index])
    return src if src is not None and src.op_type == "DequantizeLinear" else None


def scale_of(model: onnx.ModelProto, dq: onnx.NodeProto) -> np.ndarray:
    return initializer(model, dq.input[1])


def axis_of(dq: onnx.NodeProto) -> int | None:
    for a in dq.attribute:
        if a.name == "axis":
            return a.i
    return None


def test_result_passes_full_checker_and_runs_in_onnxruntime() -> None:
    q = export_qdq(residual_cnn(), residual_cnn_amax())
    onnx.checker.check_model(q, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    out = run(q, {"x": x})
    assert out.shape == (2, 5, 6, 6) and np.all(np.isfinite(out))
    assert [o.name for o in q.graph.output] == ["y"]  # network outputs keep their names and stay FP32


def test_conv_inputs_quantized_weights_per_output_channel_axis_0() -> None:
    model = residual_cnn()
    q = export_qdq(model, residual_cnn_amax())
    for conv, weight in (("conv1", "w1"), ("conv2", "w2")):
        act_dq = dq_feeding(q, conv, 0)
        w_dq = dq_feeding(q, conv, 1)
        assert act_dq is not None and w_dq is not None
        assert axis_of(w_dq) == 0
        w = initializer(model, weight)
        expected = np.abs(w).reshape(w.shape[0], -1).max(axis=1).astype(np.float32) / np.float32(127)
        expected = np.where(expected > 0, expected, np.float32(1.0))
        np.testing.assert_array_equal(scale_of(q, w_dq), expected.astype(np.float32))
        q_weight = initializer(q, w_dq.input[0])
        assert q_weight.dtype == np.int8 and q_weight.shape == w.shape
        # Biases stay float and unquantized.
    assert producer(q, node(q, "conv1").input[2]) is None


def test_activation_scale_is_float32_amax_over_127() -> None:
    q = export_qdq(residual_cnn(), residual_cnn_amax())
    dq = dq_feeding(q, "conv1", 0)
    assert dq is not None
    scale = scale_of(q, dq)
    assert scale.shape == () and scale.dtype == np.float32
    assert scale == np.float32(np.float32(3.0) / np.float32(127.0))


def test_every_zero_point_is_int8_zero_and_every_scale_strictly_positive() -> None:
    amax = dict(residual_cnn_amax(), r1=0.0)  # an all-zero activation
    q = export_qdq(residual_cnn(), amax)
    qdq = q_of(q, "QuantizeLinear") + q_of(q, "DequantizeLinear")
    assert qdq
    for n in qdq:
        assert len(n.input) == 3, "explicit zero point (uint8 would be the default)"
        zp = initializer(q, n.input[2])
        assert zp.dtype == np.int8 and not zp.any()
        scale = initializer(q, n.input[1])
        assert scale.dtype == np.float32 and np.all(scale > 0) and np.all(np.isfinite(scale))
    # The all-zero weight channel of w2 got scale 1.0, as did the all-zero activation.
    w_dq = dq_feeding(q, "conv2", 1)
    assert scale_of(q, w_dq)[1] == np.float32(1.0)
    assert scale_of(q, dq_feeding(q, "conv2", 0)) == np.float32(1.0)


def test_residual_add_quantizes_the_skip_input_so_the_add_fuses() -> None:
    export = build_qdq(residual_cnn(), activation_scales(residual_cnn_amax()))
    q = export.model
    assert export.report.residual_adds == ("add",)
    assert dq_feeding(q, "add", 1) is not None  # r1, the residual
    assert dq_feeding(q, "add", 0) is None  # c2 fuses into conv2's epilogue
    # r1 feeds conv2 and the Add: one shared Q/DQ pair.
    assert node(q, "add").input[1] == node(q, "conv2").input[0]
    assert len([n for n in q_of(q, "QuantizeLinear") if n.input[0] == "r1"]) == 1


def test_residual_add_with_two_fusible_inputs_quantizes_the_earlier_branch() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
        helper.make_node("Add", ["b", "a"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wc"], ["y"], name="conv_c"),
    ]
    inits = [
        ("wa", rng_weights(1, 2, 2, 1, 1)),
        ("wb", rng_weights(2, 2, 2, 1, 1)),
        ("wc", rng_weights(3, 2, 2, 1, 1)),
    ]
    model = make_model(nodes, [vi("x", [1, 2, 3, 3])], [vi("y", [1, 2, 3, 3])], inits)
    q = export_qdq(model, {"x": 1.0, "a": 2.0, "b": 2.0, "r": 3.0})
    assert dq_feeding(q, "add", 1) is not None  # a: produced first, the longer skip path
    assert dq_feeding(q, "add", 0) is None


def test_bias_add_after_matmul_is_not_a_residual() -> None:
    export = build_qdq(
        mlp(),
        activation_scales({"x": 2.0, "m": 3.0, "mb": 3.0, "h": 3.0}),
        QdqConfig(keep_last_smoothing_float=False),
    )
    assert export.report.residual_adds == ()
    assert dq_feeding(export.model, "bias_add", 0) is None


def test_matmul_and_gemm_weight_axes() -> None:
    export = build_qdq(
        mlp(), activation_scales({"x": 2.0, "h": 3.0}), QdqConfig(keep_last_smoothing_float=False)
    )
    q = export.model
    mm = dq_feeding(q, "matmul", 1)
    assert axis_of(mm) == 1 and scale_of(q, mm).shape == (6,)  # B [K=8, N=6]: one scale per output column
    gemm = dq_feeding(q, "gemm", 1)
    assert axis_of(gemm) == 0 and scale_of(q, gemm).shape == (4,)  # transB=1: B is [N=4, K=6]
    np.testing.assert_array_equal(
        scale_of(q, gemm), (np.abs(initializer(mlp(), "wb")).max(axis=1) / np.float32(127)).astype(np.float32)
    )
    onnx.checker.check_model(q, full_check=True)


def test_conv_transpose_axis_1_and_gemm_without_transb_axis_1() -> None:
    model = conv_transpose_gemm()
    export = build_qdq(
        model, activation_scales({"x": 1.0, "f": 2.0}), QdqConfig(keep_last_smoothing_float=False)
    )
    q = export.model
    onnx.checker.check_model(q, full_check=True)
    deconv = dq_feeding(q, "deconv", 1)
    assert axis_of(deconv) == 1 and scale_of(q, deconv).shape == (2,)  # W [Cin=3, Cout=2, k, k]
    wt = initializer(model, "wt")
    np.testing.assert_array_equal(
        scale_of(q, deconv), (np.abs(wt).max(axis=(0, 2, 3)) / np.float32(127)).astype(np.float32)
    )
    gemm = dq_feeding(q, "gemm", 1)
    assert axis_of(gemm) == 1 and scale_of(q, gemm).shape == (5,)  # B [K, N] without transB
    out = run(q, {"x": np.ones((1, 3, 2, 2), np.float32)})
    assert out.shape == (1, 5)


def test_noise_reduction_keeps_the_last_smoothing_layer_float_and_can_be_turned_off() -> None:
    model = residual_cnn()
    on = build_qdq(model, activation_scales(residual_cnn_amax()))
    assert on.report.kept_float_nodes == ("conv3",)
    assert dq_feeding(on.model, "conv3", 0) is None and dq_feeding(on.model, "conv3", 1) is None
    assert initializer(on.model, "w3").dtype == np.float32  # the float weight is kept as it was
    off = build_qdq(model, activation_scales(residual_cnn_amax()), QdqConfig(keep_last_smoothing_float=False))
    assert off.report.kept_float_nodes == ()
    assert dq_feeding(off.model, "conv3", 0) is not None and dq_feeding(off.model, "conv3", 1) is not None
    assert "w3" not in {t.name for t in off.model.graph.initializer}  # replaced by its int8 copy


def test_noise_reduction_walks_every_path_to_every_output() -> None:
    # Two outputs: y1 after conv_a -> relu; y2 straight from a Sigmoid of x (no smoothing layer on its path).
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
        helper.make_node("Conv", ["c0", "wa"], ["a"], name="conv_a"),
        helper.make_node("Relu", ["a"], ["y1"], name="relu"),
        helper.make_node("Sigmoid", ["x"], ["y2"], name="sig"),
        helper.make_node("MatMul", ["c0", "wm"], ["m"], name="matmul"),
        helper.make_node("Concat", ["m", "c0"], ["y3"], name="concat", axis=3),
    ]
    inits = [
        ("w0", rng_weights(1, 2, 2, 1, 1)),
        ("wa", rng_weights(2, 2, 2, 1, 1)),
        ("wm", rng_weights(3, 3, 3)),
    ]
    model = make_model(
        nodes,
        [vi("x", [1, 2, 3, 3])],
        [vi("y1", [1, 2, 3, 3]), vi("y2", [1, 2, 3, 3]), vi("y3", [1, 2, 3, 6])],
        inits,
    )
    kept = {model.graph.node[i].name for i in last_smoothing_nodes(model.graph)}
    # y3 = concat(matmul(c0), c0): the path through matmul ends at matmul, the direct one at conv0.
    assert kept == {"conv_a", "matmul", "conv0"}


def test_exclude_by_node_name_regex_and_by_op_type() -> None:
    model = residual_cnn()
    amax = activation_scales(residual_cnn_amax())
    by_name = build_qdq(model, amax, QdqConfig(exclude_nodes=(r"conv[2]$",)))
    assert by_name.report.excluded_nodes == ("conv2",)
    assert dq_feeding(by_name.model, "conv2", 0) is None and dq_feeding(by_name.model, "conv2", 1) is None
    assert dq_feeding(by_name.model, "conv1", 0) is not None
    # conv2 no longer fuses, so the Add is left alone too.
    assert by_name.report.residual_adds == ()
    by_type = build_qdq(model, amax, QdqConfig(exclude_op_types=("Conv",)))
    assert by_type.report.quantized_nodes == ()
    assert q_of(by_type.model, "QuantizeLinear") == []
    # fullmatch: "Conv" does not exclude ConvTranspose.
    ct = build_qdq(
        conv_transpose_gemm(), activation_scales({"x": 1.0, "f": 2.0}), QdqConfig(exclude_op_types=("Conv",))
    )
    assert ct.report.quantized_nodes == ("deconv",)


def test_invalid_regex_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="exclude_nodes"):
        QdqConfig(exclude_nodes=("conv[",))
    with pytest.raises(ConfigError, match="exclude_op_types"):
        QdqConfig(exclude_op_types="Conv")  # a bare string, not a sequence of patterns


def test_missing_tensors_are_skipped_with_one_warning_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    amax = residual_cnn_amax()
    del amax["r1"]
    with caplog.at_level(logging.WARNING, logger="trtcal.export.qdq"):
        export = build_qdq(residual_cnn(), activation_scales(amax))
    assert export.report.missing_tensors == ("r1",)
    assert export.report.skipped_nodes == ("conv2",)
    assert export.report.residual_adds == (), "conv2 stays float, so the Add cannot fuse into it"
    assert dq_feeding(export.model, "conv2", 1) is None, "no weight-only quantization of a skipped layer"
    assert dq_feeding(export.model, "conv1", 0) is not None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "r1" in warnings[0].getMessage()


def test_from_cache_round_trip_gives_identical_bytes() -> None:
    model = residual_cnn()
    amax = residual_cnn_amax()
    direct = serialize_model(export_qdq(model, amax))
    for algorithm in ("entropy2", "minmax"):
        cache = write_trt_cache(amax, trt_version="10.16.1", algorithm=algorithm)
        assert serialize_model(qdq_from_cache(model, cache)) == direct


def test_from_cache_reads_any_writer_and_rejects_garbage() -> None:
    # A hand-written TensorRT 8.6 cache (as NVIDIA's tools write them: no zero padding needed here).
    cache = b"TRT-8601-EntropyCalibration2\nx: 3c010a14\nr1: 3c810a14\nunknown_tensor: 3c000000\n"
    export = qdq_from_cache(residual_cnn(), cache)
    dq = dq_feeding(export, "conv1", 0)
    assert scale_of(export, dq) == np.float32(np.frombuffer(bytes.fromhex("3c010a14")[::-1], np.float32)[0])
    with pytest.raises(CacheFormatError):
        qdq_from_cache(residual_cnn(), b"not a cache\n")


def test_deterministic_bytes_and_input_model_untouched(tmp_path) -> None:
    model = residual_cnn()
    before = serialize_model(model)
    a = serialize_model(export_qdq(model, residual_cnn_amax()))
    assert serialize_model(model) == before
    path = tmp_path / "m.onnx"
    path.write_bytes(before)
    b = serialize_model(export_qdq(str(path), dict(reversed(list(residual_cnn_amax().items())))))
    c = serialize_model(export_qdq(before, residual_cnn_amax()))
    assert a == b == c
    out = tmp_path / "out" / "q.onnx"
    save_model(onnx.load_from_string(a), out)
    assert out.read_bytes() == a
    assert [p.name for p in out.parent.iterdir()] == ["q.onnx"]  # no temporary file left


def test_opset_below_13_is_upgraded_for_per_axis_qdq() -> None:
    export = build_qdq(residual_cnn(opset=11), activation_scales(residual_cnn_amax()))
    assert export.report.upgraded_from_opset == 11 and export.report.opset == 13
    assert [o.version for o in export.model.opset_import if o.domain == ""] == [13]
    onnx.checker.check_model(export.model, full_check=True)
    run(export.model, {"x": np.ones((1, 3, 6, 6), np.float32)})


def test_already_quantized_model_is_refused() -> None:
    q = export_qdq(residual_cnn(), residual_cnn_amax())
    with pytest.raises(ModelError, match="already"):
        export_qdq(q, residual_cnn_amax())


def test_bad_model_and_bad_amax_raise_clear_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        export_qdq(tmp_path / "missing.onnx", {})
    with pytest.raises(ModelError):
        export_qdq(b"\x00garbage", {})
    with pytest.raises(ConfigError, match="'x'"):
        export_qdq(residual_cnn(), {"x": -1.0})
    with pytest.raises(ConfigError, match="'x'"):
        export_qdq(residual_cnn(), {"x": float("nan")})


def test_quantize_outputs_adds_qdq_after_quantized_layers() -> None:
    export = build_qdq(
        residual_cnn(), activation_scales(residual_cnn_amax()), QdqConfig(quantize_outputs=True)
    )
    q = export.model
    assert dq_feeding(q, "relu1", 0) is not None  # conv1's output c1, for its consumer
    assert dq_feeding(q, "add", 0) is not None  # conv2's output c2
    onnx.checker.check_model(q, full_check=True)
    # A layer kept float (noise reduction) keeps a float input even when it reads a quantized layer's output.
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
        helper.make_node("Conv", ["a", "wb"], ["y"], name="conv_last"),
    ]
    inits = [("wa", rng_weights(1, 2, 2, 1, 1)), ("wb", rng_weights(2, 2, 2, 1, 1))]
    model = make_model(nodes, [vi("x", [1, 2, 2, 2])], [vi("y", [1, 2, 2, 2])], inits)
    q = export_qdq(model, {"x": 1.0, "a": 2.0}, quantize_outputs=True)
    assert dq_feeding(q, "conv_a", 0) is not None and dq_feeding(q, "conv_last", 0) is None


def test_constant_node_weight_and_weight_shared_with_a_float_node() -> None:
    w = rng_weights(5, 2, 2, 1, 1)
    nodes = [
        helper.make_node("Constant", [], ["wc"], name="const", value=onnx.numpy_helper.from_array(w, "wc")),
        helper.make_node("Conv", ["x", "wc"], ["a"], name="conv_a"),
        helper.make_node("Conv", ["a", "ws"], ["b"], name="conv_b"),
        helper.make_node("Conv", ["b", "ws"], ["c"], name="conv_keep"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    model = make_model(
        nodes, [vi("x", [1, 2, 2, 2])], [vi("y", [1, 2, 2, 2])], [("ws", rng_weights(6, 2, 2, 1, 1))]
    )
    q = export_qdq(model, {"x": 1.0, "a": 2.0, "b": 2.0})
    assert dq_feeding(q, "conv_a", 1) is not None
    assert not q_of(q, "Constant"), "the float Constant has no reader left"
    assert dq_feeding(q, "conv_b", 1) is not None
    assert node(q, "conv_keep").input[1] == "ws", "conv_keep (noise reduction) still reads the float weight"
    assert initializer(q, "ws").dtype == np.float32
    onnx.checker.check_model(q, full_check=True)


def test_matmul_of_two_activations_quantizes_both_per_tensor() -> None:
    nodes = [
        helper.make_node("MatMul", ["a", "b"], ["m"], name="mm"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w"], ["y"], name="head"),
    ]
    model = make_model(
        nodes, [vi("a", [2, 3]), vi("b", [3, 4])], [vi("y", [2, 2])], [("w", rng_weights(1, 4, 2))]
    )
    q = export_qdq(model, {"a": 1.0, "b": 1.0})
    assert axis_of(dq_feeding(q, "mm", 0)) is None and axis_of(dq_feeding(q, "mm", 1)) is None
    assert initializer(q, dq_feeding(q, "mm", 1).input[1]).shape == ()


def test_name_collisions_get_fresh_names() -> None:
    nodes = [
        helper.make_node("Identity", ["x"], ["x_scale"], name="x_QuantizeLinear"),
        helper.make_node("Conv", ["x_scale", "w"], ["c"], name="conv"),
        helper.make_node("Add", ["c", "x"], ["y"], name="add"),
    ]
    model = make_model(
        nodes, [vi("x", [1, 1, 2, 2])], [vi("y", [1, 1, 2, 2])], [("w", rng_weights(1, 1, 1, 1, 1))]
    )
    q = export_qdq(model, {"x": 1.0, "x_scale": 1.0}, keep_last_smoothing_float=False)
    onnx.checker.check_model(q, full_check=True)
    names = [n.name for n in q.graph.node]
    assert len(names) == len(set(names))
    run(q, {"x": np.ones((1, 1, 2, 2), np.float32)})


def test_simulated_output_equals_numpy_fake_quant_reference() -> None:
    model = mlp()
    amax = {"x": 2.5, "h": 4.0}
    q = export_qdq(model, amax, keep_last_smoothing_float=False)
    x = np.random.default_rng(7).uniform(-3, 3, size=(16, 8)).astype(np.float32)  # some values clip at 2.5
    wa, ba, wb, bb = (initializer(model, n) for n in ("wa", "ba", "wb", "bb"))
    s = {k: np.float32(np.float32(v) / np.float32(127)) for k, v in amax.items()}
    sa = (np.abs(wa).max(axis=0) / np.float32(127)).astype(np.float32)
    sb = (np.abs(wb).max(axis=1) / np.float32(127)).astype(np.float32)
    h = np.maximum(fake_quant(x, s["x"]) @ fake_quant(wa, sa, axis=1) + ba, 0)
    expected = fake_quant(h, s["h"]) @ fake_quant(wb, sb, axis=0).T + bb
    np.testing.assert_allclose(run(q, {"x": x}), expected, rtol=1e-5, atol=1e-5)
    # And it differs from FP32 (quantization is really applied).
    assert not np.allclose(run(model, {"x": x}), expected, atol=1e-3)


def test_simulated_conv_equals_fp32_conv_on_fake_quantized_operands() -> None:
    model = residual_cnn()
    amax = residual_cnn_amax()
    q = export_qdq(model, {"x": amax["x"]}, exclude_nodes=("conv2",))  # only conv1 is quantized
    x = np.random.default_rng(3).uniform(-4, 4, size=(2, 3, 6, 6)).astype(np.float32)
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    w1 = initializer(model, "w1")
    s1 = (np.abs(w1).reshape(4, -1).max(axis=1) / np.float32(127)).astype(np.float32)
    for t in ref.graph.initializer:
        if t.name == "w1":
            t.CopyFrom(onnx.numpy_helper.from_array(fake_quant(w1, s1, axis=0), "w1"))
    xq = fake_quant(x, np.float32(np.float32(amax["x"]) / np.float32(127)))
    np.testing.assert_allclose(run(q, {"x": x}), run(ref, {"x": xq}), rtol=1e-5, atol=1e-5)


def test_activation_scales_rules() -> None:
    scales = activation_scales({"a": 1.0, "z": 0.0, "t": 1e-45})
    assert scales["a"] == float(np.float32(np.float32(1.0) / np.float32(127)))
    assert scales["z"] == 1.0 and scales["t"] == 1.0
    with pytest.raises(ConfigError):
        activation_scales({"a": "big"})


def test_read_ranges_layouts_and_errors(tmp_path) -> None:
    nested = tmp_path / "a.json"
    nested.write_text(
        json.dumps(
            {"tensors": {"x": {"amax": {"entropy2": 1.5, "minmax": 2.0}}, "y": {"amax": {"minmax": 3.0}}}}
        )
    )
    assert read_ranges(nested) == {"entropy2": {"x": 1.5}, "minmax": {"x": 2.0, "y": 3.0}}
    by_method = tmp_path / "b.json"
    by_method.write_text(json.dumps({"methods": {"mse": {"x": 1.0}}}))
    assert read_ranges(by_method) == {"mse": {"x": 1.0}}
    flat = tmp_path / "c.json"
    flat.write_text(json.dumps({"x": 1.0, "y": 2}))
    assert amax_for_method(read_ranges(flat), None) == {"x": 1.0, "y": 2.0}
    with pytest.raises(ConfigError, match="choose one"):
        amax_for_method(read_ranges(nested), None)
    with pytest.raises(ConfigError, match="no method 'mse'"):
        amax_for_method(read_ranges(nested), "mse")
    bad = tmp_path / "d.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        read_ranges(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        read_ranges(tmp_path / "none.json")


def test_noise_reduction_does_not_apply_through_a_plugin() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("MyPlugin", ["c"], ["y"], name="plugin", domain="example.plugins"),
    ]
    graph = helper.make_graph(
        nodes, "g", [vi("x", [1, 1, 2, 2])], [vi("y", [1, 1, 2, 2])],
        [onnx.numpy_helper.from_array(rng_weights(1, 1, 1, 1, 1), "w")],
    )
    assert last_smoothing_nodes(graph) == set()
