"""Per-layer quantization sensitivity and automatic float fallback.

Unit of analysis: one quantized *layer* of the export plan (a Conv/ConvTranspose/Gemm/MatMul with
its input activation and per-channel weight Q/DQ, or a residual Add with its residual input Q/DQ),
because that is what a fallback keeps in float (`QdqConfig.float_nodes`).

Method: **quantize one at a time**. For each layer, a model with only that layer's Q/DQ is run on
a small evaluation subset and its output noise Σ(fp32 − out)² / Σ fp32² (= 10^(−SQNR/10)) is
measured. Why this and not leave-one-out: the rounding errors of different layers are nearly
independent, so their output noise powers add; one-at-a-time measures each layer's share against
a clean FP32 background, while leave-one-out measures the same share as a small difference of two
large, noisy totals, which needs many more inputs to rank reliably. Both cost one model run per
layer; on 2 cores EfficientNet-Lite0's 58 layers on 16 inputs take about a minute. The fallback
then checks the additive approximation with real full-model evaluations: it keeps the k most
harmful layers in float for the smallest k (exponential then binary search) whose exactly
simulated top-1 agreement on all the given inputs reaches the target.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from trtcal.errors import ConfigError
from trtcal.export.evaluate import (
    EvalConfig,
    Inputs,
    LogitMetrics,
    compare_logits,
    json_number,
    number,
    run_model,
    simulation_session,
)
from trtcal.export.qdq import (
    ModelLike,
    QdqConfig,
    _checked_scales,
    _upgrade_opset,
    apply_plan,
    build_qdq,
    load_model,
    node_label,
    plan_qdq,
)
from trtcal.progress import NO_PROGRESS, ProgressCallback

if TYPE_CHECKING:
    import onnx

__all__ = [
    "SensitivityConfig",
    "LayerSensitivity",
    "SensitivityResult",
    "FallbackResult",
    "rank_sensitivity",
    "fallback_auto",
    "layer_macs",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SensitivityConfig:
    """Attributes:
    max_inputs: inputs used to rank the layers (the first ones given); the fallback search
        evaluates on all inputs.
    batch_size / intra_op_threads / output_name: as in EvalConfig.
    target_agreement: the top-1 agreement the fallback must reach (0 < t <= 1).
    """

    max_inputs: int = 16
    batch_size: int = 16
    intra_op_threads: int = 0
    output_name: str | None = None
    target_agreement: float = 0.99

    def __post_init__(self) -> None:
        if not isinstance(self.max_inputs, int) or self.max_inputs < 1:
            raise ConfigError(f"max_inputs must be an integer >= 1, got {self.max_inputs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.intra_op_threads, int) or self.intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads must be an integer >= 0, got {self.intra_op_threads!r}")
        t = self.target_agreement
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 < float(t) <= 1.0):
            raise ConfigError(f"target_agreement must be in (0, 1], got {t!r}")


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    op_type: str
    tensors: tuple[str, ...]  # the activations and weights this layer's Q/DQ covers
    noise_ratio: float  # Σ(fp32 − out)² / Σ fp32² with only this layer quantized
    sqnr_db: float
    top1_agreement: float
    macs: int | None = None


@dataclass(frozen=True)
class SensitivityResult:
    ranking: tuple[LayerSensitivity, ...]  # most harmful first
    num_inputs: int
    method: str = "quantize one layer at a time"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "num_inputs": self.num_inputs,
            "ranking": [
                {
                    "node": r.node,
                    "op_type": r.op_type,
                    "tensors": list(r.tensors),
                    "noise_ratio": r.noise_ratio,
                    "sqnr_db": json_number(r.sqnr_db),
                    "top1_agreement": r.top1_agreement,
                    "macs": r.macs,
                }
                for r in self.ranking
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityResult:
        ranking = tuple(
            LayerSensitivity(
                node=r["node"],
                op_type=r["op_type"],
                tensors=tuple(r["tensors"]),
                noise_ratio=float(r["noise_ratio"]),
                sqnr_db=float(number(r["sqnr_db"])),
                top1_agreement=float(r["top1_agreement"]),
                macs=r.get("macs"),
            )
            for r in data["ranking"]
        )
        return cls(ranking=ranking, num_inputs=int(data["num_inputs"]), method=str(data.get("method", cls.method)))


@dataclass(frozen=True)
class FallbackStep:
    num_float: int
    top1_agreement: float
    sqnr_db: float


@dataclass(frozen=True)
class FallbackResult:
    target_agreement: float
    met: bool
    float_nodes: tuple[str, ...]  # kept float, most harmful first
    before: LogitMetrics  # every layer quantized
    after: LogitMetrics  # with float_nodes in float
    steps: tuple[FallbackStep, ...]  # every evaluation of the search, in order
    quantized_layers: int  # layers quantized without fallback
    float_mac_fraction: float | None  # share of the quantized layers' MACs now in float
    model: onnx.ModelProto | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        def metrics(m: LogitMetrics) -> dict[str, Any]:
            return {
                "top1_agreement": m.top1_agreement,
                "top5_overlap": m.top5_overlap,
                "sqnr_db": json_number(m.sqnr_db),
                "mean_kl": m.mean_kl,
                "num_inputs": m.num_inputs,
            }

        return {
            "target_agreement": self.target_agreement,
            "met": self.met,
            "float_nodes": list(self.float_nodes),
            "quantized_layers": self.quantized_layers,
            "float_mac_fraction": self.float_mac_fraction,
            "before": metrics(self.before),
            "after": metrics(self.after),
            "steps": [
                {"num_float": s.num_float, "top1_agreement": s.top1_agreement, "sqnr_db": json_number(s.sqnr_db)}
                for s in self.steps
            ],
        }


def _subset(inputs: Inputs, n: int) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: np.asarray(v)[:n] for k, v in inputs.items()}
    return np.asarray(inputs)[:n]


def _num_inputs(inputs: Inputs) -> int:
    if isinstance(inputs, Mapping):
        return int(np.asarray(next(iter(inputs.values()))).shape[0])
    return int(np.asarray(inputs).shape[0])


def layer_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates per Conv/ConvTranspose/Gemm/MatMul (unknown batch dims count as 1).

    Layers whose shapes cannot be inferred are left out.
    """
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return {}
    graph = inferred.graph
    shapes: dict[str, list[int]] = {}
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    macs: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        label = node_label(node, i)
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        a, w, out = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if a is None or w is None or out is None:
            continue
        if node.op_type == "Conv":
            macs[label] = int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            macs[label] = int(np.prod(a)) * int(np.prod(w[1:]))
        else:  # Gemm / MatMul: every output element is a dot product of length K
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[0] if (node.op_type == "Gemm" and trans_a) else a[-1]
            macs[label] = int(np.prod(out)) * int(k)
    return macs


