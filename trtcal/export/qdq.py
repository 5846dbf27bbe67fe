"""Q/DQ ONNX export: explicit INT8 quantization for TensorRT 10/11 (rules: docs/algorithms.md, docs/qdq.md).

Placement follows TensorRT's rules:

* the inputs of every Conv, ConvTranspose, MatMul and Gemm are quantized: activations per tensor
  (scale = float32(amax) / 127 from the calibration table), constant weights per output channel
  (s_k = max|W_k| / 127 on the axis of `trtcal.core.weight_axis`), stored as int8 initializers
  followed by a DequantizeLinear. This includes the attention batched MatMuls (Q·Kᵀ and
  softmax·V), whose two inputs are activations;
* the residual input of a skip-connection Add is quantized so TensorRT fuses the Add into the
  layer that produces the other input; an additive attention-mask Add is never a residual Add
  (`graph_rules.mask_tensors`), and nothing inside a normalisation, a Softmax (other than as a
  MatMul input) or an integer path gets Q/DQ;
* zero points are explicit int8 zeros (uint8 would be the ONNX default); every scale is a
  strictly positive float32; the default opset is raised to 13 (per-axis Q/DQ) when lower;
* outputs of the weighted layers are not quantized unless asked (`quantize_outputs`);
* the implicit-mode "quantization noise reduction" rule (docs/algorithms.md), which explicit mode lost, is
  applied on request (default on): a weighted layer that produces an FP32 network output through
  shape-only or elementwise ops (not through a residual Add or a normalisation) stays in float.

Tensors missing from the calibration table are left unquantized, together with the node that
needs them; the export logs one warning naming them and lists them in `QdqReport`. Weighted
layers inside If/Loop/Scan bodies stay float, one report line per input tensor. Every model
written passes `onnx.checker.check_model(full_check=True)`.

Same model, same table, same options: same bytes (`serialize_model`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from trtcal.core import per_channel_scales, read_trt_cache, weight_axis
from trtcal.core.weights import SAFE_SCALE
from trtcal.errors import ConfigError, InternalError, ModelError
from trtcal.export.graph_rules import DEFAULT_DOMAINS as _DEFAULT_DOMAINS
from trtcal.export.graph_rules import (
    WEIGHTED_OP_TYPES,
    last_smoothing_nodes,
    mask_tensors,
    normalization_nodes,
    residual_input,
    subgraph_reads,
    subgraph_weighted_inputs,
)
from trtcal.export.graph_rules import constant_values as _constant_values
from trtcal.export.graph_rules import consumers as _consumers
from trtcal.export.graph_rules import producers as _producers
from trtcal.export.model_io import (
    ModelLike,
    activation_scales,
    check_full,
    check_range_coverage,
    checked_scales,
    load_model,
    model_tensor_names,
    save_model,
    serialize_model,
    write_bytes_atomic,
)
from trtcal.export.ranges import amax_for_method, read_ranges

if TYPE_CHECKING:
    import onnx

__all__ = [
    "WEIGHTED_OP_TYPES",
    "MIN_OPSET",
    "QdqConfig",
    "QuantizedInput",
    "QdqPlan",
    "QdqReport",
    "QdqExport",
    "activation_scales",
    "load_model",
    "node_label",
    "plan_qdq",
    "apply_plan",
    "build_qdq",
    "export_qdq",
    "qdq_from_cache",
    "serialize_model",
    "save_model",
    "write_bytes_atomic",
    "read_ranges",
    "amax_for_method",
    "last_smoothing_nodes",
    "require_quantized",
]

log = logging.getLogger(__name__)

MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear gained `axis` (per-channel) in opset 13
_FLOAT = 1  # onnx.TensorProto.FLOAT
_QDQ_OP_TYPES = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


@dataclass(frozen=True, kw_only=True)
class QdqConfig:
    """Where Q/DQ goes. Every default lives here (the CLI passes None for "not given").

    Attributes:
        exclude_nodes: regular expressions searched (re.search) in node names; matching nodes stay float.
        exclude_op_types: regular expressions matched in full (re.fullmatch) against op types.
        float_nodes: exact node labels (see `node_label`) kept float, e.g. by the sensitivity fallback.
        keep_last_smoothing_float: the quantization-noise-reduction rule (last Conv/ConvTranspose/
            Gemm/MatMul on each path to an FP32 network output stays float).
        quantize_outputs: also quantize the outputs of the quantized weighted layers (for their
            consumers; the network's own outputs always stay FP32).
        quantize_residual_add: quantize the residual input of skip-connection Adds (TensorRT fusion).
        min_range_coverage: the least share of the activations needing Q/DQ the ranges must cover;
            below it they are taken for another model's (ConfigError). 0 allows any.
    """

    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    float_nodes: tuple[str, ...] = ()
    keep_last_smoothing_float: bool = True
    quantize_outputs: bool = False
    quantize_residual_add: bool = True
    min_range_coverage: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.min_range_coverage) <= 1.0 or isinstance(self.min_range_coverage, bool):
            raise ConfigError(f"min_range_coverage must be a number in [0, 1], got {self.min_range_coverage!r}")
        for name in ("exclude_nodes", "exclude_op_types", "float_nodes"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a sequence of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("exclude_nodes", "exclude_op_types"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{name}: {pattern!r} is not a valid regular expression ({exc})") from None
        for name in ("keep_last_smoothing_float", "quantize_outputs", "quantize_residual_add"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class QuantizedInput:
    """One quantized input of one node of the original graph."""

    node_index: int
    input_index: int
    tensor: str
    kind: Literal["activation", "weight"]
    axis: int | None = None  # per-channel axis for weights; None = per tensor


@dataclass(frozen=True)
class QdqPlan:
    """Everything the rewrite needs, decided from the original graph alone (pure data)."""

    inputs: tuple[QuantizedInput, ...]
    unit_labels: Mapping[int, str]  # node index -> label, for every node that has a quantized input
    report: QdqReport

    def restricted_to(self, node_indices: Iterable[int]) -> QdqPlan:
        """The same plan with only the Q/DQ of the given nodes (used by the sensitivity analysis)."""
        keep = frozenset(node_indices)
        return replace(
            self,
            inputs=tuple(q for q in self.inputs if q.node_index in keep),
            unit_labels={i: label for i, label in self.unit_labels.items() if i in keep},
        )


@dataclass(frozen=True)
class QdqReport:
    """What the export did, in graph order. Serialisable with `to_dict()`."""

    quantized_nodes: tuple[str, ...] = ()  # weighted layers whose inputs are quantized
    residual_adds: tuple[str, ...] = ()  # Adds whose residual input is quantized
    quantized_activations: tuple[str, ...] = ()  # tensors with a per-tensor Q/DQ pair
    quantized_weights: tuple[str, ...] = ()  # constants quantized per channel
    kept_float_nodes: tuple[str, ...] = ()  # by the quantization-noise-reduction rule
    excluded_nodes: tuple[str, ...] = ()  # by exclude_nodes / exclude_op_types / float_nodes
    skipped_nodes: tuple[str, ...] = ()  # left float because an input had no amax or is not float32
    missing_tensors: tuple[str, ...] = ()  # activations absent from the calibration table
    mask_adds: tuple[str, ...] = ()  # Adds of an attention mask: never quantized
    float_in_subgraphs: tuple[str, ...] = ()  # one line per weighted-layer input inside If/Loop/Scan bodies
    opset: int = MIN_OPSET
    upgraded_from_opset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def is_empty(self) -> bool:
        """Nothing was quantized: no weighted layer and no residual Add."""
        return not self.quantized_nodes and not self.residual_adds

    def empty_reason(self) -> str:
        """Why nothing was quantized, from what the export saw."""
        reasons = []
        if self.float_in_subgraphs:
            reasons.append(f"{len(self.float_in_subgraphs)} weighted-layer input(s) lie inside If/Loop/Scan bodies, "
                           f"which stay float (first: {self.float_in_subgraphs[0]})")
        if self.missing_tensors:
            reasons.append(f"{len(self.missing_tensors)} tensor(s) have no calibrated range "
                           f"(first: {self.missing_tensors[0]!r})")
        if self.kept_float_nodes:
            reasons.append(f"the noise-reduction rule kept {list(self.kept_float_nodes)} float")
        if self.excluded_nodes:
            reasons.append(f"{len(self.excluded_nodes)} layer(s) excluded by the options")
        if self.skipped_nodes:
            reasons.append(f"{len(self.skipped_nodes)} layer(s) have non-float32 inputs")
        if not reasons:
            reasons.append("the top-level graph has no Conv, ConvTranspose, MatMul or Gemm")
        return "; ".join(reasons)


@dataclass(frozen=True)
class QdqExport:
    model: onnx.ModelProto
    report: QdqReport = field(default_factory=QdqReport)


# ---------------------------------------------------------------------------------------------
# Graph analysis (pure functions of the graph)


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A node's name, or `<OpType>_<index>` for unnamed nodes (labels used in reports and float_nodes)."""
    return node.name if node.name else f"{node.op_type}_{index}"


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return int(entry.version)
    raise ModelError("the model imports no default ONNX opset")


def _upgrade_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int | None]:
    opset = _default_opset(model)
    if opset >= MIN_OPSET:
        return model, None
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:
        raise ModelError(
            f"the model uses opset {opset}; per-channel Q/DQ needs opset {MIN_OPSET} and the ONNX version "
            f"converter failed ({exc}). Re-export the model with opset >= {MIN_OPSET}"
        ) from None
    return upgraded, opset


