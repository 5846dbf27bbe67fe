"""`calibrate_with_tensorrt`: TensorRT 10 calibrates a model on a batch (one engine built and dropped);
the backend of `trtcal calibrate --backend tensorrt`."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

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


def bytes_per_sample(model_path: str | os.PathLike[str]) -> int:
    """Bytes of every float tensor (inputs and node outputs) for one sample, from ONNX shape inference.

    TensorRT's calibration engine marks every tensor as an output, so this is what one more sample
    in a calibration batch costs on the GPU. Axis 0 is the batch; unknown dimensions count as 1.
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    total = 0
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        if value.name in initializers or tensor_type.elem_type != onnx.TensorProto.FLOAT:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim[1:]]
        total += 4 * int(np.prod(dims, dtype=np.int64))
    return total


def single_batch_plan(num_rows: int, sample_bytes: int, free_bytes: int | None) -> tuple[int, int]:
    """(micro_batch, dropped): TensorRT's advice is one calibration batch of all `num_rows` samples.

    That batch must fit in half the free GPU memory (the rest is TensorRT's workspace and
    engine). When it does not, the largest batch that fits is used: an exact divisor of
    `num_rows` when one is at least half that size, else the largest batch with the remainder
    dropped (TensorRT reads every batch at one shape).
    """
    if free_bytes is None or sample_bytes <= 0:
        return num_rows, 0
    limit = max(1, (free_bytes // 2) // sample_bytes)
    if num_rows <= limit:
        return num_rows, 0
    divisor = max(d for d in range(1, limit + 1) if num_rows % d == 0)
    if 2 * divisor >= limit:
        return divisor, 0
    return limit, num_rows % limit


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
