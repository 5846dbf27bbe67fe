"""Graph analysis for Q/DQ placement: pure functions of an ONNX graph (docs/qdq.md, "Placement").

* `constant_values`, `producers`, `consumers`: lookups over the top-level graph.
* `mask_tensors`: tensors that are additive attention masks (or derived from integer inputs), so an
  Add reading one is a mask Add, never a residual Add.
* `normalization_nodes`: LayerNormalization-style ops and the decomposed LayerNorm/RMSNorm chains
  (ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div).
* `last_smoothing_nodes`: the quantization-noise-reduction rule (weighted layers that produce a
  network output through shape-only or elementwise ops, not through residual Adds or norms).
* `residual_input`: which input of a skip-connection Add to quantize.
* `subgraph_reads` / `subgraph_weighted_inputs`: what If/Loop/Scan bodies read and compute.

onnx itself is not imported: these functions read protobuf fields only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = [
    "DEFAULT_DOMAINS",
    "WEIGHTED_OP_TYPES",
    "constant_values",
    "producers",
    "consumers",
    "mask_tensors",
    "normalization_nodes",
    "last_smoothing_nodes",
    "residual_input",
    "iter_subgraphs",
    "subgraph_reads",
    "subgraph_weighted_inputs",
]

DEFAULT_DOMAINS = ("", "ai.onnx")
WEIGHTED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # also TensorRT's "smoothing" layers
_RECURRENT = frozenset({"LSTM", "GRU", "RNN"})  # never given Q/DQ; reported when inside a body

# Ops that only move or reshape data (the data input passes through unchanged in value).
_SHAPE_ONLY = frozenset(
    {
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Expand",
        "Concat",
        "Split",
        "Slice",
        "Gather",
        "Tile",
        "Cast",
        "Dropout",
        "DepthToSpace",
        "SpaceToDepth",
        "Pad",
    }
)
# Elementwise activations and per-channel affine ops TensorRT fuses into the producing layer.
_ELEMENTWISE_UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Clip",
        "Erf",
        "Gelu",
        "Elu",
        "Selu",
        "Celu",
        "Softplus",
        "Softsign",
        "Mish",
        "Exp",
        "Log",
        "Abs",
        "Neg",
        "Sqrt",
        "Reciprocal",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Softmax",
        "LogSoftmax",
        "BatchNormalization",
        "AveragePool",
        "GlobalAveragePool",
        "MaxPool",
        "GlobalMaxPool",
    }
)
_ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum"})
_NORMALIZATION_OPS = frozenset(
    {
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "RMSNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "LpNormalization",
        "MeanVarianceNormalization",
    }
)
# Ops through which an attention mask is computed from integer inputs (or from shapes).
_MASK_OPS = frozenset(
    {
        "Cast",
        "Sub",
        "Mul",
        "Div",
        "Add",
        "Neg",
        "Not",
        "Unsqueeze",
        "Squeeze",
        "Reshape",
        "Flatten",
        "Expand",
        "Where",
        "Equal",
        "Less",
        "LessOrEqual",
        "Greater",
        "GreaterOrEqual",
        "Slice",
        "Gather",
        "Concat",
        "ConstantOfShape",
        "Tile",
        "Transpose",
        "And",
        "Or",
        "Xor",
        "Min",
        "Max",
        "Range",
        "Trilu",
        "Identity",
        "CumSum",
        "Clip",
        "Shape",
        "Size",
    }
)
_LARGE_NEGATIVE = -1.0e4  # additive masks use -inf, finfo.min, -1e9 or -1e4
_NORM_DIVISOR_PATH = frozenset({"Sqrt", "Reciprocal", "Add", "Cast", "Identity"})
_NORM_REDUCTIONS = frozenset({"ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceSum"})


def _default(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Constant tensors by name: initializers and Constant nodes with a `value` tensor."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and _default(node) and len(node.output) == 1:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name:
                out.setdefault(name, []).append(i)
    return out


def _large_negative(value: np.ndarray) -> bool:
    if value.size == 0 or not np.issubdtype(value.dtype, np.floating):
        return False
    return bool(np.nanmin(value.astype(np.float64)) <= _LARGE_NEGATIVE)


def mask_tensors(
    graph: onnx.GraphProto, constants: Mapping[str, np.ndarray], float32: frozenset[str] | None
) -> set[str]:
    """Tensors that are attention masks: computed from graph inputs and constants only, through
    `_MASK_OPS`, and either derived from non-float inputs only (token mask, shapes) or scaled by a
    large negative constant (-inf, finfo.min, -1e4). An embedding lookup (Gather from a constant
    table) is not a mask, nor is a float input mixed with a mask (scores + mask).
    """
    derived: dict[str, bool] = {}  # tensor -> flagged (int-derived or large negative)
    for vi in graph.input:
        if vi.name in constants:
            continue
        elem = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
        derived[vi.name] = elem not in (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
    # Constants and what is computed from constants only (ConstantOfShape(const), ...).
    folded = set(constants)
    for node in graph.node:
        if not _default(node) or _has_subgraph(node) or node.op_type.startswith("Random"):
            continue
        if all(n in folded for n in node.input if n):
            folded.update(o for o in node.output if o)
            continue
        if node.op_type not in _MASK_OPS:
            continue
        if node.op_type in ("Shape", "Size"):
            derived.update({o: True for o in node.output if o})
            continue
        data_inputs = [node.input[0]] if node.op_type == "Gather" and node.input else list(node.input)
        variable = [n for n in data_inputs if n and n not in folded]
        if not variable or not all(n in derived for n in variable):
            continue
        # Mixing a flagged tensor with an unflagged float one (scores + mask) is not a mask, unless
        # this very node brings in the large negative value.
        flagged = all(derived[n] for n in variable) or any(
            _large_negative(constants[n]) for n in node.input if n in constants
        )
        for out in node.output:
            if out:
                derived[out] = flagged
    return {name for name, flagged in derived.items() if flagged and (float32 is None or name in float32)}


def _norm_divisor(
    name: str, graph: onnx.GraphProto, producer_of: Mapping[str, int], depth: int = 0
) -> set[int]:
    """The nodes computing `name` when it is a normaliser (Sqrt/Reciprocal/+eps of a mean or of a
    sum of squares), else an empty set."""
    index = producer_of.get(name)
    if index is None or depth > 6:
        return set()
    node = graph.node[index]
    if not _default(node):
        return set()
    if node.op_type in _NORM_REDUCTIONS:
        return {index}
    if node.op_type not in _NORM_DIVISOR_PATH:
        return set()
    for source in node.input:
        found = _norm_divisor(source, graph, producer_of, depth + 1) if source else set()
        if found:
            return found | {index}
    return set()


def normalization_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of normalisation ops, and of decomposed norms: the Div (or Mul by a reciprocal) by a
    normaliser and the Sqrt/+eps/ReduceMean nodes that compute it."""
    producer_of = producers(graph)
    found: set[int] = set()
    for i, node in enumerate(graph.node):
        if node.op_type in _NORMALIZATION_OPS:
            found.add(i)
        elif _default(node) and node.op_type in ("Div", "Mul") and len(node.input) == 2:
            divisor = _norm_divisor(node.input[1], graph, producer_of)
            if not divisor and node.op_type == "Mul":
                divisor = _norm_divisor(node.input[0], graph, producer_of)
            if divisor:
                found.update(divisor | {i})
    return found