def _float32_tensors(model: onnx.ModelProto) -> frozenset[str] | None:
    """Names of tensors known to be float32, or None when the types cannot be inferred."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # a model too large or not inferable: assume float32 everywhere
        log.debug("shape inference failed (%s); assuming float32 activations", exc)
        return None
    graph = inferred.graph
    names = {
        vi.name
        for vi in [*graph.input, *graph.output, *graph.value_info]
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == _FLOAT
    }
    names.update(t.name for t in graph.initializer if t.data_type == _FLOAT)
    return frozenset(names)


def _weight_input_axis(node: onnx.NodeProto, input_index: int, weight: np.ndarray) -> int | None:
    """Per-channel axis of a constant input, or None for per-tensor (vectors, MatMul/Gemm A)."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        return weight_axis(op) if input_index == 1 and weight.ndim >= 2 else None
    if op == "Gemm":
        if input_index != 1 or weight.ndim != 2:
            return None
        trans_b = any(a.name == "transB" and a.i != 0 for a in node.attribute)
        return weight_axis("Gemm", trans_b=trans_b)
    if op == "MatMul":
        if input_index != 1 or weight.ndim < 2:
            return None
        return weight.ndim - 1 if weight.ndim > 2 else weight_axis("MatMul")
    return None


def _quantizable_inputs(node: onnx.NodeProto) -> tuple[int, ...]:
    # Conv/ConvTranspose: X, W (the bias stays float); Gemm: A, B (C stays float); MatMul: A, B.
    return tuple(i for i in (0, 1) if i < len(node.input) and node.input[i])


