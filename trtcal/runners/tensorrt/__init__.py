"""TensorRT 10 adapter: live INT8 calibrators fed from trtcal's calibration batch, cache replay,
and INT8 engine builds (the `tensorrt` extra; TensorRT and cuda-python are imported lazily).

What lives here, in the order TensorRT meets it:

* `make_calibrator(algorithm, batch_source, ...)` returns an `ArrowBatchCalibrator` that is also a
  subclass of TensorRT's `IInt8EntropyCalibrator2`, `IInt8MinMaxCalibrator`,
  `IInt8EntropyCalibrator` or `IInt8LegacyCalibrator` (chosen by `algorithm`). `get_batch(names)`
  serves the batch in micro-batches through device buffers allocated once, returns their
  addresses in the order of `names`, and `None` at the end, when the buffers are freed.
* `make_replay_calibrator(cache, ...)` returns a `CacheReplayCalibrator`: it hands TensorRT a
  trtcal-computed cache whose header is rewritten for the installed TensorRT and the calibrator's
  algorithm, so TensorRT uses trtcal's scales and never asks for data.
* `build_engine(model, cache=... | calibrator=..., ...)` parses the ONNX model, sets
  `BuilderFlag.INT8`, the calibration profile, manual dynamic ranges and
  `QuantizationFlag.CALIBRATE_BEFORE_FUSION`, and returns the serialized engine.
* `calibrate_with_tensorrt(model, batch_source, ...)` is the entry point for
  `trtcal calibrate --backend tensorrt`: it returns the cache TensorRT wrote.

TensorRT swallows exceptions raised inside calibrator methods (it prints them and goes on). Every
method TensorRT calls is therefore trapped here: the exception is logged with its context, kept
on the calibrator, and `build_engine` raises it once TensorRT returns.

The package, by module: `version` (load_tensorrt, check_tensorrt_version), `config`
(CalibratorConfig, EngineBuildConfig), `feed` (iter_micro_batches over any batch source),
`device_memory` (cuda-python / pycuda buffers), `cache` (header rewriting, cache keys, file and
store bindings), `calibrators` (the calibrator classes and their factories), `engine`
(build_engine, resolve_profile_shapes), `calibrate` (calibrate_with_tensorrt).

TensorRT 11 removed implicit calibration (and `BuilderFlag.INT8`, `set_dynamic_range`, the
quantization flags); `load_tensorrt` turns that into a clear error pointing at the Q/DQ export.
"""

from trtcal.runners.tensorrt.cache import BytesStore, CacheTarget, rewrite_cache_header, tensorrt_cache_key
from trtcal.runners.tensorrt.calibrate import calibrate_with_tensorrt
from trtcal.runners.tensorrt.calibrators import (
    ArrowBatchCalibrator,
    CacheReplayCalibrator,
    make_calibrator,
    make_replay_calibrator,
)
from trtcal.runners.tensorrt.config import ALGORITHM_BASE_CLASSES, CalibratorConfig, EngineBuildConfig
from trtcal.runners.tensorrt.device_memory import (
    CudaRuntimeMemory,
    DeviceBatchBuffers,
    DeviceMemory,
    PyCudaMemory,
    load_device_memory,
)
from trtcal.runners.tensorrt.engine import build_engine, resolve_profile_shapes
from trtcal.runners.tensorrt.feed import STAGE, BatchSource, iter_micro_batches
from trtcal.runners.tensorrt.version import INSTALL_HINT, check_tensorrt_version, load_tensorrt

__all__ = [
    "ALGORITHM_BASE_CLASSES",
    "INSTALL_HINT",
    "STAGE",
    "ArrowBatchCalibrator",
    "BatchSource",
    "BytesStore",
    "CacheReplayCalibrator",
    "CacheTarget",
    "CalibratorConfig",
    "CudaRuntimeMemory",
    "DeviceBatchBuffers",
    "DeviceMemory",
    "EngineBuildConfig",
    "PyCudaMemory",
    "build_engine",
    "calibrate_with_tensorrt",
    "check_tensorrt_version",
    "iter_micro_batches",
    "load_device_memory",
    "load_tensorrt",
    "make_calibrator",
    "make_replay_calibrator",
    "resolve_profile_shapes",
    "rewrite_cache_header",
    "tensorrt_cache_key",
]