def last_smoothing_nodes(graph: onnx.GraphProto, float32: frozenset[str] | None = None) -> set[int]:
    """Indices of the weighted layers that directly produce an FP32 network output (noise reduction).

    Walks back from every FP32 output through shape-only ops (Reshape, Transpose, Concat, ...),
    elementwise activations, pooling, BatchNormalization, Softmax, and binary elementwise ops with
    one activation operand (a bias Add, a scale Mul). A path ends, with that layer kept float, at
    its first Conv/ConvTranspose/Gemm/MatMul; it ends with nothing kept at a residual Add (two
    activation operands), a normalisation (LayerNorm, decomposed or not), any other op, a graph
    input, or a node of a custom domain (a plugin).
    """
    producer_of = producers(graph)
    constants = {t.name for t in graph.initializer}
    constants.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    norms = normalization_nodes(graph)
    kept: set[int] = set()
    seen: set[int] = set()
    stack = [
        producer_of[out.name]
        for out in graph.output
        if out.name in producer_of and (float32 is None or out.name in float32)
    ]
    while stack:
        index = stack.pop()
        if index in seen:
            continue
        seen.add(index)
        node = graph.node[index]
        if not _default(node) or index in norms:
            continue
        if node.op_type in WEIGHTED_OP_TYPES:
            kept.add(index)
            continue
        variable = [n for n in node.input if n and n not in constants and (float32 is None or n in float32)]
        if node.op_type in _SHAPE_ONLY or node.op_type in _ELEMENTWISE_UNARY:
            data = variable[:1] if node.op_type not in ("Concat",) else variable
        elif node.op_type in _ELEMENTWISE_BINARY and len(variable) == 1:
            data = variable
        else:
            continue  # a residual Add, a gating Mul, or an op the rule does not pass
        stack.extend(producer_of[n] for n in data if n in producer_of)
    return kept


