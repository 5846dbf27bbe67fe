"""Transformer Q/DQ placement on a tiny BERT-style encoder layer (tests/unit/export/graphs.py:tiny_encoder).

TensorRT's transformer rules: both inputs of every MatMul (the attention batched MatMuls too), no
Q/DQ on LayerNorm (decomposed), Softmax (except as a MatMul input), mask Adds or int64 paths; the
noise-reduction rule keeps only the layers producing a network output float.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.unit.export.graphs import initializer, node, producer, run, tiny_encoder
from trtcal.export.graph_rules import constant_values, last_smoothing_nodes, mask_tensors, normalization_nodes
from trtcal.export.qdq import QdqConfig, activation_scales, build_qdq
from trtcal.model import select_tensors

MATMULS = ("q_proj", "k_proj", "v_proj", "qk_bmm", "pv_bmm", "attn_out", "ffn_in", "ffn_out")


def table(model: onnx.ModelProto) -> dict[str, float]:
    """A range for every floating activation, as a default calibration gives (masks included)."""
    return {name: 1.0 + 0.25 * (i % 5) for i, name in enumerate(select_tensors(model, "all"))}


def dq_inputs(model: onnx.ModelProto, name: str) -> list[bool]:
    n = node(model, name)
    return [(p := producer(model, t)) is not None and p.op_type == "DequantizeLinear" for t in n.input]


@pytest.mark.parametrize("scale_folded", [True, False])
def test_every_matmul_has_both_inputs_quantized_and_nothing_else(scale_folded: bool) -> None:
    model = tiny_encoder(scale_folded=scale_folded)
    export = build_qdq(model, activation_scales(table(model)))
    q = export.model
    onnx.checker.check_model(q, full_check=True)
    assert export.report.quantized_nodes == MATMULS
    for name in MATMULS:
        assert dq_inputs(q, name)[:2] == [True, True], name
    # The BMMs read two activations: both per tensor; softmax output is quantized only as pv_bmm's input.
    assert {"q", "kt", "probs", "v"} <= set(export.report.quantized_activations)
    assert dq_inputs(q, "softmax") == [False]
    # Nothing on the mask Add, the LayerNorms, the residual Adds (their inputs come from bias-free
    # MatMuls read twice or from a LayerNorm) or the int64 position path.
    assert export.report.mask_adds == ("mask_add",)
    assert dq_inputs(q, "mask_add") == [False, False]
    for n in q.graph.node:
        if n.name.startswith(("ln1_", "y_", "pos_")):
            assert not any(dq_inputs(q, n.name)), n.name
    assert export.report.residual_adds == ("residual1", "residual2")  # x and ln1: the skip inputs
    assert dq_inputs(q, "residual1") == [False, True] and dq_inputs(q, "residual2") == [False, True]
    assert "mask_add_input" not in export.report.quantized_activations
    assert export.report.kept_float_nodes == ()


def test_mask_is_never_quantized_even_when_it_reads_a_quantized_matmul_directly() -> None:
    # Before the mask rule, Add(qk_bmm, mask) looked like a residual Add and the mask got Q/DQ.
    model = tiny_encoder(scale_folded=True)
    masks = mask_tensors(model.graph, constant_values(model.graph), None)
    assert {"m1", "m2", "mask_add_input"} <= masks
    assert not masks & {"x", "q", "scores0", "probs", "o0", "res1", "ln1", "y"}


def test_a_float_input_scaled_by_a_large_negative_constant_is_a_mask_but_a_float_input_alone_is_not() -> None:
    from onnx import helper

    from tests.unit.export.graphs import make_model, vi

    nodes = [
        helper.make_node("Sub", ["one", "float_mask"], ["inv"], name="inv"),
        helper.make_node("Mul", ["inv", "neg_inf"], ["additive"], name="to_additive"),
        helper.make_node("Add", ["scores", "additive"], ["masked"], name="mask_add"),
        helper.make_node("Add", ["masked", "scores"], ["y"], name="residual"),
    ]
    inits = [("one", np.array(1.0, np.float32)), ("neg_inf", np.array(-np.inf, np.float32))]
    model = make_model(nodes, [vi("scores", [2, 4]), vi("float_mask", [2, 4])], [vi("y", [2, 4])], inits)
    masks = mask_tensors(model.graph, constant_values(model.graph), None)
    assert "additive" in masks and not masks & {"scores", "float_mask", "inv", "masked", "y"}


def test_decomposed_layer_norm_is_recognised() -> None:
    model = tiny_encoder()
    names = {model.graph.node[i].name for i in normalization_nodes(model.graph)}
    assert {"ln1_div", "ln1_sqrt", "ln1_add_eps", "ln1_reduce_var", "y_div"} <= names
    assert not names & {"mask_mul", "mask_add", "residual1", "softmax", "q_bias"}


def test_noise_reduction_stops_at_norms_and_keeps_only_an_output_layer() -> None:
    # The output comes from a LayerNorm: nothing is kept float (the old rule kept attn_out and ffn_out).
    model = tiny_encoder()
    assert last_smoothing_nodes(model.graph) == set()
    # A classifier MatMul + bias producing the output is kept float, and only it.
    with_head = tiny_encoder(classifier=True)
    kept = {with_head.graph.node[i].name for i in last_smoothing_nodes(with_head.graph)}
    assert kept == {"classifier"}
    export = build_qdq(with_head, activation_scales(table(with_head)))
    assert export.report.kept_float_nodes == ("classifier",)
    assert export.report.quantized_nodes == MATMULS
    off = build_qdq(with_head, activation_scales(table(with_head)), QdqConfig(keep_last_smoothing_float=False))
    assert off.report.quantized_nodes == (*MATMULS, "classifier")


def test_simulated_encoder_stays_close_to_fp32_and_masked_positions_do_not_matter() -> None:
    model = tiny_encoder()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)
    fp32 = run(model, {"x": x, "attention_mask": mask})
    amax = {name: 8.0 for name in select_tensors(model, "all")}
    q = build_qdq(model, activation_scales(amax)).model
    out = run(q, {"x": x, "attention_mask": mask})
    cos = np.sum(fp32 * out, axis=-1) / (np.linalg.norm(fp32, axis=-1) * np.linalg.norm(out, axis=-1))
    assert cos.min() > 0.98
    # The -1e9 mask passed through float: the padded keys get exactly zero attention in both models.
    x2 = x.copy()
    x2[1, 3:] = 100.0  # change only the padded positions' inputs
    out2 = run(q, {"x": x2, "attention_mask": mask})
    np.testing.assert_array_equal(out2[1, :3], out[1, :3])


def test_int8_weights_are_per_output_channel_for_every_dense() -> None:
    model = tiny_encoder()
    q = build_qdq(model, activation_scales(table(model))).model
    for name, weight in (("q_proj", "wq"), ("ffn_in", "w_ffn1")):
        dq = producer(q, node(q, name).input[1])
        assert dq is not None and [a.i for a in dq.attribute if a.name == "axis"] == [1]
        assert initializer(q, dq.input[0]).dtype == np.int8
        assert initializer(q, dq.input[1]).shape == (initializer(model, weight).shape[1],)
