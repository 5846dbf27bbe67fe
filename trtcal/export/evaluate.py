"""INT8-vs-FP32 accuracy of Q/DQ models, simulated exactly.

A Q/DQ model is run by ONNX Runtime with every graph optimisation off
(`GraphOptimizationLevel.ORT_DISABLE_ALL`), so each QuantizeLinear/DequantizeLinear executes as
written: exact fake quantization, the arithmetic TensorRT's INT8 kernels approximate. ONNX
Runtime's fused int8 CPU kernels (optimisations on) saturate on CPUs without VNNI and lose
~25 points of agreement whatever the calibration (platform-notes.md); that path is available
only on request and is always labelled "(ORT fused int8 kernels)", never mixed with simulation.

Metrics per model, against the FP32 model's output on the same inputs:
  * top-1 agreement: share of inputs whose top-1 class equals FP32's;
  * top-5 overlap: mean |top5(int8) ∩ top5(fp32)| / 5;
  * logit SQNR (dB): 10·log10(Σ fp32² / Σ (fp32 − int8)²) over every logit;
  * mean KL(softmax(fp32) ‖ softmax(int8)) in nats;
  * top-1 accuracy when labels are given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal.errors import ConfigError, DataError, ModelError
from trtcal.export.qdq import ModelLike, load_model, serialize_model
from trtcal.progress import NO_PROGRESS, ProgressCallback

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "FUSED_SUFFIX",
    "EvalConfig",
    "LogitMetrics",
    "MethodEvaluation",
    "EvaluationResult",
    "compare_logits",
    "simulation_session",
    "run_model",
    "evaluate",
]

log = logging.getLogger(__name__)

FUSED_SUFFIX = " (ORT fused int8 kernels)"
Inputs = npt.NDArray[Any] | Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Attributes:
    batch_size: inputs per ONNX Runtime call.
    intra_op_threads: ONNX Runtime intra-op threads (0 = ONNX Runtime's choice).
    output_name: the output holding the logits (None = the model's first output).
    top_k: the k of the top-k overlap.
    fused_int8: also run each Q/DQ model through ONNX Runtime's fused int8 kernels (labelled apart).
    """

    batch_size: int = 16
    intra_op_threads: int = 0
    output_name: str | None = None
    top_k: int = 5
    fused_int8: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.intra_op_threads, int) or self.intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads must be an integer >= 0, got {self.intra_op_threads!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {self.top_k!r}")


@dataclass(frozen=True)
class LogitMetrics:
    num_inputs: int
    top1_agreement: float
    top5_overlap: float
    sqnr_db: float
    mean_kl: float
    accuracy: float | None = None


@dataclass(frozen=True)
class MethodEvaluation:
    label: str
    simulated: bool  # False only for the fused-int8 path
    metrics: LogitMetrics

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "simulated": self.simulated, **_finite(asdict(self.metrics))}


