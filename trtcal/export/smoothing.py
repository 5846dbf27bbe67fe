"""SmoothQuant-style smoothing of transformer activations before calibration (docs/qdq.md, "Smoothing").

TensorRT quantizes an activation with one scale per tensor. A LayerNorm output in a BERT-class
encoder has a few outlier channels (MiniLM-L6: max |x| 9.9 where most channels stay below 2), so a
per-tensor scale either clips them or spends most of the INT8 grid on them: measured on
all-MiniLM-L6-v2, these tensors (the Q/K/V and FFN-input dense inputs) are what keeps the embedding
cosine below 0.99 (BENCHMARKS.md). SmoothQuant (Xiao et al., 2023; ModelOpt's INT8 SmoothQuant
recipe) moves the channel spread into the weights, which are quantized per output channel:

    s_k = max|x_k|^alpha / max_n |W_kn|^(1 - alpha)       x' = x / s,   W' = diag(s) W

so x' W' = x W in exact arithmetic. It is applied where the paper applies it: to the normalisation
outputs read by MatMuls with constant 2-D weights (the Q/K/V denses and the first FFN dense), the
input-channel maxima taken over the calibration batch (padded positions left out when a mask is
given). 1/s is an explicit `Mul` after the normalisation (a post-LN encoder also feeds the
normalisation output to its residual Add, which keeps the unscaled value); TensorRT fuses such a
pointwise Mul with the normalisation. The smoothed model is an ordinary FP32 model: calibrate it and
deploy it instead of the original (its sha256, so every cache key, is its own).

Deterministic: same model, same arrays, same alpha: same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal.errors import ConfigError, ModelError
from trtcal.export.graph_rules import consumers, producers
from trtcal.export.smoothed_names import SMOOTHED_MODEL, SMOOTHED_SUFFIX, check_not_smoothed_for

if TYPE_CHECKING:
    import onnx

__all__ = [
    "SmoothingReport", "smoothing_groups", "smoothing_sites", "smoothing_scales", "channel_amax", "smooth_model",
    "SMOOTHED_MODEL", "SMOOTHED_SUFFIX", "check_not_smoothed_for",
]


_NORM_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"})
_MIN = 1e-5  # floor of both maxima: a dead channel or weight row gets a finite scale
_SCALE_LIMIT = 1e3  # s is clipped to [1/limit, limit] so no weight row or channel is pushed out of float range


@dataclass(frozen=True)
class SmoothingReport:
    """What `smooth_model` did: tensor -> the MatMuls that now read its smoothed copy, and alpha."""

    alpha: float
    smoothed: Mapping[str, tuple[str, ...]]

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "smoothed": {k: list(v) for k, v in self.smoothed.items()}}


def smoothing_groups(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Normalisation output -> indices of the MatMuls reading it as A with a constant 2-D weight B."""
    graph = model.graph
    weights = {t.name: len(t.dims) for t in graph.initializer}
    produced_by = producers(graph)
    groups: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or weights.get(node.input[1]) != 2:
            continue
        p = produced_by.get(node.input[0])
        if p is not None and graph.node[p].op_type in _NORM_OPS:
            groups.setdefault(node.input[0], []).append(i)
    return groups


def smoothing_sites(model: onnx.ModelProto, mode: str, *, model_label: str = "the model") -> dict[str, list[int]]:
    """What `calibrate` smooths under `mode` (CalibrationConfig.smooth): the groups, or {} for none.

    "auto": wherever `smoothing_groups` finds the pattern (nothing for a CNN); "on": the same, and a
    ConfigError when there is none; "off": nothing."""
    if mode == "off":
        return {}
    groups = smoothing_groups(model)
    if mode == "on" and not groups:
        raise ConfigError(
            f"--smooth on: {model_label} has no normalisation output (LayerNormalization, RMSNormalization) read "
            "by a MatMul with a constant 2-D weight, so there is nothing to smooth; use --smooth auto (smooths "
            "only where that pattern is) or off"
        )
    return groups