def rank_sensitivity(
    fp32_model: ModelLike,
    scale_by_tensor: Mapping[str, float],
    inputs: Inputs,
    *,
    qdq_config: QdqConfig | None = None,
    config: SensitivityConfig | None = None,
    progress: ProgressCallback = NO_PROGRESS,
) -> SensitivityResult:
    """Rank the export's quantized layers by the output noise each causes alone (most harmful first)."""
    qdq_config = qdq_config or QdqConfig()
    config = config or SensitivityConfig()
    scales = _checked_scales(scale_by_tensor)
    model, _ = _upgrade_opset(load_model(fp32_model))
    plan = plan_qdq(model, scales, qdq_config)
    subset = _subset(inputs, config.max_inputs)
    n = _num_inputs(subset)
    macs = layer_macs(model)

    def logits(m: ModelLike) -> np.ndarray:
        session = simulation_session(m, intra_op_threads=config.intra_op_threads)
        return run_model(session, subset, output_name=config.output_name, batch_size=config.batch_size)

    reference = logits(model)
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    rows: list[LayerSensitivity] = []
    progress.start("sensitivity", len(plan.unit_labels), "layers")
    for index, label in plan.unit_labels.items():
        single = plan.restricted_to([index])
        out = logits(apply_plan(model, single, scales))
        noise = float(np.sum((reference.astype(np.float64) - out.astype(np.float64)) ** 2))
        metrics = compare_logits(reference, out)
        rows.append(
            LayerSensitivity(
                node=label,
                op_type=model.graph.node[index].op_type,
                tensors=tuple(q.tensor for q in single.inputs),
                noise_ratio=noise / signal if signal > 0 else math.inf,
                sqnr_db=metrics.sqnr_db,
                top1_agreement=metrics.top1_agreement,
                macs=macs.get(label),
            )
        )
        progress.advance("sensitivity")
    progress.finish("sensitivity")
    order = {label: k for k, label in enumerate(plan.unit_labels.values())}
    rows.sort(key=lambda r: (-r.noise_ratio, order[r.node]))
    return SensitivityResult(ranking=tuple(rows), num_inputs=n)


