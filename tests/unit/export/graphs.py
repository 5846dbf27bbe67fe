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


def tiny_encoder(*, scale_folded: bool = True, classifier: bool = False) -> onnx.ModelProto:
    """One BERT-style encoder layer as a PyTorch export decomposes it (single head, D = 8).

    Inputs x[B,S,8] float and attention_mask[B,S] int64. The additive mask is
    (1 - float(mask[:, None, :])) * -1e9 added to Q·Kᵀ (with the 1/sqrt(d) scale folded into wq
    when `scale_folded`, so the mask Add reads a MatMul output directly, as SDPA exports do).
    Decomposed LayerNorms (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add) follow both residual
    Adds; an int64 position-id path (CumSum of the mask, Add 1) feeds a second output.
    With `classifier`, a final MatMul + bias Add produces the output `logits` instead of `y`.
    """
    d = 8
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q_proj"),
        helper.make_node("Add", ["q0", "bq"], ["q"], name="q_bias"),
        helper.make_node("MatMul", ["x", "wk"], ["k0"], name="k_proj"),
        helper.make_node("Add", ["k0", "bk"], ["k"], name="k_bias"),
        helper.make_node("MatMul", ["x", "wv"], ["v0"], name="v_proj"),
        helper.make_node("Add", ["v0", "bv"], ["v"], name="v_bias"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores0"], name="qk_bmm"),
    ]
    scores = "scores0"
    if not scale_folded:
        nodes.append(helper.make_node("Div", ["scores0", "sqrt_d"], ["scores1"], name="scale_div"))
        scores = "scores1"
    nodes += [
        helper.make_node("Unsqueeze", ["attention_mask", "axis1"], ["m0"], name="mask_unsqueeze"),
        helper.make_node("Cast", ["m0"], ["m1"], name="mask_cast", to=FLOAT),
        helper.make_node("Sub", ["one", "m1"], ["m2"], name="mask_sub"),
        helper.make_node("Mul", ["m2", "neg_big"], ["mask_add_input"], name="mask_mul"),
        helper.make_node("Add", [scores, "mask_add_input"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="pv_bmm"),
        helper.make_node("MatMul", ["ctx", "wo"], ["o0"], name="attn_out"),
        helper.make_node("Add", ["o0", "x"], ["res1"], name="residual1"),
    ]
    nodes += _layer_norm("res1", "ln1", "g1", "be1")
    nodes += [
        helper.make_node("MatMul", ["ln1", "w_ffn1"], ["f0"], name="ffn_in"),
        helper.make_node("Relu", ["f0"], ["f1"], name="ffn_act"),
        helper.make_node("MatMul", ["f1", "w_ffn2"], ["f2"], name="ffn_out"),
        helper.make_node("Add", ["f2", "ln1"], ["res2"], name="residual2"),
    ]
    nodes += _layer_norm("res2", "y", "g2", "be2")
    nodes += [
        helper.make_node("CumSum", ["attention_mask", "axis1"], ["pos0"], name="pos_cumsum"),
        helper.make_node("Add", ["pos0", "one_i64"], ["position_ids"], name="pos_add"),
    ]
    outputs = [vi("y", ["B", "S", d]), helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["B", "S"])]
    inits = [
        ("wq", rng_weights(31, d, d) / np.float32(np.sqrt(d))), ("bq", rng_weights(32, d)),
        ("wk", rng_weights(33, d, d)), ("bk", rng_weights(34, d)),
        ("wv", rng_weights(35, d, d)), ("bv", rng_weights(36, d)),
        ("wo", rng_weights(37, d, d)), ("w_ffn1", rng_weights(38, d, 2 * d)), ("w_ffn2", rng_weights(39, 2 * d, d)),
        ("g1", np.ones(d, np.float32)), ("be1", np.zeros(d, np.float32)),
        ("g2", np.ones(d, np.float32)), ("be2", np.zeros(d, np.float32)),
        ("axis1", np.array([1], np.int64)), ("one", np.array(1.0, np.float32)),
        ("neg_big", np.array(-1.0e9, np.float32)), ("sqrt_d", np.array(np.sqrt(d), np.float32)),
        ("one_i64", np.array(1, np.int64)), ("two", np.array(2.0, np.float32)), ("eps", np.array(1e-12, np.float32)),
    ]
    if classifier:
        nodes += [
            helper.make_node("MatMul", ["y", "w_cls"], ["c0"], name="classifier"),
            helper.make_node("Add", ["c0", "b_cls"], ["logits"], name="classifier_bias"),
        ]
        inits += [("w_cls", rng_weights(40, d, 3)), ("b_cls", rng_weights(41, 3))]
        outputs[0] = vi("logits", ["B", "S", 3])
    inputs = [vi("x", ["B", "S", d]), helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])]
    return make_model(nodes, inputs, outputs, inits)


def _layer_norm(x: str, out: str, gamma: str, beta: str) -> list[onnx.NodeProto]:
    """LayerNorm over the last axis, decomposed the way torch.onnx exports it."""
    p = f"{out}_"
    return [
        helper.make_node("ReduceMean", [x], [p + "mean"], name=p + "reduce_mean", axes=[-1]),
        helper.make_node("Sub", [x, p + "mean"], [p + "centered"], name=p + "sub"),
        helper.make_node("Pow", [p + "centered", "two"], [p + "sq"], name=p + "pow"),
        helper.make_node("ReduceMean", [p + "sq"], [p + "var"], name=p + "reduce_var", axes=[-1]),
        helper.make_node("Add", [p + "var", "eps"], [p + "var_eps"], name=p + "add_eps"),
        helper.make_node("Sqrt", [p + "var_eps"], [p + "std"], name=p + "sqrt"),
        helper.make_node("Div", [p + "centered", p + "std"], [p + "normed"], name=p + "div"),
        helper.make_node("Mul", [p + "normed", gamma], [p + "scaled"], name=p + "mul_gamma"),
        helper.make_node("Add", [p + "scaled", beta], [out], name=p + "add_beta"),
    ]
