"""Tiny ONNX graphs (onnx.helper) whose activations can be computed exactly in numpy.

Inputs hold small integers and weights are small integers, so every float32 sum and product is
exact: numpy and ONNX Runtime agree bit for bit and the expected statistics are known exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
W = np.array([[1, -2, 0], [3, 1, -1], [0, 2, 2], [-1, 0, 1]], dtype=np.float32)  # [4, 3]
C = np.array([0.5, -0.25, 2.0], dtype=np.float32)


def _model(nodes: list, inputs: list, outputs: list, initializers: Sequence[np.ndarray | tuple] = ()) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(a, n) for n, a in initializers]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp(batch_dim: int | str | None = "N") -> onnx.ModelProto:
    """x[N,4] -> MatMul W -> h; Relu -> r; Add(r, h) residual -> s; Add(s, C) -> t; Mul(t, Constant 2) -> y.

    Also a constant-only branch (Constant k -> Neg -> kneg, added to y -> out) and an integer
    tensor (Shape(x) -> shape, unused by the output).
    """
    dims = [batch_dim, 4] if batch_dim is not None else [4]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    out_dims = [batch_dim, 3] if batch_dim is not None else [3]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, out_dims)
    shape_out = helper.make_tensor_value_info("shape", TensorProto.INT64, [len(dims)])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "h"], ["s"], name="residual"),
        helper.make_node("Add", ["s", "C"], ["t"], name="bias"),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Mul", ["t", "two"], ["y"], name="scale"),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([1.0, 2.0, 4.0], np.float32))),
        helper.make_node("Neg", ["k"], ["kneg"], name="fold_me"),
        helper.make_node("Add", ["y", "kneg"], ["out"], name="final"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
    ]
    return _model(nodes, [x], [out, shape_out], [("W", W), ("C", C)])


def mlp_reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """The activations of `mlp` computed in numpy (exact for small-integer inputs)."""
    h = (x @ W).astype(np.float32)
    r = np.maximum(h, 0)
    s = r + h
    t = s + C
    y = t * np.float32(2)
    return {"x": x, "h": h, "r": r, "s": s, "t": t, "y": y, "out": y - np.array([1, 2, 4], np.float32)}


MLP_ACTIVATIONS = ["x", "h", "r", "s", "t", "y", "out"]


def conv(batch_dim: int | str = "N") -> onnx.ModelProto:
    """x[N,1,6,6] -> Conv(2 filters 3x3, bias) -> c -> Clip(0, 6) -> y."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-2, 3, (2, 1, 3, 3)).astype(np.float32)
    bias = np.array([1.0, -1.0], np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 1, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 2, 4, 4])
    nodes = [
        helper.make_node("Conv", ["x", "weight", "bias"], ["c"], name="conv"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6"),
    ]
    inits = [("weight", weight), ("bias", bias), ("lo", np.array(0, np.float32)), ("hi", np.array(6, np.float32))]
    return _model(nodes, [x], [y], inits)


def log_model() -> onnx.ModelProto:
    """x[N,3] -> Log -> y: negative inputs give NaN, zeros give -Inf."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    return _model([helper.make_node("Log", ["x"], ["y"], name="log")], [x], [y])


def zeros_model() -> onnx.ModelProto:
    """x[N,3] -> Mul(x, 0) -> z (all zeros) -> Add(z, x) -> y."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    nodes = [
        helper.make_node("Mul", ["x", "zero"], ["z"], name="zero_out"),
        helper.make_node("Add", ["z", "x"], ["y"], name="add"),
    ]
    return _model(nodes, [x], [y], [("zero", np.array(0.0, np.float32))])


def small_int_inputs(n: int, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-8, 9, (n, *shape)).astype(np.float32)


def transposing_model() -> onnx.ModelProto:
    """x[N,4] -> Transpose -> t[4,N]; x -> Reshape(-1) -> f[4N]; Gram = MatMul(x, t) -> g[N,N].

    None of these outputs has the batch as its first axis, so output buffers of one micro-batch
    size cannot be reused, even in part, for another.
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    g = helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", "N"])
    f = helper.make_tensor_value_info("f", TensorProto.FLOAT, [None])
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
        helper.make_node("Reshape", ["x", "flat"], ["f"]),
        helper.make_node("MatMul", ["x", "t"], ["g"]),
    ]
    return _model(nodes, [x], [g, f], [("flat", np.array([-1], np.int64))])
