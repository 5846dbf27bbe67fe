"""trtcal: cluster-scale, deterministic INT8 calibration for TensorRT.

Public API (stable names):
    trtcal.calibrate(model, batch, ...)          -> CalibrationResult   (runner + artifacts)
    trtcal.calibrate_dataset(model, data, ...)   -> DatasetResult       (Ray preprocessing + actor + store)
    trtcal.config: CalibrationConfig, BatchConfig, JobConfig             (every default, validated once)
    trtcal.core.compute_amax / write_trt_cache / read_trt_cache
    trtcal.storage.CacheStore(url, **storage_options)
Heavy dependencies (onnxruntime, pyarrow, ray, fsspec, tensorrt) are imported lazily.
"""

from __future__ import annotations

from typing import Any

from trtcal import errors
from trtcal._version import __version__

__all__ = ["__version__", "errors", "calibrate", "calibrate_dataset"]


def __getattr__(name: str) -> Any:
    # Lazy: `import trtcal` must stay cheap and must not import onnxruntime/pyarrow.
    if name == "calibrate":
        from trtcal.orchestrator.calibrate import calibrate

        return calibrate
    if name == "calibrate_dataset":
        from trtcal.orchestrator.job import calibrate_dataset

        return calibrate_dataset
    raise AttributeError(f"module 'trtcal' has no attribute {name!r}")
