"""trtcal.core: the numeric calibration core. Imports numpy only (a test enforces it).

Public API (stable):
    compute_amax(counts, hist_amax, method, **params) -> float
    write_trt_cache(amax_by_tensor, *, trt_version, algorithm) -> bytes
    read_trt_cache(data) -> TrtCache (.version, .algorithm, .scale, .amax)
    reduce_stats / fill_counts / histogram_of / merge_histograms / GrowingHistogram
    weight_axis / per_channel_scales
    apply_manual_ranges / validate_int8_input
"""

from trtcal.core.cache_format import (
    ALGORITHM_HEADERS,
    TrtCache,
    header_algorithm,
    read_trt_cache,
    trt_version_int,
    write_trt_cache,
)
from trtcal.core.histogram import (
    DEFAULT_NUM_BINS,
    GrowingHistogram,
    Histogram,
    TensorStats,
    fill_counts,
    histogram_of,
    merge_histograms,
    merge_stats,
    reduce_stats,
)
from trtcal.core.ranges import apply_manual_ranges, validate_int8_input
from trtcal.core.scales import METHODS, compute_amax
from trtcal.core.weights import per_channel_amax, per_channel_scales, weight_axis

__all__ = [
    "ALGORITHM_HEADERS",
    "DEFAULT_NUM_BINS",
    "METHODS",
    "GrowingHistogram",
    "Histogram",
    "TensorStats",
    "TrtCache",
    "apply_manual_ranges",
    "compute_amax",
    "fill_counts",
    "header_algorithm",
    "histogram_of",
    "merge_histograms",
    "merge_stats",
    "per_channel_amax",
    "per_channel_scales",
    "read_trt_cache",
    "reduce_stats",
    "trt_version_int",
    "validate_int8_input",
    "weight_axis",
    "write_trt_cache",
]
