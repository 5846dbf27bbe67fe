"""The models `auto` runs (ONNX graph surgery, no ONNX Runtime): the export's Q/DQ model with its activation
scales as graph inputs, and the side-branch model that measures every quantized activation's effect on
its consumers' outputs (see trtcal.export.auto).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from trtcal.export.qdq import QdqPlan, apply_plan

if TYPE_CHECKING:
    import onnx

__all__ = ["scale_input_model", "side_branch_model"]

_PREFIX = "trtcal_auto"


# ---------------------------------------------------------------------------------------------
# Models with scale inputs


def _activation_scale_names(qdq: onnx.ModelProto, plan: QdqPlan) -> dict[str, str]:
    """activation tensor -> the name of its Q/DQ scale initializer in `qdq` (built by apply_plan)."""
    acts = {q.tensor for q in plan.inputs if q.kind == "activation"}
    out: dict[str, str] = {}
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in acts:
            out.setdefault(node.input[0], node.input[1])
    return out


def scale_input_model(fp32: onnx.ModelProto, plan: QdqPlan, scales: Mapping[str, float]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The export's exact Q/DQ model with each activation scale turned into a scalar float graph input.

    Returns (model, tensor -> scale input name). Feeding a method's scales runs that method's
    Q/DQ model: the same nodes, the same arithmetic, the scale read from the feed.
    """
    import onnx

    qdq = apply_plan(fp32, plan, scales)
    names = _activation_scale_names(qdq, plan)
    as_inputs = set(names.values())
    kept = [t for t in qdq.graph.initializer if t.name not in as_inputs]
    del qdq.graph.initializer[:]
    qdq.graph.initializer.extend(kept)
    for tensor in dict.fromkeys(q.tensor for q in plan.inputs if q.kind == "activation"):
        qdq.graph.input.append(onnx.helper.make_tensor_value_info(names[tensor], onnx.TensorProto.FLOAT, []))
    return qdq, names


def _weight_wiring(
    fp32: onnx.ModelProto, plan: QdqPlan, qdq: onnx.ModelProto
) -> tuple[dict[tuple[int, int], str], list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The export's weight Q/DQ, reused by the side branches: ((node, input) -> dequantized weight,
    the weight DequantizeLinear nodes, the initializers they read that the FP32 graph lacks)."""
    graph = fp32.graph
    qdq_by_output = {n.output[0]: n for n in qdq.graph.node if n.output and n.op_type not in ("QuantizeLinear", "DequantizeLinear")}
    weight_inputs: dict[tuple[int, int], str] = {}
    for q in plan.inputs:
        if q.kind == "weight":
            weight_inputs[(q.node_index, q.input_index)] = qdq_by_output[graph.node[q.node_index].output[0]].input[q.input_index]
    weight_dq_outputs = set(weight_inputs.values())
    weight_nodes = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in weight_dq_outputs]
    needed = {name for n in weight_nodes for name in n.input}
    fp32_inits = {t.name for t in graph.initializer}
    new_inits = [t for t in qdq.graph.initializer if t.name in needed and t.name not in fp32_inits]
    return weight_inputs, weight_nodes, new_inits


class _FreshNames:
    """Names under the `trtcal_auto/` prefix that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used = {n.name for n in graph.node} | {o for n in graph.node for o in n.output}
        self.used |= {t.name for t in graph.initializer} | {i.name for i in graph.input}

    def __call__(self, base: str) -> str:
        name, k = f"{_PREFIX}/{base}", 0
        while name in self.used:
            k += 1
            name = f"{_PREFIX}/{base}_{k}"
        self.used.add(name)
        return name


def _per_sample_energy(x: str, out: str, fresh: _FreshNames, opset: int, axes_one: str) -> list[onnx.NodeProto]:
    """Nodes computing Σ x² per sample (axis 0), so the float64 total does not depend on micro-batching."""
    from onnx import helper

    flat = fresh(f"flat/{out}")
    reduce_axes: dict[str, Any] = {"axes": [1]} if opset < 18 else {}  # opset 18 moved axes to an input
    inputs = [flat] if opset < 18 else [flat, axes_one]
    return [
        helper.make_node("Flatten", [x], [flat], axis=1, name=fresh(f"Flatten/{out}")),
        helper.make_node("ReduceSumSquare", inputs, [out], keepdims=0, name=fresh(f"RSS/{out}"), **reduce_axes),
    ]


