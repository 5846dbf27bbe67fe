"""Export a stored TensorRT calibration cache for the TensorRT version (and calibrator) that will read it.

The retarget itself is `trtcal.core.cache_format.retarget_trt_cache` (one implementation); this
module keeps the name `trtcal.storage.retarget_trt_cache` that the store and users import.
"""

from __future__ import annotations

from trtcal.core.cache_format import retarget_trt_cache

__all__ = ["retarget_trt_cache"]
