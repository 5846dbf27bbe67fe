"""Metrics of one model output against its FP32 reference, chosen by what the output is.

Every output gets the metrics that mean something for any tensor:
  * SQNR (dB): 10·log10(Σ ref² / Σ (ref − out)²) over every element;
  * cosine: mean over inputs of the cosine between the flattened reference and output;
  * max abs error: max |ref − out|.

Class metrics need a class axis, which a shape alone does not always reveal ([N, 4] may be four
class scores or one box). The `kind` says which:
  * "classes"  [N, C]: argmax of the last axis (top-1 agreement; accuracy with labels);
  * "sequence" [N, T, C]: argmax of the last axis at every position (top-1 agreement over the
    N·T positions, and the share of inputs whose whole argmax sequence matches);
  * "values": no class axis (boxes, embeddings, maps, regressions): SQNR, cosine, max error only.
  * "auto": Sigmoid outputs and shapes other than [N, C] / [N, T, C] are "values"; so are outputs
    whose FP32 rows all have unit L2 norm (normalised embeddings); a last axis of 1 is "values";
    else "classes" / "sequence". Boxes of shape [N, 4] need kind="values".
Top-k overlap only when C > k. KL only over a distribution: a Softmax output is used as the
probabilities it is (clipped at 1e-12 and renormalised: a quantized output may not sum to 1),
logits and LogSoftmax outputs go through softmax (softmax(log_softmax(z)) = softmax(z)); Sigmoid
outputs are independent probabilities, not a distribution over C, so they get no KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from trtcal.errors import ConfigError, DataError

__all__ = ["KINDS", "OutputMetrics", "compare_output", "resolve_kind", "sqnr_db", "mean_cosine"]

KINDS = ("auto", "classes", "sequence", "values")
_PROBABILITY_FLOOR = 1e-12
_UNIT_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class OutputMetrics:
    """One output's metrics. None = not defined for this kind of output.

    The first six fields keep the order of the former LogitMetrics, so old positional uses work.
    """

    num_inputs: int
    top1_agreement: float | None
    top5_overlap: float | None
    sqnr_db: float
    mean_kl: float | None
    accuracy: float | None = None
    cosine: float | None = None
    max_abs_error: float | None = None
    kind: str = "classes"
    sequence_match: float | None = None


def sqnr_db(reference: npt.NDArray[np.float64], output: npt.NDArray[np.float64]) -> float:
    """10·log10(signal / noise); +inf for an exact match, -inf for a zero reference that was missed."""
    signal = float(np.sum(reference * reference))
    noise = float(np.sum((reference - output) ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def mean_cosine(reference: npt.NDArray[np.float64], output: npt.NDArray[np.float64]) -> float:
    """Mean per-input cosine of the flattened tensors (both zero: 1; one zero: 0)."""
    ref = reference.reshape(reference.shape[0], -1)
    out = output.reshape(output.shape[0], -1)
    dot = np.sum(ref * out, axis=1)
    norms = np.sqrt(np.sum(ref * ref, axis=1)) * np.sqrt(np.sum(out * out, axis=1))
    both_zero = (np.sum(ref * ref, axis=1) == 0) & (np.sum(out * out, axis=1) == 0)
    cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    return float(np.mean(np.clip(cos, -1.0, 1.0)))


def _unit_norm_rows(reference: npt.NDArray[np.float64]) -> bool:
    norms = np.sqrt(np.sum(reference * reference, axis=-1))
    return bool(np.all(np.abs(norms - 1.0) < _UNIT_NORM_TOLERANCE))


def resolve_kind(kind: str, reference: npt.NDArray[Any], activation: str | None = None) -> str:
    """The concrete kind ("classes", "sequence", "values") of an output; see the module docstring."""
    if kind not in KINDS:
        raise ConfigError(f"unknown output kind {kind!r}; choose one of {KINDS}")
    per_input = reference.shape[1:]
    if kind != "auto":
        want = {"classes": 1, "sequence": 2}.get(kind)
        if want is not None and len(per_input) != want:
            raise DataError(
                f"kind {kind!r} needs {'[N, C]' if want == 1 else '[N, T, C]'}, got shape {list(reference.shape)}"
            )
        return kind
    if activation == "Sigmoid" or len(per_input) not in (1, 2) or per_input[-1] < 2:
        return "values"
    if activation not in ("Softmax", "LogSoftmax") and _unit_norm_rows(np.asarray(reference, np.float64)):
        return "values"
    return "classes" if len(per_input) == 1 else "sequence"


def _top_k(x: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.intp]:
    # Stable order (ties go to the lower class index), so results do not depend on the sort kernel.
    top: npt.NDArray[np.intp] = np.argsort(-x, axis=1, kind="stable")[:, :k].copy()  # not a view of every index
    return top


def _distribution(x: npt.NDArray[np.float64], activation: str | None) -> npt.NDArray[np.float64] | None:
    """Rows as probability distributions, or None where the output is not one (Sigmoid)."""
    if activation == "Sigmoid":
        return None
    if activation == "Softmax":
        p = np.maximum(x, _PROBABILITY_FLOOR)
    else:
        p = np.exp(x - x.max(axis=1, keepdims=True))
    out: npt.NDArray[np.float64] = p / p.sum(axis=1, keepdims=True)
    return out


_CHUNK_VALUES = 1 << 20  # values per block of rows in the class metrics


def _class_rows(
    rows_ref: npt.NDArray[np.float64], rows_out: npt.NDArray[np.float64], activation: str | None, top_k: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], list[float] | None, npt.NDArray[np.float64] | None]:
    """Per row: top-1 of the reference and of the output, top-k overlap (when C > k), KL (for a distribution).

    Every one of them is a function of its row alone, so blocks of rows give the same values as all rows at
    once, with temporaries the size of a block: the sorts, distributions and logarithms of every row together
    took several copies of an [N·T, C] output (0.6 GiB for an OCR recogniser's 32 lines).
    """
    classes = rows_ref.shape[1]
    step = max(1, _CHUNK_VALUES // max(classes, 1))
    top1: tuple[list[npt.NDArray[np.intp]], list[npt.NDArray[np.intp]]] = ([], [])
    overlaps: list[float] | None = [] if classes > top_k else None
    kl_parts: list[npt.NDArray[np.float64]] | None = [] if activation != "Sigmoid" else None
    for start in range(0, rows_ref.shape[0], step):
        r, o = rows_ref[start : start + step], rows_out[start : start + step]
        top1[0].append(_top_k(r, 1)[:, 0])
        top1[1].append(_top_k(o, 1)[:, 0])
        if overlaps is not None:
            overlaps.extend(np.intersect1d(a, b).size / top_k for a, b in zip(_top_k(r, top_k), _top_k(o, top_k)))
        p, q = _distribution(r, activation), _distribution(o, activation)
        if kl_parts is not None and p is not None and q is not None:
            kl_parts.append(np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), axis=1))
    kl_rows = np.concatenate(kl_parts) if kl_parts else None
    return np.concatenate(top1[0]), np.concatenate(top1[1]), overlaps, kl_rows


def _check_labels(labels: npt.ArrayLike, rows: int, classes: int) -> npt.NDArray[np.int64]:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != rows:
        raise DataError(f"{lab.size} labels (shape {list(lab.shape)}) for {rows} inputs")
    if lab.dtype.kind not in "iu":
        raise DataError(f"labels must be integer class indices, got dtype {lab.dtype}")
    bad = (lab < 0) | (lab >= classes)
    if np.any(bad):
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"label {int(lab[first])} at index {first} is outside the output's {classes} classes (0..{classes - 1})"
        )
    return lab.astype(np.int64)


def compare_output(
    reference: npt.ArrayLike,
    output: npt.ArrayLike,
    *,
    kind: str = "auto",
    activation: str | None = None,
    labels: npt.ArrayLike | None = None,
    top_k: int = 5,
) -> OutputMetrics:
    """Metrics of `output` against `reference` (same shape [N, ...]); `activation` is the op that
    produced the output (Softmax, LogSoftmax, Sigmoid) or None."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(output, dtype=np.float64)
    if ref.shape != out.shape:
        raise DataError(f"reference {list(ref.shape)} and quantized {list(out.shape)} differ in shape")
    if ref.ndim < 1 or ref.shape[0] == 0:
        raise DataError("no outputs to compare")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(out))):
        raise DataError("the outputs contain NaN or Inf")
    n = ref.shape[0]
    concrete = resolve_kind(kind, ref, activation)
    common: dict[str, Any] = {
        "num_inputs": n,
        "sqnr_db": sqnr_db(ref, out),
        "cosine": mean_cosine(ref, out),
        "max_abs_error": float(np.max(np.abs(ref - out))) if ref.size else 0.0,
        "kind": concrete,
    }
    if concrete == "values":
        if labels is not None:
            raise DataError("labels need an output with a class axis (kind 'classes')")
        return OutputMetrics(top1_agreement=None, top5_overlap=None, mean_kl=None, **common)
    classes = ref.shape[-1]
    top1_ref, top1_out, overlaps, kl_rows = _class_rows(ref.reshape(-1, classes), out.reshape(-1, classes), activation, top_k)
    agree = top1_ref == top1_out
    overlap = float(np.mean(overlaps)) if overlaps is not None else None
    kl = max(float(np.mean(kl_rows)), 0.0) if kl_rows is not None else None
    accuracy = sequence_match = None
    if concrete == "sequence":
        if labels is not None:
            raise DataError("labels are supported for [N, C] class outputs only")
        sequence_match = float(np.mean(np.all(agree.reshape(n, -1), axis=1)))
    elif labels is not None:
        accuracy = float(np.mean(top1_out == _check_labels(labels, n, classes)))
    return OutputMetrics(
        top1_agreement=float(np.mean(agree)),
        top5_overlap=overlap,
        mean_kl=kl,
        accuracy=accuracy,
        sequence_match=sequence_match,
        **common,
    )