def residual_input(
    node: onnx.NodeProto,
    producer_of: Mapping[str, int],
    consumer_of: Mapping[str, Sequence[int]],
    constants: Mapping[str, np.ndarray],
    graph_outputs: set[str],
    quantized_nodes: set[int],
) -> int | None:
    """Which input of an Add to quantize so TensorRT fuses the Add into a quantized weighted layer.

    The fusible input comes from a quantized Conv/ConvTranspose/Gemm/MatMul whose output has no
    other use; the other input is the residual. When both inputs are fusible, the one produced
    later fuses and the earlier one (the longer skip path) is quantized.
    """
    a, b = node.input
    if not a or not b or a in constants or b in constants:
        return None  # a bias or constant add, not a skip connection

    def fusible(name: str) -> int | None:
        p = producer_of.get(name)
        if p is None or p not in quantized_nodes:
            return None
        if name in graph_outputs or len(consumer_of.get(name, ())) != 1:
            return None
        return p

    fa, fb = fusible(a), fusible(b)
    if fa is None and fb is None:
        return None
    if fa is not None and fb is not None:
        return 0 if fa < fb else 1
    return 1 if fa is not None else 0


# ---------------------------------------------------------------------------------------------
# Subgraphs (If / Loop / Scan bodies)


def iter_subgraphs(graph: onnx.GraphProto, path: str = "") -> Iterator[tuple[str, onnx.GraphProto]]:
    """(label, subgraph) for every subgraph at any depth; label like ``If 'cond'.then_branch``."""
    for i, node in enumerate(graph.node):
        for attr in node.attribute:
            bodies: list[Any] = (
                [attr.g] if attr.type == attr.GRAPH else list(attr.graphs) if attr.type == attr.GRAPHS else []
            )
            for body in bodies:
                label = f"{path}{node.op_type} '{node.name or f'{node.op_type}_{i}'}'.{attr.name}"
                yield label, body
                yield from iter_subgraphs(body, label + "/")


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of any subgraph reads (outer-scope names included)."""
    return {name for _, body in iter_subgraphs(graph) for node in body.node for name in node.input if name}


def subgraph_weighted_inputs(graph: onnx.GraphProto) -> list[str]:
    """One line per activation input of a weighted or recurrent layer inside a subgraph, which stays float."""
    lines: list[str] = []
    for label, body in iter_subgraphs(graph):
        local_constants = {t.name for t in body.initializer} | {
            o for n in body.node if n.op_type == "Constant" for o in n.output
        }
        outer_constants = {t.name for t in graph.initializer}
        for k, node in enumerate(body.node):
            if not _default(node):
                continue
            # A recurrent layer's data input (X) is reported too: it stays float like everything in a body.
            inputs = node.input[:2] if node.op_type in WEIGHTED_OP_TYPES else node.input[:1] if node.op_type in _RECURRENT else []
            for name in inputs:
                if name and name not in local_constants and name not in outer_constants:
                    lines.append(
                        f"{name} (input of {node.op_type} '{node.name or f'{node.op_type}_{k}'}' in {label}): kept "
                        "float; tensors inside If/Loop/Scan bodies are not calibrated"
                    )
    return lines
