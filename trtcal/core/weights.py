"""Per-output-channel weight scales, as TensorRT quantizes weights: s_k = max|W_k| / 127."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from trtcal.errors import ConfigError

__all__ = ["weight_axis", "per_channel_amax", "per_channel_scales", "SAFE_SCALE"]

# A channel that is all zeros (or whose scale underflows) still needs a strictly positive scale:
# any positive value quantizes zeros exactly; 1.0 is what ModelOpt's exporter uses too.
SAFE_SCALE = np.float32(1.0)


def weight_axis(op_type: str, *, trans_b: bool = False) -> int:
    """The output-channel axis of a weight tensor for TensorRT (docs/algorithms.md, Q/DQ rules)."""
    if op_type == "Conv":
        return 0  # [Cout, Cin/g, k...]
    if op_type == "ConvTranspose":
        return 1  # [Cin, Cout/g, k...]
    if op_type == "MatMul":
        return 1  # B is [K, N]: one scale per output column
    if op_type == "Gemm":
        return 0 if trans_b else 1
    raise ConfigError(f"no weight-quantization axis rule for op type {op_type!r} (Conv, ConvTranspose, MatMul, Gemm)")


def per_channel_amax(weight: npt.ArrayLike, axis: int) -> npt.NDArray[np.float32]:
    """max |W| over every axis but `axis` (float32)."""
    w = np.asarray(weight)
    if w.ndim == 0:
        raise ConfigError("weight must have at least one dimension")
    if not -w.ndim <= axis < w.ndim:
        raise ConfigError(f"axis {axis} out of range for weight of shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ConfigError("weight holds NaN or Inf values; the model itself is broken")
    moved = np.moveaxis(np.abs(w.astype(np.float32, copy=False)), axis, 0)
    result: npt.NDArray[np.float32] = moved.reshape(moved.shape[0], -1).max(axis=1).astype(np.float32)
    return result


def per_channel_scales(weight: npt.ArrayLike, axis: int) -> npt.NDArray[np.float32]:
    """Strictly positive float32 scales, one per channel along `axis`."""
    amax = per_channel_amax(weight, axis)
    scales = (amax / np.float32(127.0)).astype(np.float32)
    safe: npt.NDArray[np.float32] = np.where(scales >= np.finfo(np.float32).tiny, scales, SAFE_SCALE).astype(np.float32)
    return safe