def fallback_auto(
    fp32_model: ModelLike,
    scale_by_tensor: Mapping[str, float],
    inputs: Inputs,
    *,
    ranking: SensitivityResult | None = None,
    qdq_config: QdqConfig | None = None,
    config: SensitivityConfig | None = None,
    progress: ProgressCallback = NO_PROGRESS,
) -> FallbackResult:
    """Keep the most harmful layers in float until the top-1 agreement reaches the target.

    Searches the number k of top-ranked layers kept float: k = 0, 1, 2, 4, … until the target
    holds, then bisects for the smallest such k among the ones between (each point is a real
    evaluation on all `inputs`). Returns the layers, the metrics before and after, every step and
    the share of the quantized layers' MACs that now run in float.
    """
    qdq_config = qdq_config or QdqConfig()
    config = config or SensitivityConfig()
    model, _ = _upgrade_opset(load_model(fp32_model))
    if ranking is None:
        ranking = rank_sensitivity(model, scale_by_tensor, inputs, qdq_config=qdq_config, config=config, progress=progress)
    order = [r.node for r in ranking.ranking]
    eval_config = EvalConfig(
        batch_size=config.batch_size, intra_op_threads=config.intra_op_threads, output_name=config.output_name
    )
    reference = run_model(
        simulation_session(model, intra_op_threads=eval_config.intra_op_threads),
        inputs,
        output_name=eval_config.output_name,
        batch_size=eval_config.batch_size,
    )
    results: dict[int, tuple[LogitMetrics, onnx.ModelProto]] = {}
    steps: list[FallbackStep] = []
    target = float(config.target_agreement)

    def at(k: int) -> LogitMetrics:
        if k not in results:
            cfg = QdqConfig(
                exclude_nodes=qdq_config.exclude_nodes,
                exclude_op_types=qdq_config.exclude_op_types,
                float_nodes=qdq_config.float_nodes + tuple(order[:k]),
                keep_last_smoothing_float=qdq_config.keep_last_smoothing_float,
                quantize_outputs=qdq_config.quantize_outputs,
                quantize_residual_add=qdq_config.quantize_residual_add,
            )
            qdq = build_qdq(model, scale_by_tensor, cfg).model
            out = run_model(
                simulation_session(qdq, intra_op_threads=eval_config.intra_op_threads),
                inputs,
                output_name=eval_config.output_name,
                batch_size=eval_config.batch_size,
            )
            metrics = compare_logits(reference, out)
            results[k] = (metrics, qdq)
            steps.append(FallbackStep(k, metrics.top1_agreement, metrics.sqnr_db))
            log.info("fallback: %d layer(s) float -> agreement %.4f, SQNR %.2f dB", k, metrics.top1_agreement, metrics.sqnr_db)
            progress.advance("fallback")
        return results[k][0]

    progress.start("fallback", None, "evaluations")
    best = 0
    if at(0).top1_agreement < target:
        lo, hi, k = 0, None, 1
        while k <= len(order):
            if at(k).top1_agreement >= target:
                hi = k
                break
            lo, k = k, k * 2
        if hi is None and lo < len(order):
            hi = len(order) if at(len(order)).top1_agreement >= target else None
            if hi is None:
                lo = len(order)
        if hi is None:
            best = lo
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if at(mid).top1_agreement >= target:
                    hi = mid
                else:
                    lo = mid
            best = hi
    progress.finish("fallback")

    chosen, model_out = results[best]
    macs = layer_macs(model)
    plan_layers = [r.node for r in ranking.ranking]
    total = sum(macs.get(name, 0) for name in plan_layers)
    floated = sum(macs.get(name, 0) for name in order[:best])
    return FallbackResult(
        target_agreement=target,
        met=chosen.top1_agreement >= target,
        float_nodes=tuple(order[:best]),
        before=results[0][0],
        after=chosen,
        steps=tuple(steps),
        quantized_layers=len(plan_layers),
        float_mac_fraction=(floated / total) if total else None,
        model=model_out,
    )
