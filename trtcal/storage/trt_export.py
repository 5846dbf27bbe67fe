"""Export a stored TensorRT calibration cache for the TensorRT version (and calibrator) that will read it.

The retarget itself is `trtcal.core.cache_format.retarget_trt_cache` (one implementation); this
module keeps the name `trtcal.storage.retarget_trt_cache` that the store and users import. It only
renames the calibrator in the header: choosing WHICH method's scales an entry exports is
`select_method_artifact`'s job (CacheStore.export_trt_cache does both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from trtcal.core.cache_format import retarget_trt_cache
from trtcal.errors import ConfigError

__all__ = ["DEFAULT_CACHE_ARTIFACT", "method_artifacts", "retarget_trt_cache", "select_method_artifact"]

DEFAULT_CACHE_ARTIFACT = "calibration.cache"
_PREFIX, _SUFFIX = "calibration.", ".cache"


def method_artifacts(names: Iterable[str], key_inputs: Mapping[str, Any], default_header: Callable[[], str | None]) -> dict[str, str]:
    """method -> the artifact holding that method's scales, for an entry with artifacts `names`.

    `calibration.<method>.cache` holds <method>'s scales. `calibration.cache` holds the first
    method recorded in the key inputs (`"algorithm": "entropy2+minmax"`); an entry that records
    none (published by hand) is taken at its header's word: the canonical method of the calibrator
    it names (`default_header()` reads it only when needed).
    """
    from trtcal.core.cache_format import ALGORITHM_HEADERS

    names = set(names)
    out: dict[str, str] = {}
    for name in sorted(names):
        method = name[len(_PREFIX) : -len(_SUFFIX)] if name.startswith(_PREFIX) and name.endswith(_SUFFIX) else ""
        if method in ALGORITHM_HEADERS:
            out[method] = name
    if DEFAULT_CACHE_ARTIFACT in names:
        recorded = str(key_inputs.get("algorithm") or "").split("+")[0]
        if recorded not in ALGORITHM_HEADERS:
            header = default_header()
            # First method per header: EntropyCalibration2 -> entropy2 (not percentile or mse).
            recorded = next((m for m, h in ALGORITHM_HEADERS.items() if h == header), "")
        if recorded:
            out.setdefault(recorded, DEFAULT_CACHE_ARTIFACT)
    return out


def select_method_artifact(method: str, available: Mapping[str, str], *, entry: str, names: Iterable[str]) -> tuple[str, str]:
    """(method, artifact) for `--method METHOD` (a trtcal method or a TensorRT header name).

    Raises ConfigError naming the methods the entry has when it has no scales for `method`
    (before: the first method's scales were exported under `method`'s header).
    """
    from trtcal.core.cache_format import ALGORITHM_HEADERS, header_algorithm

    header_algorithm(method)  # an unknown name is a ConfigError listing the valid ones
    if method in ALGORITHM_HEADERS:
        candidates = [method] if method in available else []
    else:  # a header name: the entry's method whose calibrator that is, if exactly one
        candidates = [m for m in sorted(available) if ALGORITHM_HEADERS[m] == method]
        if len(candidates) > 1:
            raise ConfigError(
                f"cache entry {entry} holds scales of {candidates}, all served as {method}; pass one of those methods to --method"
            )
    if not candidates:
        has = ", ".join(sorted(available)) or "none"
        raise ConfigError(
            f"cache entry {entry} has no {method} scales: it holds scales of method(s) {has} "
            f"(artifacts: {', '.join(sorted(names))}). Export one of those, or calibrate again with --algorithm {method}"
        )
    return candidates[0], available[candidates[0]]
