"""INT8-vs-FP32 accuracy of Q/DQ models, simulated exactly.

A Q/DQ model is run by ONNX Runtime with every graph optimisation off
(`GraphOptimizationLevel.ORT_DISABLE_ALL`), so each QuantizeLinear/DequantizeLinear executes as
written: exact fake quantization, the arithmetic TensorRT's INT8 kernels approximate. ONNX
Runtime's fused int8 CPU kernels (optimisations on) saturate on CPUs without VNNI and lose
~25 points of agreement whatever the calibration (docs/platform.md); that path is available
only on request and is always labelled "(ORT fused int8 kernels)", never mixed with simulation.

Metrics per output tensor, against the FP32 model's output on the same inputs, chosen by what the
output is (trtcal.core.output_metrics): SQNR, cosine and max abs error for every output; top-1
agreement only along a class axis ([N, C], or per position of [N, T, C]); top-5 overlap only when
C > 5; KL only over a distribution. An output produced by Softmax/LogSoftmax/Sigmoid also gets the
SQNR of that activation's input (exposed as an extra graph output), labelled as such: the SQNR of
probabilities is never called a logit SQNR.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal.core.output_metrics import KINDS, OutputMetrics, compare_output
from trtcal.errors import ConfigError, DataError, ModelError
from trtcal.export.qdq import ModelLike, load_model, serialize_model
from trtcal.progress import NO_PROGRESS, ProgressCallback

if TYPE_CHECKING:
    import onnx
    import onnxruntime

__all__ = [
    "ACTIVATIONS",
    "FUSED_SUFFIX",
    "EvalConfig",
    "LogitMetrics",
    "OutputMetrics",
    "OutputEvaluation",
    "MethodEvaluation",
    "EvaluationResult",
    "compare_logits",
    "output_activations",
    "simulation_session",
    "run_model",
    "run_outputs",
    "evaluate",
]

log = logging.getLogger(__name__)

FUSED_SUFFIX = " (ORT fused int8 kernels)"
ACTIVATIONS = ("Softmax", "LogSoftmax", "Sigmoid")
Inputs = npt.NDArray[Any] | Mapping[str, npt.NDArray[Any]]
LogitMetrics = OutputMetrics  # the former name: one output's metrics
# Ops that move or relabel values without changing them (an opset upgrade wraps an old Softmax in
# Flatten/Reshape; a Q/DQ model may quantize the output).
_PASS_THROUGH = ("QuantizeLinear", "DequantizeLinear", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Attributes:
    batch_size: inputs per ONNX Runtime call.
    intra_op_threads: ONNX Runtime intra-op threads (0 = ONNX Runtime's choice).
    output_name: the primary output (None = the model's first output): `MethodEvaluation.metrics`,
        `best()`, labels and the sensitivity search use it. Every output is evaluated.
    output_kinds: output name -> "classes" | "sequence" | "values" | "auto" (default "auto", see
        trtcal.core.output_metrics); e.g. {"boxes": "values"} for an [N, 4] box output.
    top_k: the k of the top-k overlap (reported only when an output has more than k classes).
    fused_int8: also run each Q/DQ model through ONNX Runtime's fused int8 kernels (labelled apart).
    """

    batch_size: int = 16
    intra_op_threads: int = 0
    output_name: str | None = None
    output_kinds: Mapping[str, str] = field(default_factory=dict)
    top_k: int = 5
    fused_int8: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.intra_op_threads, int) or self.intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads must be an integer >= 0, got {self.intra_op_threads!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        for name, kind in self.output_kinds.items():
            if kind not in KINDS:
                raise ConfigError(f"output_kinds[{name!r}] = {kind!r}; choose one of {KINDS}")


@dataclass(frozen=True)
class OutputEvaluation:
    """One output of one Q/DQ model. `activation`: the Softmax/LogSoftmax/Sigmoid that produced it
    (None if none); `pre_activation_sqnr_db`: SQNR of that activation's input."""

    name: str
    metrics: OutputMetrics
    activation: str | None = None
    pre_activation_sqnr_db: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "activation": self.activation,
            "pre_activation_sqnr_db": json_number(self.pre_activation_sqnr_db),
            **_finite(asdict(self.metrics)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputEvaluation:
        pre = data.get("pre_activation_sqnr_db")
        return cls(
            name=str(data["name"]),
            metrics=_metrics_from(data),
            activation=data.get("activation"),
            pre_activation_sqnr_db=None if pre is None else float(number(pre)),
        )


def _metrics_from(data: Mapping[str, Any]) -> OutputMetrics:
    values = {k: number(data[k]) for k in OutputMetrics.__dataclass_fields__ if k in data}
    for k in ("top1_agreement", "top5_overlap", "mean_kl"):
        values.setdefault(k, None)
    return OutputMetrics(**values)


@dataclass(frozen=True)
class MethodEvaluation:
    label: str
    simulated: bool  # False only for the fused-int8 path
    metrics: OutputMetrics  # of the primary output
    outputs: tuple[OutputEvaluation, ...] = ()  # every output, in the model's order

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "simulated": self.simulated,
            **_finite(asdict(self.metrics)),
            "outputs": [o.to_dict() for o in self.outputs],
        }


@dataclass(frozen=True)
class EvaluationResult:
    rows: tuple[MethodEvaluation, ...]
    num_inputs: int
    fp32_accuracy: float | None = None
    primary_output: str | None = None

    def row(self, label: str) -> MethodEvaluation:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(label)

    def best(self) -> MethodEvaluation:
        """The simulated row with the highest primary-output SQNR (ties: higher agreement, then label)."""
        rows = [r for r in self.rows if r.simulated]
        if not rows:
            raise ConfigError("no simulated evaluation rows")
        return sorted(rows, key=lambda r: (-r.metrics.sqnr_db, -(r.metrics.top1_agreement or 0.0), r.label))[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_inputs": self.num_inputs,
            "fp32_accuracy": self.fp32_accuracy,
            "primary_output": self.primary_output,
            "simulation": "onnxruntime CPU, GraphOptimizationLevel.ORT_DISABLE_ALL (Q/DQ executed as written)",
            "rows": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        rows = []
        for r in data["rows"]:
            outputs = tuple(OutputEvaluation.from_dict(o) for o in r.get("outputs", ()))
            rows.append(MethodEvaluation(r["label"], bool(r["simulated"]), _metrics_from(r), outputs))
        return cls(
            rows=tuple(rows),
            num_inputs=int(data["num_inputs"]),
            fp32_accuracy=data.get("fp32_accuracy"),
            primary_output=data.get("primary_output"),
        )

    def to_markdown(self) -> str:
        """One table per output, with only the columns that output defines, each named for what it measures."""
        names = [o.name for o in self.rows[0].outputs] if self.rows and self.rows[0].outputs else [None]
        tables = [_output_table(self.rows, name, titled=len(names) > 1) for name in names]
        return "\n\n".join(tables)


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return ""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _output_table(rows: Sequence[MethodEvaluation], name: str | None, *, titled: bool) -> str:
    def pick(r: MethodEvaluation) -> OutputEvaluation:
        if name is None:
            return OutputEvaluation("output", r.metrics)
        return next(o for o in r.outputs if o.name == name)

    picked = [(r.label, pick(r)) for r in rows]
    first = picked[0][1]
    act = first.activation
    sqnr_label = f"SQNR of the {act} output (dB)" if act else "output SQNR (dB)"
    agreement_label = "top-1 agreement (per position)" if first.metrics.kind == "sequence" else "top-1 agreement"
    kl_label = "mean KL" if act in ("Softmax", "LogSoftmax") else "mean KL of softmax"
    # Task agreement first where the output defines it (the column users read first), then SQNR.
    columns: list[tuple[str, Any]] = [
        (agreement_label, lambda o: _fmt(o.metrics.top1_agreement, 4)),
        (sqnr_label, lambda o: _fmt(o.metrics.sqnr_db, 2)),
        (f"{act} input SQNR (dB)" if act else "", lambda o: _fmt(o.pre_activation_sqnr_db, 2)),
        ("cosine", lambda o: _fmt(o.metrics.cosine, 5)),
        ("max abs error", lambda o: "" if o.metrics.max_abs_error is None else f"{o.metrics.max_abs_error:.4g}"),
        ("sequence match", lambda o: _fmt(o.metrics.sequence_match, 4)),
        ("top-5 overlap", lambda o: _fmt(o.metrics.top5_overlap, 4)),
        (kl_label, lambda o: _fmt(o.metrics.mean_kl, 5)),
        ("accuracy", lambda o: _fmt(o.metrics.accuracy, 4)),
    ]
    columns = [(h, f) for h, f in columns if h and any(f(o) for _, o in picked)]
    lines = []
    if titled:
        lines += [f"Output `{name}` ({first.metrics.kind}" + (f", from {act}" if act else "") + "):", ""]
    lines.append("| method | " + " | ".join(h for h, _ in columns) + " |")
    lines.append("|" + "---|" * (1 + len(columns)))
    for label, o in picked:
        lines.append("| " + " | ".join([label, *(f(o) for _, f in columns)]) + " |")
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


def compare_logits(
    reference: npt.ArrayLike,
    quantized: npt.ArrayLike,
    labels: npt.ArrayLike | None = None,
    *,
    top_k: int = 5,
    kind: str = "auto",
    activation: str | None = None,
) -> OutputMetrics:
    """Metrics of one output against its reference (kept name; see trtcal.core.output_metrics)."""
    return compare_output(reference, quantized, kind=kind, activation=activation, labels=labels, top_k=top_k)


# ---------------------------------------------------------------------------------------------
# Graph outputs and the activations that produce them


def output_activations(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """Graph output -> (activation op, its input tensor) for outputs a Softmax/LogSoftmax/Sigmoid
    produces, looking through Q/DQ, Identity and shape-only nodes."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found: dict[str, tuple[str, str]] = {}
    for output in model.graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type in _PASS_THROUGH:
            node = producer.get(node.input[0])
        if node is not None and node.op_type in ACTIVATIONS and node.domain in ("", "ai.onnx"):
            found[output.name] = (node.op_type, node.input[0])
    return found


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the given intermediate tensors (float)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            have.add(name)
    return out


# ---------------------------------------------------------------------------------------------
# Running models


def simulation_session(
    model: ModelLike, *, fused_int8: bool = False, intra_op_threads: int = 0, low_memory: bool = False
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session; optimisations off unless `fused_int8` (then all on).

    `low_memory`: no memory arena and no memory pattern, so a session's intermediates are freed after
    each run instead of being kept at its peak (the auto search holds three sessions: 1.39 -> 1.08 GiB
    peak RSS on the OCR recogniser in one measurement; the same values)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if low_memory:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
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


def run_outputs(
    session: onnxruntime.InferenceSession,
    inputs: Inputs,
    names: Sequence[str] | None = None,
    *,
    batch_size: int = 16,
    progress: ProgressCallback = NO_PROGRESS,
    stage: str = "run",
) -> dict[str, npt.NDArray[Any]]:
    """The named outputs (default: all) over all inputs, in micro-batches, concatenated."""
    feed = _as_feed(session, inputs)
    outputs = [o.name for o in session.get_outputs()]
    wanted = list(names) if names is not None else outputs
    unknown = [n for n in wanted if n not in outputs]
    if unknown:
        raise ConfigError(f"output_name {unknown[0]!r} is not an output of the model ({outputs})")
    n = next(iter(feed.values())).shape[0]
    parts: dict[str, list[npt.NDArray[Any]]] = {name: [] for name in wanted}
    progress.start(stage, n, "inputs")
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in feed.items()}
        for name, value in zip(wanted, session.run(wanted, batch)):
            parts[name].append(np.asarray(value))
        progress.advance(stage, min(batch_size, n - start))
    progress.finish(stage)
    return {name: np.concatenate(p, axis=0) for name, p in parts.items()}


def run_model(
    session: onnxruntime.InferenceSession,
    inputs: Inputs,
    *,
    output_name: str | None = None,
    batch_size: int = 16,
    progress: ProgressCallback = NO_PROGRESS,
    stage: str = "run",
) -> npt.NDArray[np.float32]:
    """One output of the model (default: the first) over all inputs, in micro-batches, concatenated."""
    name = output_name or session.get_outputs()[0].name
    return run_outputs(session, inputs, [name], batch_size=batch_size, progress=progress, stage=stage)[name]


class _Judge:
    """FP32 reference outputs (and pre-activation tensors) computed once; Q/DQ models judged against them."""

    def __init__(self, fp32_model: ModelLike, inputs: Inputs, config: EvalConfig, progress: ProgressCallback) -> None:
        self.config, self.inputs, self.progress = config, inputs, progress
        fp32 = load_model(fp32_model)
        self.outputs = [o.name for o in fp32.graph.output]
        self.primary = config.output_name or self.outputs[0]
        if self.primary not in self.outputs:
            raise ConfigError(f"output_name {self.primary!r} is not an output of the model ({self.outputs})")
        unknown = [k for k in config.output_kinds if k not in self.outputs]
        if unknown:
            raise ConfigError(f"output_kinds names {unknown}, not outputs of the model ({self.outputs})")
        self.activations = output_activations(fp32)
        self.reference = self._run(fp32, "fp32", self.activations)

    def _run(self, model: onnx.ModelProto, stage: str, activations: Mapping[str, tuple[str, str]], fused: bool = False
             ) -> dict[str, npt.NDArray[Any]]:
        pre = {f"{name}\0pre": tensor for name, (_, tensor) in activations.items()}
        session = simulation_session(
            with_outputs(model, list(pre.values())), fused_int8=fused, intra_op_threads=self.config.intra_op_threads
        )
        values = run_outputs(session, self.inputs, [*self.outputs, *dict.fromkeys(pre.values())],
                             batch_size=self.config.batch_size, progress=self.progress, stage=stage)
        return {**{n: values[n] for n in self.outputs}, **{k: values[t] for k, t in pre.items()}}

    def judge(self, model: ModelLike, label: str, labels: npt.NDArray[Any] | None, fused: bool = False
              ) -> MethodEvaluation:
        qdq = load_model(model)
        # The Q/DQ model's own activation input (it may be a DequantizeLinear output, not the FP32 name).
        mine = {k: v for k, v in output_activations(qdq).items() if k in self.activations}
        values = self._run(qdq, label, mine, fused)
        evaluations = []
        for name in self.outputs:
            act = self.activations.get(name, (None, ""))[0]
            try:
                metrics = compare_output(
                    self.reference[name], values[name], kind=self.config.output_kinds.get(name, "auto"),
                    activation=act, labels=labels if name == self.primary else None, top_k=self.config.top_k,
                )
            except DataError as exc:
                raise DataError(f"output {name!r} of {label!r}: {exc}") from None
            pre_sqnr = None
            if f"{name}\0pre" in values:
                ref_pre, out_pre = self.reference[f"{name}\0pre"], values[f"{name}\0pre"]
                if out_pre.size == ref_pre.size:  # the same values, maybe reshaped by an opset upgrade
                    pre_sqnr = compare_output(ref_pre, out_pre.reshape(ref_pre.shape), kind="values").sqnr_db
            evaluations.append(OutputEvaluation(name, metrics, act, pre_sqnr))
        primary = next(e for e in evaluations if e.name == self.primary)
        return MethodEvaluation(label, not fused, primary.metrics, tuple(evaluations))


def evaluate(
    fp32_model: ModelLike,
    qdq_models: Mapping[str, ModelLike],
    inputs: Inputs,
    labels: npt.ArrayLike | None = None,
    *,
    config: EvalConfig | None = None,
    progress: ProgressCallback = NO_PROGRESS,
) -> EvaluationResult:
    """Each Q/DQ model against the FP32 model on the same inputs (exact simulation), every output.

    Args:
        fp32_model: the FP32 ONNX model.
        qdq_models: label (e.g. the calibration method) -> Q/DQ model.
        inputs: one array [N, ...] for a single-input model, or input name -> array.
        labels: optional class index per input, for top-1 accuracy of the primary output (which
            must then have a class axis; out-of-range labels are an error).
        config: EvalConfig().
        progress: receives one stage per model.

    Returns:
        EvaluationResult with one simulated row per label, in the mapping's order, then (only with
        `config.fused_int8`) one "<label> (ORT fused int8 kernels)" row per label.
    """
    config = config or EvalConfig()
    if not qdq_models:
        raise ConfigError("qdq_models is empty: give at least one label -> Q/DQ model")
    judge = _Judge(fp32_model, inputs, config, progress)
    reference = judge.reference[judge.primary]
    n = reference.shape[0]
    lab = None if labels is None else np.asarray(labels).reshape(-1)
    fp32_accuracy = None
    if lab is not None:
        # Checks the labels (count, integer, range) against the primary output before any Q/DQ run.
        fp32_metrics = compare_output(reference, reference, kind=config.output_kinds.get(judge.primary, "auto"),
                                      activation=judge.activations.get(judge.primary, (None,))[0], labels=lab)
        fp32_accuracy = fp32_metrics.accuracy
    rows = [judge.judge(model, label, lab) for label, model in qdq_models.items()]
    if config.fused_int8:
        rows += [judge.judge(model, label + FUSED_SUFFIX, lab, fused=True) for label, model in qdq_models.items()]
    for r in rows:
        log.info("%s: %s SQNR %.2f dB, agreement %s", r.label, judge.primary, r.metrics.sqnr_db, r.metrics.top1_agreement)
    return EvaluationResult(rows=tuple(rows), num_inputs=n, fp32_accuracy=fp32_accuracy, primary_output=judge.primary)