def _excluded(node: onnx.NodeProto, label: str, config: QdqConfig) -> bool:
    if label in config.float_nodes:
        return True
    if any(re.search(p, node.name) for p in config.exclude_nodes):
        return True
    return any(re.fullmatch(p, node.op_type) for p in config.exclude_op_types)


def plan_qdq(model: onnx.ModelProto, scale_by_tensor: Mapping[str, float], config: QdqConfig) -> QdqPlan:
    """Decide every Q/DQ of the export (the model must already be at opset >= 13)."""
    graph = model.graph
    for node in graph.node:
        if node.op_type in _QDQ_OP_TYPES and node.domain in _DEFAULT_DOMAINS:
            raise ModelError(
                f"the model already contains {node.op_type} node {node.name!r}: it is already quantized. "
                "Export from the FP32 model"
            )
    float32 = _float32_tensors(model)
    constants = _constant_values(graph)
    producers = _producers(graph)
    consumers = _consumers(graph)
    graph_outputs = {o.name for o in graph.output}

    def is_float(name: str) -> bool:
        return float32 is None or name in float32

    labels = [node_label(node, i) for i, node in enumerate(graph.node)]
    smoothing_kept = last_smoothing_nodes(graph, float32) if config.keep_last_smoothing_float else set()
    masks = mask_tensors(graph, constants, float32)
    norms = normalization_nodes(graph)
    mask_adds: list[int] = []

    quantized: list[QuantizedInput] = []
    unit_labels: dict[int, str] = {}
    quantized_nodes: list[int] = []
    kept_float: list[int] = []
    excluded: list[int] = []
    skipped: list[int] = []
    missing: dict[str, None] = {}

    for i, node in enumerate(graph.node):
        if node.op_type not in WEIGHTED_OP_TYPES or node.domain not in _DEFAULT_DOMAINS:
            continue
        if _excluded(node, labels[i], config):
            excluded.append(i)
            continue
        if i in smoothing_kept:
            kept_float.append(i)
            continue
        entries: list[QuantizedInput] = []
        usable = True
        for k in _quantizable_inputs(node):
            name = node.input[k]
            if not is_float(name):
                usable = False
                continue
            if name in constants:
                weight = constants[name]
                if weight.dtype != np.float32:
                    usable = False
                    continue
                entries.append(QuantizedInput(i, k, name, "weight", _weight_input_axis(node, k, weight)))
            elif name in scale_by_tensor:
                entries.append(QuantizedInput(i, k, name, "activation"))
            else:
                missing[name] = None
                usable = False
        if not usable or len(entries) != len(_quantizable_inputs(node)):
            skipped.append(i)
            continue
        quantized.extend(entries)
        quantized_nodes.append(i)
        unit_labels[i] = labels[i]

    quantized_set = set(quantized_nodes)
    residual_adds: list[int] = []
    if config.quantize_residual_add:
        for i, node in enumerate(graph.node):
            if node.op_type != "Add" or node.domain not in _DEFAULT_DOMAINS or len(node.input) != 2 or i in norms:
                continue
            if not all(is_float(name) for name in node.input):
                continue  # an integer path (position ids, shapes): never quantized
            if any(name in masks for name in node.input):
                mask_adds.append(i)
                continue
            if _excluded(node, labels[i], config):
                excluded.append(i)
                continue
            residual = residual_input(node, producers, consumers, constants, graph_outputs, quantized_set)
            if residual is None:
                continue
            name = node.input[residual]
            if name not in scale_by_tensor:
                missing[name] = None
                skipped.append(i)
                continue
            quantized.append(QuantizedInput(i, residual, name, "activation"))
            residual_adds.append(i)
            unit_labels[i] = labels[i]

    if config.quantize_outputs:
        stays_float = set(kept_float) | set(excluded)
        for i in quantized_nodes:
            out = graph.node[i].output[0]
            for consumer in consumers.get(out, []):
                if consumer in stays_float:
                    continue  # a layer kept float keeps float inputs
                if consumer in quantized_set or any(
                    q.node_index == consumer and q.tensor == out for q in quantized
                ):
                    continue  # already quantized as that consumer's input
                if out not in scale_by_tensor:
                    missing[out] = None
                    break
                for k, name in enumerate(graph.node[consumer].input):
                    if name == out:
                        quantized.append(QuantizedInput(consumer, k, out, "activation"))
                unit_labels.setdefault(consumer, labels[consumer])

    quantized.sort(key=lambda q: (q.node_index, q.input_index))
    activations = dict.fromkeys(q.tensor for q in quantized if q.kind == "activation")
    weights = dict.fromkeys(q.tensor for q in quantized if q.kind == "weight")
    report = QdqReport(
        quantized_nodes=tuple(labels[i] for i in quantized_nodes),
        residual_adds=tuple(labels[i] for i in residual_adds),
        quantized_activations=tuple(activations),
        quantized_weights=tuple(weights),
        kept_float_nodes=tuple(labels[i] for i in kept_float),
        excluded_nodes=tuple(labels[i] for i in sorted(excluded)),
        skipped_nodes=tuple(labels[i] for i in sorted(set(skipped))),
        missing_tensors=tuple(missing),
        mask_adds=tuple(labels[i] for i in mask_adds),
        float_in_subgraphs=tuple(subgraph_weighted_inputs(graph)),
        opset=_default_opset(model),
    )
    return QdqPlan(inputs=tuple(quantized), unit_labels=dict(sorted(unit_labels.items())), report=report)


