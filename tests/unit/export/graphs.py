"""Tiny ONNX graphs built with onnx.helper, whose activations the tests control exactly."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "g",
        list(inputs),
        list(outputs),
        [numpy_helper.from_array(a, n) for n, a in initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def vi(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT, list(shape))


def rng_weights(seed: int, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def residual_cnn(opset: int = 13) -> onnx.ModelProto:
    """x -> conv1 -> relu (r1) -> conv2 (c2) -> add(c2, r1) -> conv3 -> y.

    r1 feeds conv2 and the Add, so c2 is the input that fuses with the Add and r1 is the residual.
    conv3 is the last smoothing layer before the FP32 output y.
    """
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "w3", "b3"], ["y"], name="conv3"),
    ]
    w2 = rng_weights(2, 4, 4, 3, 3)
    w2[1] = 0.0  # an all-zero output channel still needs a strictly positive scale
    inits = [
        ("w1", rng_weights(1, 4, 3, 3, 3)),
        ("b1", rng_weights(11, 4)),
        ("w2", w2),
        ("w3", rng_weights(3, 5, 4, 1, 1)),
        ("b3", rng_weights(13, 5)),
    ]
    return make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 5, 6, 6])], inits, opset=opset)


def residual_cnn_amax() -> dict[str, float]:
    return {"x": 3.0, "c1": 6.0, "r1": 5.0, "c2": 7.0, "s": 9.0, "y": 4.0}


def mlp() -> onnx.ModelProto:
    """x[N,8] -> MatMul(wa[8,6]) -> Add(bias) -> Relu -> Gemm(wb[4,6], transB=1) -> y[N,4]."""
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "ba"], ["mb"], name="bias_add"),
        helper.make_node("Relu", ["mb"], ["h"], name="relu"),
        helper.make_node("Gemm", ["h", "wb", "bb"], ["y"], name="gemm", transB=1),
    ]
    inits = [
        ("wa", rng_weights(21, 8, 6)),
        ("ba", rng_weights(22, 6)),
        ("wb", rng_weights(23, 4, 6)),
        ("bb", rng_weights(24, 4)),
    ]
    return make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 4])], inits)


def conv_transpose_gemm() -> onnx.ModelProto:
    """x -> ConvTranspose(wt[3,2,2,2]) -> Flatten -> Gemm(wg[8*... , 5], transB=0) -> y."""
    nodes = [
        helper.make_node("ConvTranspose", ["x", "wt"], ["t"], name="deconv", strides=[2, 2]),
        helper.make_node("Flatten", ["t"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg"], ["g"], name="gemm"),
        helper.make_node("Relu", ["g"], ["y"], name="relu"),
    ]
    inits = [("wt", rng_weights(31, 3, 2, 2, 2)), ("wg", rng_weights(32, 2 * 4 * 4, 5))]
    return make_model(nodes, [vi("x", [1, 3, 2, 2])], [vi("y", [1, 5])], inits)


def q_of(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    for n in model.graph.node:
        if tensor in n.output:
            return n
    return None


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(name)


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def fake_quant(x: np.ndarray, scale: np.ndarray | float, axis: int | None = None) -> np.ndarray:
    """numpy reference of QuantizeLinear -> DequantizeLinear with an int8 zero point of 0."""
    s = np.asarray(scale, dtype=np.float32)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    return (np.clip(np.rint(x.astype(np.float32) / s), -128, 127) * s).astype(np.float32)