def smoothing_scales(
    channel_max: npt.NDArray[Any], weight_row_max: npt.NDArray[Any], alpha: float
) -> npt.NDArray[np.float32]:
    """s_k = max|x_k|^alpha / max|W_k|^(1 - alpha), both floored at 1e-5, clipped to [1e-3, 1e3]."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothing alpha must be in [0, 1], got {alpha!r}")
    x = np.maximum(np.asarray(channel_max, dtype=np.float64), _MIN)
    w = np.maximum(np.asarray(weight_row_max, dtype=np.float64), _MIN)
    return np.clip(x**alpha / w ** (1.0 - alpha), 1.0 / _SCALE_LIMIT, _SCALE_LIMIT).astype(np.float32)


def channel_amax(
    model: onnx.ModelProto, feeds: Iterable[dict[str, npt.NDArray[Any]]], tensors: list[str], mask_input: str | None = None
) -> dict[str, npt.NDArray[np.float64]]:
    """Per last-axis channel max |x| of each tensor over the feeds (FP32, ONNX Runtime, optimisations off).

    With `mask_input` ([batch, sequence], 0 = padding), a tensor shaped [batch, sequence, K] keeps
    only the real positions."""
    from trtcal.export.evaluate import simulation_session
    from trtcal.model import with_extra_outputs

    session = simulation_session(with_extra_outputs(model, tensors))
    result: dict[str, npt.NDArray[np.float64]] = {}
    for feed in feeds:
        values = dict(zip(tensors, session.run(tensors, feed), strict=True))
        real = None if mask_input is None else np.asarray(feed[mask_input]) != 0
        for name in tensors:
            value = np.abs(np.asarray(values[name], dtype=np.float64))
            if real is not None and value.ndim == 3 and value.shape[:2] == real.shape:
                value = value[real]
            flat = value.reshape(-1, value.shape[-1])
            if not np.all(np.isfinite(flat)):
                raise ModelError(f"tensor {name!r} holds NaN/Inf values; it cannot be smoothed")
            m = flat.max(axis=0)
            result[name] = m if name not in result else np.maximum(result[name], m)
    return result


def smooth_model(
    model: onnx.ModelProto, feeds: Iterable[dict[str, npt.NDArray[Any]]], *, alpha: float = 0.5,
    mask_input: str | None = None,
) -> tuple[onnx.ModelProto, SmoothingReport]:
    """A smoothed copy of `model` (see the module docstring) and what was smoothed.

    `feeds`: the calibration data as ONNX Runtime feeds (input name -> array), in a fixed order."""
    from onnx import helper, numpy_helper

    out = model.__class__()
    out.CopyFrom(model)
    graph = out.graph
    groups = smoothing_groups(out)
    if not groups:
        return out, SmoothingReport(alpha=alpha, smoothed={})
    maxima = channel_amax(model, feeds, sorted(groups), mask_input)
    weights = {t.name: t for t in graph.initializer}
    readers = consumers(graph)
    new_initializers = []
    inserts: dict[str, Any] = {}
    smoothed: dict[str, tuple[str, ...]] = {}
    for x in sorted(groups):
        matmuls = [graph.node[i] for i in groups[x]]
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in matmuls]
        s = smoothing_scales(maxima[x], np.max([np.abs(w).max(axis=1) for w in arrays], axis=0), alpha)
        inverse = numpy_helper.from_array((np.float32(1.0) / s).astype(np.float32), f"{x}_smooth_inverse")
        new_initializers.append(inverse)
        inserts[x] = helper.make_node("Mul", [x, inverse.name], [f"{x}{SMOOTHED_SUFFIX}"], name=f"{x}_smooth")
        for node, w in zip(matmuls, arrays, strict=True):
            name = f"{node.input[1]}_smoothed_{node.name or x}"
            new_initializers.append(numpy_helper.from_array((w * s[:, None]).astype(np.float32), name))
            node.input[0], node.input[1] = f"{x}{SMOOTHED_SUFFIX}", name
        smoothed[x] = tuple(n.name for n in matmuls)
    nodes = []
    for node in graph.node:
        nodes.append(node)
        nodes.extend(inserts[o] for o in node.output if o in inserts)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used or t.name not in readers]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new_initializers])
    return out, SmoothingReport(alpha=alpha, smoothed=smoothed)
