"""Per-layer quantization sensitivity and automatic float fallback.

Unit of analysis: one *block* of the export plan: a quantized Conv/ConvTranspose/Gemm/MatMul (its
input activation and per-channel weight Q/DQ) together with the quantized elementwise ops that
follow it before the next such layer (a residual Add, quantized outputs). A block shares one
decision, because keeping a Conv float but its Add quantized (or the reverse) fragments the graph
into more INT8/FP32 transitions without removing the block's noise.

Method: **quantize one block at a time**. For each block, a model with only that block's Q/DQ is
run on a small evaluation subset and its output noise Σ(fp32 − out)² / Σ fp32² (= 10^(−SQNR/10))
is measured on the primary output. Why this and not leave-one-out: the rounding errors of
different layers are nearly independent, so their output noise powers add; one-at-a-time measures
each block's share against a clean FP32 background, while leave-one-out measures the same share as
a small difference of two large, noisy totals. Both cost one model run per block.

The fallback then keeps the k most harmful blocks float for the smallest k whose exactly simulated
metric on all the given inputs reaches the target: top-1 agreement (`target_agreement`, only for an
output with a class axis) and/or output SQNR (`target_sqnr`). It is bounded: it first checks the
largest allowed k (`max_float_fraction` of the blocks); if even that misses the target it stops
after two evaluations and says so, instead of floating most of the model. Otherwise exponential then
binary search: at most 2 + 2·log2(k_max) full evaluations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from trtcal.core.output_metrics import KINDS, OutputMetrics
from trtcal.errors import ConfigError
from trtcal.export.evaluate import (
    Inputs,
    LogitMetrics,
    compare_logits,
    json_number,
    number,
    output_activations,
    run_model,
    simulation_session,
)
from trtcal.export.model_io import checked_scales as _checked_scales
from trtcal.export.qdq import (
    WEIGHTED_OP_TYPES,
    ModelLike,
    QdqConfig,
    QdqPlan,
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
    "layer_groups",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SensitivityConfig:
    """Attributes:
    max_inputs: inputs used to rank the blocks (the first ones given); the fallback search
        evaluates on all inputs.
    batch_size / intra_op_threads / output_name: as in EvalConfig (output_name: the primary output).
    output_kind: what the primary output is ("auto", "classes", "sequence", "values"), as in EvalConfig.
    target_agreement: top-1 agreement the fallback must reach (0 < t <= 1); needs a class axis.
    target_sqnr: primary-output SQNR (dB) the fallback must reach. With neither target given the
        fallback aims at agreement 0.99; with both it must meet both.
    max_float_fraction: the most blocks the fallback may keep float, as a share of all blocks
        (at least one); beyond it the target is reported unreachable.
    """

    max_inputs: int = 16
    batch_size: int = 16
    intra_op_threads: int = 0
    output_name: str | None = None
    output_kind: str = "auto"
    target_agreement: float | None = None
    target_sqnr: float | None = None
    max_float_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not isinstance(self.max_inputs, int) or self.max_inputs < 1:
            raise ConfigError(f"max_inputs must be an integer >= 1, got {self.max_inputs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.intra_op_threads, int) or self.intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads must be an integer >= 0, got {self.intra_op_threads!r}")
        if self.output_kind not in KINDS:
            raise ConfigError(f"output_kind must be one of {KINDS}, got {self.output_kind!r}")
        t = self.target_agreement
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 < float(t) <= 1.0)):
            raise ConfigError(f"target_agreement must be in (0, 1], got {t!r}")
        d = self.target_sqnr
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(float(d))):
            raise ConfigError(f"target_sqnr must be a finite number of dB, got {d!r}")
        f = self.max_float_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 < float(f) <= 1.0):
            raise ConfigError(f"max_float_fraction must be in (0, 1], got {f!r}")

    @property
    def agreement_goal(self) -> float | None:
        if self.target_agreement is None and self.target_sqnr is None:
            return 0.99
        return None if self.target_agreement is None else float(self.target_agreement)

    def describe_target(self) -> str:
        parts = []
        if self.agreement_goal is not None:
            parts.append(f"top-1 agreement >= {self.agreement_goal:g}")
        if self.target_sqnr is not None:
            parts.append(f"SQNR >= {float(self.target_sqnr):g} dB")
        return " and ".join(parts)

    def met(self, m: OutputMetrics) -> bool:
        goal = self.agreement_goal
        if goal is not None and (m.top1_agreement is None or m.top1_agreement < goal):
            return False
        return self.target_sqnr is None or m.sqnr_db >= float(self.target_sqnr)


@dataclass(frozen=True)
class LayerSensitivity:
    """One block: `node` is its leading layer, `members` every layer of the block (leader first)."""

    node: str
    op_type: str
    tensors: tuple[str, ...]  # the activations and weights this block's Q/DQ covers
    noise_ratio: float  # Σ(fp32 − out)² / Σ fp32² with only this block quantized
    sqnr_db: float
    top1_agreement: float | None  # None: the primary output has no class axis
    macs: int | None = None  # of the whole block
    members: tuple[str, ...] = ()  # empty means the leader alone

    def __post_init__(self) -> None:
        # One spelling of "the leader alone", so a saved result loads back equal.
        if not self.members:
            object.__setattr__(self, "members", (self.node,))

    @property
    def layers(self) -> tuple[str, ...]:
        return self.members


@dataclass(frozen=True)
class SensitivityResult:
    ranking: tuple[LayerSensitivity, ...]  # most harmful first
    num_inputs: int
    method: str = "quantize one block at a time"

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
                    "members": list(r.layers),
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
                top1_agreement=None if r["top1_agreement"] is None else float(r["top1_agreement"]),
                macs=r.get("macs"),
                members=tuple(r.get("members", ())),
            )
            for r in data["ranking"]
        )
        return cls(ranking=ranking, num_inputs=int(data["num_inputs"]), method=str(data.get("method", cls.method)))


@dataclass(frozen=True)
class FallbackStep:
    num_float: int  # blocks kept float
    top1_agreement: float | None
    sqnr_db: float


@dataclass(frozen=True)
class FallbackResult:
    target_agreement: float | None
    met: bool
    float_nodes: tuple[str, ...]  # kept float, most harmful first
    before: LogitMetrics  # every layer quantized
    after: LogitMetrics  # with float_nodes in float
    steps: tuple[FallbackStep, ...]  # every evaluation of the search, in order
    quantized_layers: int  # layers quantized without fallback
    float_mac_fraction: float | None  # share of the quantized layers' MACs now in float
    model: onnx.ModelProto | None = field(default=None, repr=False, compare=False)
    target_sqnr: float | None = None
    target: str = ""  # in words
    reason: str = ""  # why the target was not met, when it was not
    float_blocks: int = 0
    max_float_blocks: int = 0

    def to_dict(self) -> dict[str, Any]:
        def metrics(m: LogitMetrics) -> dict[str, Any]:
            return {
                "top1_agreement": m.top1_agreement,
                "top5_overlap": m.top5_overlap,
                "sqnr_db": json_number(m.sqnr_db),
                "mean_kl": m.mean_kl,
                "cosine": m.cosine,
                "num_inputs": m.num_inputs,
            }

        return {
            "target_agreement": self.target_agreement,
            "target_sqnr": self.target_sqnr,
            "target": self.target,
            "reason": self.reason,
            "float_blocks": self.float_blocks,
            "max_float_blocks": self.max_float_blocks,
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


def layer_groups(model: onnx.ModelProto, plan: QdqPlan) -> list[tuple[int, ...]]:
    """The plan's units grouped into blocks (node indices, leader first, blocks in graph order).

    A Conv/ConvTranspose/Gemm/MatMul unit leads a block; any other unit (residual Add, a quantized
    output's consumer) joins the block of the latest such unit it is fed from through non-unit
    nodes (e.g. Conv -> BatchNorm -> Add joins the Conv). A unit fed by none stands alone.
    """
    graph = model.graph
    units = set(plan.unit_labels)
    leaders = {i for i in units if graph.node[i].op_type in WEIGHTED_OP_TYPES}
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    members: dict[int, list[int]] = {i: [i] for i in leaders}
    for i in sorted(units - leaders):
        seen: set[int] = set()
        stack = [producer[t] for t in graph.node[i].input if t in producer]
        found: list[int] = []
        while stack:
            j = stack.pop()
            if j in seen:
                continue
            seen.add(j)
            if j in leaders:
                found.append(j)
            elif j not in units:  # another unit ends this path: it is a block of its own
                stack.extend(producer[t] for t in graph.node[j].input if t in producer)
        if found:
            members[max(found)].append(i)
        else:
            members[i] = [i]
    return [tuple(members[k]) for k in sorted(members)]


class _Scorer:
    """Runs a model on fixed inputs and scores the primary output against the FP32 one."""

    def __init__(self, model: onnx.ModelProto, inputs: Inputs, config: SensitivityConfig) -> None:
        self.inputs, self.config = inputs, config
        self.output = config.output_name or model.graph.output[0].name
        self.activation = output_activations(model).get(self.output, (None, ""))[0]
        self.reference = self.run(model).astype(np.float64)
        self.signal = float(np.sum(self.reference**2))

    def run(self, model: ModelLike) -> np.ndarray:
        session = simulation_session(model, intra_op_threads=self.config.intra_op_threads)
        return run_model(session, self.inputs, output_name=self.output, batch_size=self.config.batch_size)

    def score(self, model: ModelLike) -> tuple[OutputMetrics, float]:
        out = self.run(model).astype(np.float64)
        noise = float(np.sum((self.reference - out) ** 2))
        metrics = compare_logits(self.reference, out, kind=self.config.output_kind, activation=self.activation)
        return metrics, (noise / self.signal if self.signal > 0 else math.inf)


def rank_sensitivity(
    fp32_model: ModelLike,
    scale_by_tensor: Mapping[str, float],
    inputs: Inputs,
    *,
    qdq_config: QdqConfig | None = None,
    config: SensitivityConfig | None = None,
    progress: ProgressCallback = NO_PROGRESS,
) -> SensitivityResult:
    """Rank the export's quantized blocks by the output noise each causes alone (most harmful first)."""
    qdq_config = qdq_config or QdqConfig()
    config = config or SensitivityConfig()
    scales = _checked_scales(scale_by_tensor)
    model, _ = _upgrade_opset(load_model(fp32_model))
    plan = plan_qdq(model, scales, qdq_config)
    subset = _subset(inputs, config.max_inputs)
    scorer = _Scorer(model, subset, config)
    macs = layer_macs(model)
    groups = layer_groups(model, plan)
    rows: list[LayerSensitivity] = []
    progress.start("sensitivity", len(groups), "blocks")
    for group in groups:
        single = plan.restricted_to(group)
        metrics, noise = scorer.score(apply_plan(model, single, scales))
        labels = tuple(plan.unit_labels[i] for i in group)
        known = [macs[label] for label in labels if label in macs]
        rows.append(
            LayerSensitivity(
                node=labels[0],
                op_type=model.graph.node[group[0]].op_type,
                tensors=tuple(dict.fromkeys(q.tensor for q in single.inputs)),
                noise_ratio=noise,
                sqnr_db=metrics.sqnr_db,
                top1_agreement=metrics.top1_agreement,
                macs=sum(known) if known else None,
                members=labels,
            )
        )
        progress.advance("sensitivity")
    progress.finish("sensitivity")
    order = {label: k for k, label in enumerate(plan.unit_labels.values())}
    rows.sort(key=lambda r: (-r.noise_ratio, order[r.node]))
    return SensitivityResult(ranking=tuple(rows), num_inputs=_num_inputs(subset))


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
    """Keep the most harmful blocks float until the target holds, or report it unreachable.

    Evaluates k = 0 blocks float, then the most allowed (k_max); if k_max misses the target the
    search stops there (result `met=False`, `reason` says why). Otherwise k = 1, 2, 4, … then
    bisection for the smallest k that meets it (each point a real evaluation on all `inputs`).
    """
    qdq_config = qdq_config or QdqConfig()
    config = config or SensitivityConfig()
    model, _ = _upgrade_opset(load_model(fp32_model))
    if ranking is None:
        ranking = rank_sensitivity(model, scale_by_tensor, inputs, qdq_config=qdq_config, config=config, progress=progress)
    blocks = [r.layers for r in ranking.ranking]
    scorer = _Scorer(model, inputs, config)
    results: dict[int, tuple[OutputMetrics, onnx.ModelProto]] = {}
    steps: list[FallbackStep] = []

    def at(k: int) -> OutputMetrics:
        if k not in results:
            floated = tuple(name for block in blocks[:k] for name in block)
            cfg = replace(qdq_config, float_nodes=qdq_config.float_nodes + floated)
            qdq = build_qdq(model, scale_by_tensor, cfg).model
            metrics, _ = scorer.score(qdq)
            results[k] = (metrics, qdq)
            steps.append(FallbackStep(k, metrics.top1_agreement, metrics.sqnr_db))
            log.info("fallback: %d block(s) float -> agreement %s, SQNR %.2f dB", k, metrics.top1_agreement, metrics.sqnr_db)
            progress.advance("fallback")
        return results[k][0]

    progress.start("fallback", None, "evaluations")
    first = at(0)
    if config.agreement_goal is not None and first.top1_agreement is None:
        raise ConfigError(
            f"output {scorer.output!r} has no class axis (kind {first.kind!r}), so top-1 agreement is undefined: "
            "give target_sqnr (--target-sqnr DB) instead, or name its kind (--output-kind NAME=classes)"
        )
    k_max = min(len(blocks), max(1, math.ceil(float(config.max_float_fraction) * len(blocks)))) if blocks else 0
    best, reason = 0, ""
    if not config.met(first):
        if k_max == 0 or not config.met(at(k_max)):
            best = k_max if k_max else 0
            m = results[best][0]
            reason = (
                f"unreachable within the budget: with the {k_max} most harmful of {len(blocks)} blocks float "
                f"(max_float_fraction {config.max_float_fraction:g}) the output reaches SQNR {m.sqnr_db:.2f} dB"
                + ("" if m.top1_agreement is None else f", agreement {m.top1_agreement:.4f}")
                + f", short of {config.describe_target()}. Try another calibration method, a looser target or a "
                "larger max_float_fraction."
            )
        else:
            lo, hi = 0, k_max
            k = 1
            while k < k_max:
                if config.met(at(k)):
                    hi = k
                    break
                lo, k = k, k * 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if config.met(at(mid)) else (mid, hi)
            best = hi
    progress.finish("fallback")

    chosen, model_out = results[best]
    macs = layer_macs(model)
    all_layers = [name for block in blocks for name in block]
    floated_layers = [name for block in blocks[:best] for name in block]
    total = sum(macs.get(name, 0) for name in all_layers)
    return FallbackResult(
        target_agreement=config.agreement_goal,
        met=config.met(chosen),
        float_nodes=tuple(floated_layers),
        before=results[0][0],
        after=chosen,
        steps=tuple(steps),
        quantized_layers=len(all_layers),
        float_mac_fraction=(sum(macs.get(n, 0) for n in floated_layers) / total) if total else None,
        model=model_out,
        target_sqnr=None if config.target_sqnr is None else float(config.target_sqnr),
        target=config.describe_target(),
        reason=reason,
        float_blocks=best,
        max_float_blocks=k_max,
    )