def side_branch_model(
    fp32: onnx.ModelProto, plan: QdqPlan, scales: Mapping[str, float]
) -> tuple[onnx.ModelProto, dict[str, str], dict[str, list[tuple[str, str]]]]:
    """FP32 graph + per (activation, consumer) a quantized copy of the consumer and its error energy.

    Returns (model, tensor -> scale input, tensor -> [(error output, signal output)] per consumer).
    """
    import onnx
    from onnx import helper

    qdq = apply_plan(fp32, plan, scales)
    graph = fp32.graph
    fresh = _FreshNames(graph)
    weight_inputs, weight_nodes, new_inits = _weight_wiring(fp32, plan, qdq)
    zero_point = fresh("zero_point")
    axes_one = fresh("axes_1")
    opset = next(int(o.version) for o in fp32.opset_import if o.domain in ("", "ai.onnx"))

    def per_sample_energy(x: str, out: str) -> list[onnx.NodeProto]:
        return _per_sample_energy(x, out, fresh, opset, axes_one)

    nodes: list[onnx.NodeProto] = list(weight_nodes)
    outputs: list[onnx.ValueInfoProto] = []
    scale_inputs: dict[str, str] = {}
    dq_of: dict[str, str] = {}
    energies: dict[str, list[tuple[str, str]]] = {}
    signal_of: dict[int, str] = {}
    for q in plan.inputs:
        if q.kind != "activation":
            continue
        t = q.tensor
        if t not in scale_inputs:
            scale_inputs[t] = fresh(f"scale/{t}")
            q_out, dq_out = fresh(f"q/{t}"), fresh(f"dq/{t}")
            dq_of[t] = dq_out
            nodes.append(helper.make_node("QuantizeLinear", [t, scale_inputs[t], zero_point], [q_out], name=fresh(f"Q/{t}")))
            nodes.append(helper.make_node("DequantizeLinear", [q_out, scale_inputs[t], zero_point], [dq_out], name=fresh(f"DQ/{t}")))
        original = graph.node[q.node_index]
        copy = onnx.NodeProto()
        copy.CopyFrom(original)
        copy.name = fresh(f"copy/{q.node_index}/{q.input_index}")
        for j in range(len(copy.input)):
            if (q.node_index, j) in weight_inputs:
                copy.input[j] = weight_inputs[(q.node_index, j)]
        copy.input[q.input_index] = dq_of[t]
        del copy.output[:]
        copy.output.extend([fresh(f"out/{q.node_index}/{q.input_index}/{k}") for k in range(len(original.output))])
        diff = fresh(f"diff/{q.node_index}/{q.input_index}")
        err = fresh(f"err/{q.node_index}/{q.input_index}")
        nodes.append(copy)
        nodes.append(helper.make_node("Sub", [copy.output[0], original.output[0]], [diff], name=fresh(f"Sub/{q.node_index}/{q.input_index}")))
        nodes.extend(per_sample_energy(diff, err))
        outputs.append(helper.make_tensor_value_info(err, onnx.TensorProto.FLOAT, [None]))
        if q.node_index not in signal_of:
            sig = fresh(f"signal/{q.node_index}")
            nodes.extend(per_sample_energy(original.output[0], sig))
            outputs.append(helper.make_tensor_value_info(sig, onnx.TensorProto.FLOAT, [None]))
            signal_of[q.node_index] = sig
        energies.setdefault(t, []).append((err, signal_of[q.node_index]))

    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    g = model.graph
    g.node.extend(nodes)
    g.initializer.extend([
        *new_inits,
        onnx.numpy_helper.from_array(np.array(0, dtype=np.int8), zero_point),
        onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), axes_one),
    ])
    for name in scale_inputs.values():
        g.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, []))
    del g.output[:]
    g.output.extend(outputs)
    return model, scale_inputs, energies