@dataclass(frozen=True)
class EvaluationResult:
    rows: tuple[MethodEvaluation, ...]
    num_inputs: int
    fp32_accuracy: float | None = None

    def row(self, label: str) -> MethodEvaluation:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(label)

    def best(self) -> MethodEvaluation:
        """The simulated row with the highest logit SQNR (ties: higher agreement, then label)."""
        rows = [r for r in self.rows if r.simulated]
        if not rows:
            raise ConfigError("no simulated evaluation rows")
        return sorted(rows, key=lambda r: (-r.metrics.sqnr_db, -r.metrics.top1_agreement, r.label))[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_inputs": self.num_inputs,
            "fp32_accuracy": self.fp32_accuracy,
            "simulation": "onnxruntime CPU, GraphOptimizationLevel.ORT_DISABLE_ALL (Q/DQ executed as written)",
            "rows": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        rows = []
        for r in data["rows"]:
            metrics = {k: r[k] for k in LogitMetrics.__dataclass_fields__ if k in r}
            metrics = {k: number(v) for k, v in metrics.items()}
            rows.append(MethodEvaluation(label=r["label"], simulated=bool(r["simulated"]), metrics=LogitMetrics(**metrics)))
        return cls(rows=tuple(rows), num_inputs=int(data["num_inputs"]), fp32_accuracy=data.get("fp32_accuracy"))

    def to_markdown(self) -> str:
        has_acc = any(r.metrics.accuracy is not None for r in self.rows)
        head = "| method | top-1 agreement | top-5 overlap | logit SQNR (dB) | mean KL | " + ("accuracy | " if has_acc else "")
        lines = [head.rstrip(), "|" + "---|" * (5 + int(has_acc))]
        for r in self.rows:
            m = r.metrics
            cells = [r.label, f"{m.top1_agreement:.4f}", f"{m.top5_overlap:.4f}", f"{m.sqnr_db:.2f}", f"{m.mean_kl:.5f}"]
            if has_acc:
                cells.append("" if m.accuracy is None else f"{m.accuracy:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def json_number(value: Any) -> Any:
    """JSON has no Infinity: an identical model's SQNR is written "inf" (and read back by `number`)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def number(value: Any) -> Any:
    return float(value) if value in ("inf", "-inf") else value


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: json_number(v) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------
# Metrics (pure)


def _log_softmax(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    shifted = x - x.max(axis=1, keepdims=True)
    out: npt.NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


def _top_k(x: npt.NDArray[Any], k: int) -> npt.NDArray[np.intp]:
    # Stable order (ties go to the lower class index), so results do not depend on the sort kernel.
    return np.argsort(-x, axis=1, kind="stable")[:, :k]


def compare_logits(
    reference: npt.ArrayLike,
    quantized: npt.ArrayLike,
    labels: npt.ArrayLike | None = None,
    *,
    top_k: int = 5,
) -> LogitMetrics:
    """Metrics of `quantized` logits against `reference` (both [N, C], or [N, ...] flattened per input)."""
    ref = np.asarray(reference, dtype=np.float64)
    q = np.asarray(quantized, dtype=np.float64)
    if ref.shape != q.shape:
        raise DataError(f"reference logits {ref.shape} and quantized logits {q.shape} differ in shape")
    if ref.ndim < 1 or ref.shape[0] == 0:
        raise DataError("no logits to compare")
    ref = ref.reshape(ref.shape[0], -1)
    q = q.reshape(q.shape[0], -1)
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(q))):
        raise DataError("the logits contain NaN or Inf")
    n, c = ref.shape
    k = min(top_k, c)
    top1_ref = _top_k(ref, 1)[:, 0]
    top1_q = _top_k(q, 1)[:, 0]
    agreement = float(np.mean(top1_ref == top1_q))
    tk_ref, tk_q = _top_k(ref, k), _top_k(q, k)
    overlap = float(np.mean([np.intersect1d(a, b).size / k for a, b in zip(tk_ref, tk_q)]))
    signal = float(np.sum(ref * ref))
    noise = float(np.sum((ref - q) ** 2))
    sqnr = math.inf if noise == 0.0 else (10.0 * math.log10(signal / noise) if signal > 0 else -math.inf)
    lp, lq = _log_softmax(ref), _log_softmax(q)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
    accuracy = None
    if labels is not None:
        lab = np.asarray(labels).reshape(-1)
        if lab.shape[0] != n:
            raise DataError(f"{lab.shape[0]} labels for {n} inputs")
        accuracy = float(np.mean(top1_q == lab))
    return LogitMetrics(
        num_inputs=n, top1_agreement=agreement, top5_overlap=overlap, sqnr_db=sqnr, mean_kl=max(kl, 0.0), accuracy=accuracy
    )


# ---------------------------------------------------------------------------------------------
# Running models


def simulation_session(
    model: ModelLike, *, fused_int8: bool = False, intra_op_threads: int = 0
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session; optimisations off unless `fused_int8` (then all on)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused_int8 else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(serialize_model(load_model(model)), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load the model: {exc}") from None


def _as_feed(session: onnxruntime.InferenceSession, inputs: Inputs) -> dict[str, npt.NDArray[Any]]:
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, Mapping):
        feed = {k: np.asarray(v) for k, v in inputs.items()}
        missing = [n for n in names if n not in feed]
        if missing:
            raise DataError(f"inputs lack the model input(s) {missing}; given {sorted(feed)}")
        feed = {n: feed[n] for n in names}
    else:
        if len(names) != 1:
            raise DataError(f"the model has {len(names)} inputs {names}; pass a mapping of input name -> array")
        feed = {names[0]: np.asarray(inputs)}
    sizes = {v.shape[0] if v.ndim else 0 for v in feed.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise DataError(f"every input needs the same non-zero first (batch) dimension, got {sorted(sizes)}")
    return feed


def run_model(
    session: onnxruntime.InferenceSession,
    inputs: Inputs,
    *,
    output_name: str | None = None,
    batch_size: int = 16,
    progress: ProgressCallback = NO_PROGRESS,
    stage: str = "run",
) -> npt.NDArray[np.float32]:
    """One output of the model over all inputs, in micro-batches, concatenated."""
    feed = _as_feed(session, inputs)
    outputs = [o.name for o in session.get_outputs()]
    name = output_name or outputs[0]
    if name not in outputs:
        raise ConfigError(f"output_name {name!r} is not an output of the model ({outputs})")
    n = next(iter(feed.values())).shape[0]
    parts = []
    progress.start(stage, n, "inputs")
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in feed.items()}
        parts.append(np.asarray(session.run([name], batch)[0]))
        progress.advance(stage, min(batch_size, n - start))
    progress.finish(stage)
    return np.concatenate(parts, axis=0)


def evaluate(
    fp32_model: ModelLike,
    qdq_models: Mapping[str, ModelLike],
    inputs: Inputs,
    labels: npt.ArrayLike | None = None,
    *,
    config: EvalConfig | None = None,
    progress: ProgressCallback = NO_PROGRESS,
) -> EvaluationResult:
    """Each Q/DQ model against the FP32 model on the same inputs (exact simulation).

    Args:
        fp32_model: the FP32 ONNX model.
        qdq_models: label (e.g. the calibration method) -> Q/DQ model.
        inputs: one array [N, ...] for a single-input model, or input name -> array.
        labels: optional class index per input, for top-1 accuracy.
        config: EvalConfig().
        progress: receives one stage per model.

    Returns:
        EvaluationResult with one simulated row per label, in the mapping's order, then (only with
        `config.fused_int8`) one "<label> (ORT fused int8 kernels)" row per label.
    """
    config = config or EvalConfig()
    if not qdq_models:
        raise ConfigError("qdq_models is empty: give at least one label -> Q/DQ model")

    def logits_of(model: ModelLike, stage: str, fused: bool = False) -> npt.NDArray[np.float32]:
        session = simulation_session(model, fused_int8=fused, intra_op_threads=config.intra_op_threads)
        return run_model(
            session, inputs, output_name=config.output_name, batch_size=config.batch_size, progress=progress, stage=stage
        )

    reference = logits_of(fp32_model, "fp32")
    n = reference.shape[0]
    lab = None if labels is None else np.asarray(labels).reshape(-1)
    fp32_accuracy = None
    if lab is not None:
        if lab.shape[0] != n:
            raise DataError(f"{lab.shape[0]} labels for {n} inputs")
        fp32_accuracy = float(np.mean(_top_k(reference.reshape(n, -1), 1)[:, 0] == lab))
    rows = [
        MethodEvaluation(label, True, compare_logits(reference, logits_of(model, label), lab, top_k=config.top_k))
        for label, model in qdq_models.items()
    ]
    if config.fused_int8:
        for label, model in qdq_models.items():
            fused = logits_of(model, label + FUSED_SUFFIX, fused=True)
            rows.append(MethodEvaluation(label + FUSED_SUFFIX, False, compare_logits(reference, fused, lab, top_k=config.top_k)))
    for r in rows:
        log.info("%s: agreement %.4f, SQNR %.2f dB", r.label, r.metrics.top1_agreement, r.metrics.sqnr_db)
    return EvaluationResult(rows=tuple(rows), num_inputs=n, fp32_accuracy=fp32_accuracy)

