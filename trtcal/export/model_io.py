"""Q/DQ export helpers: activation scales from amax, and loading/saving models as deterministic bytes."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trtcal._io import write_atomic
from trtcal.core.weights import SAFE_SCALE
from trtcal.errors import ConfigError, InternalError, ModelError

if TYPE_CHECKING:
    import onnx

__all__ = [
    "ModelLike", "activation_scales", "check_full", "check_range_coverage", "checked_scales", "load_model", "model_tensor_names",
    "serialize_model", "write_bytes_atomic", "save_model",
]

ModelLike = Any  # onnx.ModelProto | str | os.PathLike | bytes

log = logging.getLogger("trtcal.export.qdq")


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


def checked_scales(scale_by_tensor: Mapping[str, float], model_tensors: frozenset[str] | None = None) -> dict[str, float]:
    """The scales as float32 values; a zero, denormal, negative or non-finite scale of a tensor the
    model has (every tensor when `model_tensors` is None) is a ConfigError: it used to become 1.0
    without a word. `activation_scales` already maps an amax of 0 to SAFE_SCALE, so only foreign
    tables (a TensorRT cache) get here with one."""
    tiny = np.finfo(np.float32).tiny
    out: dict[str, float] = {}
    bad: list[str] = []
    for name, scale in scale_by_tensor.items():
        try:
            value = float(np.float32(scale))
        except (TypeError, ValueError):
            raise ConfigError(f"scale of tensor {name!r} must be a number, got {scale!r}") from None
        if not (np.isfinite(value) and value >= tiny):
            if model_tensors is None or name in model_tensors:
                bad.append(f"{name!r}: {scale!r}")
            continue  # a tensor the model lacks is never used (and counted in the coverage check)
        out[name] = value
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConfigError(
            f"{len(bad)} tensor(s) have a scale that is zero, denormal (< {tiny:.3g}), negative or not finite: {shown}. "
            "No usable INT8 range follows from it; recalibrate, or keep the layers reading them float with --exclude"
        )
    return out


def model_tensor_names(model: onnx.ModelProto) -> frozenset[str]:
    graph = model.graph
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    names.discard("")
    return frozenset(names)


def check_range_coverage(
    covered: int, needed: int, scale_by_tensor: Mapping[str, Any], model_tensors: frozenset[str], min_coverage: float
) -> None:
    """ConfigError when the ranges do not belong to this model: none of their tensors is in it, or
    they cover fewer than `min_coverage` of the `needed` activations the Q/DQ placement wants."""
    given = len(scale_by_tensor)
    in_model = sum(1 for name in scale_by_tensor if name in model_tensors)
    counts = (
        f"the ranges name {given} tensor(s), {in_model} of them in this model; they cover {covered} of the "
        f"{needed} activation tensor(s) the Q/DQ placement needs"
    )
    if given and not in_model:
        raise ConfigError(f"{counts}. Is this the calibration of another model?")
    if needed and covered < min_coverage * needed:
        raise ConfigError(
            f"{counts} (at least {min_coverage:.0%} required). Is this the calibration of another model? "
            "Pass --allow-missing-ranges to export anyway (the layers without a range stay float)"
        )


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


write_bytes_atomic = write_atomic  # the export API's name for trtcal._io.write_atomic


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write a model's deterministic bytes atomically."""
    return write_bytes_atomic(path, serialize_model(model))


def check_full(qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> None:
    """`onnx.checker.check_model(full_check=True)` on the Q/DQ model (types and shapes included).

    Raises:
        ModelError: the FP32 model fails the same check (the export cannot repair it).
        InternalError: only the Q/DQ model fails it (a bug in the export).
    """
    import onnx

    if qdq.ByteSize() >= onnx.checker.MAXIMUM_PROTOBUF:
        log.info("the Q/DQ model is over 2 GiB; onnx.checker cannot check it in memory")
        return
    try:
        onnx.checker.check_model(qdq, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        try:
            onnx.checker.check_model(fp32, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as fp32_exc:
            raise ModelError(
                f"the FP32 model fails onnx.checker.check_model(full_check=True) ({fp32_exc}); no valid Q/DQ "
                "model can be written from it. Fix the model (e.g. re-export it) first"
            ) from None
        raise InternalError(f"the Q/DQ model fails onnx.checker (full check): {exc}") from exc
