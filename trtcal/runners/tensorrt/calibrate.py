"""`calibrate_with_tensorrt`: TensorRT 10 calibrates a model on a batch (one engine built and dropped);
the backend of `trtcal calibrate --backend tensorrt`."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

from trtcal.errors import (
    ModelError,
)
from trtcal.progress import NO_PROGRESS, ProgressCallback
from trtcal.runners.tensorrt.cache import CacheTarget, rewrite_cache_header
from trtcal.runners.tensorrt.calibrators import make_calibrator
from trtcal.runners.tensorrt.config import PartialBatchPolicy, ShapeSpec
from trtcal.runners.tensorrt.device_memory import DeviceMemory
from trtcal.runners.tensorrt.engine import build_engine
from trtcal.runners.tensorrt.feed import BatchSource

log = logging.getLogger(__name__)


def _default_cache_key(model_path: str | os.PathLike[str], batch_source: Any) -> str | None:
    fingerprint = getattr(batch_source, "fingerprint", None)
    if not isinstance(fingerprint, str) or not fingerprint:
        return None  # make_calibrator then asks for cache_key
    digest = hashlib.sha256()
    try:
        with open(model_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ModelError(f"cannot read ONNX model {model_path}: {exc}") from exc
    return f"model:sha256:{digest.hexdigest()}|batch:{fingerprint}"


def calibrate_with_tensorrt(
    model_path: str | os.PathLike[str],
    batch_source: BatchSource,
    *,
    algorithm: str,
    micro_batch: int | None,
    trt_version: str | int | None = None,
    cache: CacheTarget | None = None,
    cache_key: str | None = None,
    partial_batch: PartialBatchPolicy | None = None,
    quantile: float | None = None,
    regression_cutoff: float | None = None,
    input_shapes: Mapping[str, ShapeSpec] | None = None,
    calibrate_before_fusion: bool | None = None,
    workspace_bytes: int | None = None,
    device_memory: DeviceMemory | None = None,
    progress: ProgressCallback = NO_PROGRESS,
) -> bytes:
    """Let TensorRT 10 calibrate `model_path` on `batch_source`; return the cache it wrote.

    The backend of `trtcal calibrate --backend tensorrt` (run where the calibration actor has a
    GPU). TensorRT only calibrates while building an engine, so one engine is built and dropped.

    Args:
        trt_version: target TensorRT version for the returned cache's header; None keeps the
            installed version's header as TensorRT wrote it.
        cache, cache_key: where TensorRT's cache is kept (see make_calibrator). With a store and
            no `cache_key`, a CalibrationBatch's fingerprint and the model's sha256 make one.
        Others: see make_calibrator and build_engine.

    Raises:
        Everything make_calibrator and build_engine raise; ModelError if TensorRT wrote no cache.
    """
    if cache_key is None and cache is not None and not isinstance(cache, (str, os.PathLike)):
        cache_key = _default_cache_key(model_path, batch_source)
    with make_calibrator(
        algorithm,
        batch_source,
        cache=cache,
        cache_key=cache_key,
        micro_batch=micro_batch,
        partial_batch=partial_batch,
        quantile=quantile,
        regression_cutoff=regression_cutoff,
        device_memory=device_memory,
        progress=progress,
    ) as calibrator:
        build_engine(
            model_path,
            calibrator=calibrator,
            input_shapes=input_shapes,
            calibrate_before_fusion=calibrate_before_fusion,
            workspace_bytes=workspace_bytes,
        )
        data = calibrator.calibration_cache
    if data is None:
        raise ModelError(
            f"TensorRT built {model_path} without writing a calibration cache (no tensor of the network was calibrated)"
        )
    if trt_version is not None:
        from trtcal.core import trt_version_int

        data = rewrite_cache_header(data, trt_version=trt_version, algorithm=calibrator.config.algorithm)
        if trt_version_int(trt_version) != calibrator.trt_version:
            log.warning(
                "the cache was computed by TensorRT %s and relabelled for TensorRT %s; TensorRT versions may "
                "name or fuse tensors differently",
                calibrator.trt_version,
                trt_version,
            )
    return data