# ---------------------------------------------------------------------------------------------
# Rewrite


class _Names:
    """Fresh, deterministic names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        from trtcal.export.graph_rules import iter_subgraphs

        used: set[str] = set()
        for g in [graph, *(body for _, body in iter_subgraphs(graph))]:  # no shadowing inside bodies either
            used.update(t.name for t in g.initializer)
            used.update(v.name for v in [*g.input, *g.output, *g.value_info])
            for node in g.node:
                used.add(node.name)
                used.update(node.input)
                used.update(node.output)
        self.used = used

    def fresh(self, base: str) -> str:
        name, n = base, 0
        while name in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        return name


def _scalar_initializer(name: str, value: float | int, dtype: type[np.generic]) -> onnx.TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def _quantize_weight(weight: np.ndarray, scales: np.ndarray, axis: int | None) -> np.ndarray:
    """int8 weights: round-half-even(W / s) clipped to [-128, 127], as QuantizeLinear computes it."""
    w = weight.astype(np.float32, copy=False)
    s = scales.astype(np.float32)
    if axis is not None:
        shape = [1] * w.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    ratio = w / s
    q: np.ndarray = np.clip(np.rint(ratio), -128, 127).astype(np.int8)
    return q


def apply_plan(model: onnx.ModelProto, plan: QdqPlan, scale_by_tensor: Mapping[str, float]) -> onnx.ModelProto:
    """Insert the plan's Q/DQ into a copy of `model` (the model the plan was made from)."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    names = _Names(graph)
    constants = _constant_values(graph)

    by_node: dict[int, list[QuantizedInput]] = {}
    for q in plan.inputs:
        by_node.setdefault(q.node_index, []).append(q)

    new_initializers: list[onnx.TensorProto] = []
    pair_output: dict[tuple[str, str, int | None], str] = {}  # (kind, tensor, axis) -> DQ output
    replaced_uses: dict[str, int] = {}
    new_nodes: list[onnx.NodeProto] = []

    def activation_pair(tensor: str) -> tuple[str, list[onnx.NodeProto]]:
        key = ("activation", tensor, None)
        if key in pair_output:
            return pair_output[key], []
        scale_name = names.fresh(f"{tensor}_scale")
        zp_name = names.fresh(f"{tensor}_zero_point")
        q_out = names.fresh(f"{tensor}_QuantizeLinear_Output")
        dq_out = names.fresh(f"{tensor}_DequantizeLinear_Output")
        new_initializers.append(_scalar_initializer(scale_name, scale_by_tensor[tensor], np.float32))
        new_initializers.append(_scalar_initializer(zp_name, 0, np.int8))
        nodes = [
            helper.make_node("QuantizeLinear", [tensor, scale_name, zp_name], [q_out], name=names.fresh(f"{tensor}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [q_out, scale_name, zp_name], [dq_out], name=names.fresh(f"{tensor}_DequantizeLinear")),
        ]
        pair_output[key] = dq_out
        return dq_out, nodes

    def weight_dq(tensor: str, axis: int | None) -> tuple[str, list[onnx.NodeProto]]:
        key = ("weight", tensor, axis)
        if key in pair_output:
            return pair_output[key], []
        weight = constants[tensor]
        if axis is None:
            amax = np.float32(np.max(np.abs(weight))) if weight.size else np.float32(0.0)
            scale = np.float32(amax / np.float32(127.0))
            scales = np.array(scale if scale >= np.finfo(np.float32).tiny else SAFE_SCALE, dtype=np.float32)
        else:
            scales = per_channel_scales(weight, axis)
        q_name = names.fresh(f"{tensor}_quantized")
        scale_name = names.fresh(f"{tensor}_scale")
        zp_name = names.fresh(f"{tensor}_zero_point")
        dq_out = names.fresh(f"{tensor}_DequantizeLinear_Output")
        new_initializers.append(numpy_helper.from_array(_quantize_weight(weight, scales, axis), q_name))
        new_initializers.append(numpy_helper.from_array(scales, scale_name))
        new_initializers.append(numpy_helper.from_array(np.zeros(scales.shape, dtype=np.int8), zp_name))
        node = helper.make_node(
            "DequantizeLinear", [q_name, scale_name, zp_name], [dq_out], name=names.fresh(f"{tensor}_DequantizeLinear")
        )
        if axis is not None:
            node.attribute.append(helper.make_attribute("axis", axis))
        pair_output[key] = dq_out
        return dq_out, [node]

    for i, original in enumerate(graph.node):
        node = onnx.NodeProto()
        node.CopyFrom(original)
        for q in by_node.get(i, ()):
            if node.input[q.input_index] != q.tensor:
                raise InternalError(f"plan does not match the graph at node {i} input {q.input_index}")
            if q.kind == "activation":
                dq_out, inserted = activation_pair(q.tensor)
            else:
                dq_out, inserted = weight_dq(q.tensor, q.axis)
            new_nodes.extend(inserted)
            node.input[q.input_index] = dq_out
            replaced_uses[q.tensor] = replaced_uses.get(q.tensor, 0) + 1
        new_nodes.append(node)

    # Float weights that no node reads any more are dropped (the int8 copy replaced them); what a
    # node inside an If/Loop/Scan body reads from the outer scope stays.
    still_used = {name for n in new_nodes for name in n.input} | subgraph_reads(graph)
    still_used.update(o.name for o in graph.output)
    still_used.update(i.name for i in graph.input)
    kept_initializers = [t for t in graph.initializer if t.name in still_used]
    dead_constants = {
        n.output[0]
        for n in new_nodes
        if n.op_type == "Constant" and n.output and n.output[0] in replaced_uses and n.output[0] not in still_used
    }
    final_nodes = [n for n in new_nodes if not (n.op_type == "Constant" and n.output and n.output[0] in dead_constants)]

    del graph.node[:]
    graph.node.extend(final_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers + new_initializers)
    check_full(out, model)
    return out


def require_quantized(report: QdqReport, *, allow_empty: bool, what: str = "the Q/DQ export") -> None:
    """ModelError when `report` quantized nothing, naming why, unless `allow_empty`."""
    if not report.is_empty:
        return
    message = f"{what} quantized nothing: {report.empty_reason()}"
    if allow_empty:
        log.warning("%s (allowed by allow_empty)", message)
        return
    raise ModelError(f"{message}. Nothing would run in INT8; pass --allow-empty (allow_empty=True) to accept it")


# ---------------------------------------------------------------------------------------------
# Public entry points


def build_qdq(model: ModelLike, scale_by_tensor: Mapping[str, float], config: QdqConfig | None = None) -> QdqExport:
    """The Q/DQ model and a report of what was quantized, kept float, excluded or missing.

    Args:
        model: the FP32 ONNX model (ModelProto, path or bytes; never modified).
        scale_by_tensor: per-tensor activation scales (amax / 127), e.g. `activation_scales(amax)`
            or a TensorRT cache's `.scale`.
        config: placement options (QdqConfig()).

    Raises:
        ModelError: the model cannot be loaded, is already quantized or its opset cannot be raised to 13.
        ConfigError: a scale of a model tensor is zero, denormal, negative or not finite; or the
            ranges cover too little of the model (QdqConfig.min_range_coverage).
        CacheFormatError: the scales are of the smoothed copy of this model (`check_not_smoothed_for`).
    """
    config = config or QdqConfig()
    fp32, upgraded_from = _upgrade_opset(load_model(model))
    names = model_tensor_names(fp32)
    from trtcal.export.smoothed_names import check_not_smoothed_for

    check_not_smoothed_for(scale_by_tensor, names, model=str(model) if isinstance(model, str) else "the model", what="the scales")
    scales = checked_scales(scale_by_tensor, names)
    plan = plan_qdq(fp32, scales, config)
    report = replace(plan.report, upgraded_from_opset=upgraded_from)
    covered = len(report.quantized_activations)
    check_range_coverage(covered, covered + len(report.missing_tensors), scale_by_tensor, names, config.min_range_coverage)
    if report.missing_tensors:
        log.warning(
            "%d tensor(s) have no calibrated range; their Q/DQ is skipped and the layers reading them stay float: %s",
            len(report.missing_tensors),
            ", ".join(report.missing_tensors),
        )
    if upgraded_from is not None:
        log.info("raised the model's opset from %d to %d for per-channel Q/DQ", upgraded_from, MIN_OPSET)
    return QdqExport(model=apply_plan(fp32, plan, scales), report=report)


def _config(
    exclude_nodes: Sequence[str],
    exclude_op_types: Sequence[str],
    keep_last_smoothing_float: bool,
    quantize_outputs: bool,
    float_nodes: Sequence[str] = (),
) -> QdqConfig:
    return QdqConfig(
        exclude_nodes=tuple(exclude_nodes),
        exclude_op_types=tuple(exclude_op_types),
        float_nodes=tuple(float_nodes),
        keep_last_smoothing_float=keep_last_smoothing_float,
        quantize_outputs=quantize_outputs,
    )


def export_qdq(
    model: ModelLike,
    amax_by_tensor: Mapping[str, float],
    *,
    exclude_nodes: Sequence[str] = (),
    exclude_op_types: Sequence[str] = (),
    keep_last_smoothing_float: bool = True,
    quantize_outputs: bool = False,
) -> onnx.ModelProto:
    """A Q/DQ ONNX model for TensorRT from a calibration table (tensor -> amax).

    See the module docstring for the placement rules; `build_qdq` also returns the report.
    """
    config = _config(exclude_nodes, exclude_op_types, keep_last_smoothing_float, quantize_outputs)
    return build_qdq(model, activation_scales(amax_by_tensor), config).model


def qdq_from_cache(
    model: ModelLike,
    cache_bytes: bytes,
    *,
    exclude_nodes: Sequence[str] = (),
    exclude_op_types: Sequence[str] = (),
    keep_last_smoothing_float: bool = True,
    quantize_outputs: bool = False,
) -> onnx.ModelProto:
    """A Q/DQ model from any TensorRT calibration cache (the TensorRT 10 -> 11 migration path).

    The cache's scales are used as they are (they are the Q/DQ scales), so a cache written by
    `write_trt_cache(amax)` gives the same bytes as `export_qdq(model, amax)`.

    Raises:
        CacheFormatError: the cache is malformed.
    """
    cache = read_trt_cache(cache_bytes)
    config = _config(exclude_nodes, exclude_op_types, keep_last_smoothing_float, quantize_outputs)
    return build_qdq(model, cache.scale, config).model
