"""Range tables: manual overrides (TensorRT's rule) and INT8 input validation."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import numpy.typing as npt

from trtcal.errors import ConfigError, DataError

__all__ = ["apply_manual_ranges", "check_manual_range_names", "validate_int8_input"]


def apply_manual_ranges(calibrated: Mapping[str, float], manual: Mapping[str, float]) -> dict[str, float]:
    """Calibrated amax per tensor with user-set ranges overriding them (as TensorRT lets setDynamicRange win).

    Tensors only in `manual` are added; the calibrated order is kept, additions follow in `manual`'s order.
    """
    out = dict(calibrated)
    for name, amax in manual.items():
        value = float(amax)
        if not (np.isfinite(value) and value > 0.0):
            raise ConfigError(f"manual range for tensor {name!r} must be a finite amax > 0, got {amax!r}")
        out[name] = value
    return out


def check_manual_range_names(manual: Mapping[str, float], model_tensors: Collection[str], *, model: str = "the model") -> None:
    """ConfigError naming every manual range whose tensor the model does not have (with near names):
    such a range used to be accepted and written to the cache, where TensorRT ignores it."""
    import difflib

    unknown = [name for name in manual if name not in model_tensors]
    if not unknown:
        return
    hints = []
    for name in unknown[:5]:
        close = difflib.get_close_matches(name, list(model_tensors), n=3)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise ConfigError(
        f"manual ranges name {len(unknown)} tensor(s) that {model} does not have: {', '.join(hints)}{more}. "
        "Give the names of its tensors (a node output or a graph input)"
    )


def validate_int8_input(data: npt.ArrayLike, *, tensor: str) -> None:
    """Calibration data for an INT8 network input is FP32 that must lie in [-128, 127] (TensorRT rule)."""
    arr = np.asarray(data)
    if arr.size == 0:
        return
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -128.0 or hi > 127.0:
        raise DataError(
            f"input {tensor!r} is declared INT8 but its calibration data spans [{lo}, {hi}]; "
            "INT8 inputs must be given as float values in [-128, 127]"
        )
