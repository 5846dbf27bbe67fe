"""Export a stored TensorRT calibration cache for the TensorRT version (and calibrator) that will read it."""

from __future__ import annotations

from trtcal.errors import CacheFormatError, ConfigError

__all__ = ["retarget_trt_cache"]


def retarget_trt_cache(data: bytes, *, trt_version: str | int | tuple[int, ...], algorithm: str | None = None) -> bytes:
    """A TensorRT calibration cache with its header set for another TensorRT version (and calibrator).

    Scales keep their exact bits (re-deriving them from amax would move ~3% of them by one ulp).
    `algorithm` is a trtcal method or a TensorRT header name; None keeps the cache's own.
    """
    from trtcal.core.cache_format import header_algorithm, read_trt_cache, scale_to_hex, trt_version_int

    cache = read_trt_cache(data)
    if algorithm is None:
        if cache.algorithm is None:
            raise ConfigError("the stored cache has the legacy '1' header with no calibrator name; pass algorithm=")
        algorithm = cache.algorithm
        try:
            header = header_algorithm(algorithm)
        except ConfigError:  # the name came from the stored file, not from the caller
            raise CacheFormatError(f"the stored cache names an unknown calibrator {algorithm!r} in its header") from None
    else:
        header = header_algorithm(algorithm)
    lines = [f"TRT-{trt_version_int(trt_version)}-{header}"]
    lines.extend(f"{name}: {scale_to_hex(scale)}" for name, scale in cache.scale.items())
    return ("\n".join(lines) + "\n").encode("utf-8")
