"""Q/DQ export helpers: activation scales from amax, and loading/saving models as deterministic bytes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trtcal.core.weights import SAFE_SCALE
from trtcal.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import onnx

__all__ = ["ModelLike", "activation_scales", "checked_scales", "load_model", "serialize_model", "write_bytes_atomic", "save_model"]

ModelLike = Any  # onnx.ModelProto | str | os.PathLike | bytes


# ---------------------------------------------------------------------------------------------
# Scales


def activation_scales(amax_by_tensor: Mapping[str, float]) -> dict[str, float]:
    """Per-tensor Q/DQ scales float32(float32(amax) / 127), as TensorRT's cache stores them.

    An amax of 0 (a tensor that is always zero) gets scale 1.0: any positive scale quantizes zeros
    exactly, and TensorRT refuses a zero scale. Negative or non-finite amax raise ConfigError.
    """
    scales: dict[str, float] = {}
    tiny = np.finfo(np.float32).tiny
    for name, amax in amax_by_tensor.items():
        try:
            value = float(amax)
        except (TypeError, ValueError):
            raise ConfigError(f"amax of tensor {name!r} must be a number, got {amax!r}") from None
        if not (np.isfinite(value) and value >= 0.0):
            raise ConfigError(f"amax of tensor {name!r} must be finite and >= 0, got {amax!r}")
        scale = np.float32(np.float32(value) / np.float32(127.0))
        scales[name] = float(scale) if scale >= tiny else float(SAFE_SCALE)
    return scales


def checked_scales(scale_by_tensor: Mapping[str, float]) -> dict[str, float]:
    tiny = np.finfo(np.float32).tiny
    out: dict[str, float] = {}
    for name, scale in scale_by_tensor.items():
        value = float(np.float32(scale))
        if not (np.isfinite(value) and value >= 0.0):
            raise ConfigError(f"scale of tensor {name!r} must be finite and > 0, got {scale!r}")
        out[name] = value if value >= tiny else float(SAFE_SCALE)
    return out


# ---------------------------------------------------------------------------------------------
# Loading and saving


def load_model(model: ModelLike) -> onnx.ModelProto:
    """A private copy of `model` (a ModelProto, a path or serialized bytes)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    if isinstance(model, (bytes, bytearray, memoryview)):
        try:
            return onnx.load_from_string(bytes(model))
        except Exception as exc:  # protobuf raises DecodeError and others
            raise ModelError(f"cannot parse the ONNX model bytes: {exc}") from None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"ONNX model {str(path)!r} does not exist")
        try:
            return onnx.load(str(path))
        except Exception as exc:
            raise ModelError(f"cannot load ONNX model {str(path)!r}: {exc}") from None
    raise ModelError(f"model must be an onnx.ModelProto, a path or bytes, got {type(model).__name__}")


def serialize_model(model: onnx.ModelProto) -> bytes:
    """Deterministic bytes of a model (same model, same bytes)."""
    data: bytes = model.SerializeToString(deterministic=True)
    return data


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write a file so that readers see the old file or the whole new one, never a part of it.

    A temporary file in the target directory, fsync, then rename over the target.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write a model's deterministic bytes atomically."""
    return write_bytes_atomic(path, serialize_model(model))
