"""Calibration statistics and scales -> the bytes of trtcal's output files (nothing touches a disk here).

* ``calibration.<method>.cache`` per method (TensorRT text cache) and ``calibration.cache``
  (the same bytes as the first method's);
* ``ranges.json``: per tensor the final amax per method, observed min/max/amax, value and
  NaN/Inf counts, a histogram summary and its row in ``histograms.npy``;
* ``histograms.npy``: the full int64 counts, shape ``[num_tensors, num_bins]``, rows in
  ``ranges.json["histogram_tensors"]`` order, bins over ``[0, hist_amax]`` of each tensor (a plain
  .npy: its bytes are deterministic, unlike an .npz whose zip entries carry timestamps);
* ``manifest.json``: the inputs' identities (model sha256, batch fingerprint and spec), config,
  runner kind and version, trtcal version, timings per stage, sha256 and size of every artifact.

Every file but ``manifest.json`` is byte-identical for the same model, batch, config and runner;
``manifest.json`` differs only in ``timings_s``. JSON is `artifact_json`: sorted keys, one-space
indent, floats as Python's shortest round-trip repr, non-finite values refused (written as null).
(Cache keys use `trtcal.storage.keys.canonical_json`, a different, compact encoding: the two must
not be merged, or every stored key and every golden file would change.)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal._version import FORMAT_VERSION, __version__
from trtcal.core.cache_format import write_trt_cache
from trtcal.core.histogram import Histogram, TensorStats

if TYPE_CHECKING:
    from trtcal.config import CalibrationConfig

__all__ = [
    "MANIFEST", "RANGES", "HISTOGRAMS", "DEFAULT_CACHE", "ARTIFACT_NAMES", "OWNED_BY", "cache_name", "is_artifact_name", "artifact_json",
    "histogram_summary", "build_ranges", "encode_artifacts", "build_manifest",
]

MANIFEST = "manifest.json"
RANGES = "ranges.json"
HISTOGRAMS = "histograms.npy"
DEFAULT_CACHE = "calibration.cache"
ARTIFACT_NAMES = (MANIFEST, RANGES, HISTOGRAMS, DEFAULT_CACHE)
# A non-empty directory holding one of these is an earlier trtcal output, which may be replaced
# (`calibrate(output_dir=…)` writes both; `trtcal calibrate --backend tensorrt -o` only the cache).
OWNED_BY = (MANIFEST, DEFAULT_CACHE)


def is_artifact_name(name: str) -> bool:
    """Whether `name` is a file trtcal writes into an output folder (the only names it replaces or removes)."""
    if name in (*ARTIFACT_NAMES, "model.qdq.onnx", "model.smoothed.onnx", "entry.json"):
        return True
    return name.startswith("calibration.") and name.endswith(".cache") and name.count(".") == 2 and len(name) > len("calibration..cache")


def cache_name(method: str) -> str:
    return f"calibration.{method}.cache"


def artifact_json(obj: Any) -> bytes:
    """Sorted keys, fixed separators, UTF-8, trailing newline; NaN/Inf refused (use None)."""
    return (json.dumps(obj, sort_keys=True, separators=(",", ": "), indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode(
        "utf-8"
    )


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def histogram_summary(hist: Histogram, row: int) -> dict[str, Any]:
    nonzero = np.flatnonzero(hist.counts)
    return {
        "row": row,
        "num_bins": hist.num_bins,
        "hist_amax": float(hist.hist_amax),
        "total": int(hist.counts.sum()),
        "nonzero_bins": int(nonzero.size),
        "first_nonzero_bin": int(nonzero[0]) if nonzero.size else None,
        "last_nonzero_bin": int(nonzero[-1]) if nonzero.size else None,
        "zero_bin_count": int(hist.counts[0]) if hist.num_bins else 0,
    }


def _npy_bytes(array: npt.NDArray[Any]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def build_ranges(
    tensor_names: Sequence[str],
    stats: Mapping[str, TensorStats],
    histograms: Mapping[str, Histogram],
    amax: Mapping[str, Mapping[str, float]],
    sources: Mapping[str, Mapping[str, str]],
    config: CalibrationConfig,
) -> dict[str, Any]:
    """The content of ranges.json."""
    hist_rows = [n for n in tensor_names if n in histograms]
    tensors: dict[str, Any] = {}
    order = list(tensor_names) + [n for n in config.manual_ranges if n not in stats]
    for name in order:
        entry: dict[str, Any] = {
            "amax": {m: amax[m][name] for m in config.algorithms},
            "source": {m: sources[m][name] for m in config.algorithms},
        }
        if name in stats:
            s = stats[name]
            entry.update(
                observed_amax=float(s.amax),
                min=_finite_or_none(s.min),
                max=_finite_or_none(s.max),
                count=int(s.count),
                nan_count=int(s.nan_count),
                inf_count=int(s.inf_count),
            )
        if name in histograms:
            entry["histogram"] = histogram_summary(histograms[name], hist_rows.index(name))
        tensors[name] = entry
    return {
        "format_version": FORMAT_VERSION,
        "algorithms": list(config.algorithms),
        "num_bins": config.num_bins,
        "tensor_order": order,
        "histogram_file": HISTOGRAMS if hist_rows else None,
        "histogram_tensors": hist_rows,
        "tensors": tensors,
    }


def encode_artifacts(
    tensor_names: Sequence[str],
    stats: Mapping[str, TensorStats],
    histograms: Mapping[str, Histogram],
    amax: Mapping[str, Mapping[str, float]],
    sources: Mapping[str, Mapping[str, str]],
    config: CalibrationConfig,
    auto: Any = None,
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(method -> cache bytes, file name -> bytes of every artifact but the manifest).

    `auto` (a `trtcal.export.auto_calibration.AutoOutcome` with a search) adds per tensor the "auto"
    entry (chosen candidate, each candidate's score and amax) and the top-level "auto_search" record.
    """
    caches = {m: write_trt_cache(amax[m], trt_version=config.trt_version, algorithm=m) for m in config.algorithms}
    ranges = build_ranges(tensor_names, stats, histograms, amax, sources, config)
    if auto is not None and auto.search is not None:
        for name, entry in auto.tensors.items():
            ranges["tensors"][name]["auto"] = entry
        ranges["auto_search"] = auto.search
    files: dict[str, bytes] = {cache_name(m): caches[m] for m in config.algorithms}
    files[DEFAULT_CACHE] = caches[config.algorithms[0]]
    files[RANGES] = artifact_json(ranges)
    if histograms:
        files[HISTOGRAMS] = _npy_bytes(np.stack([histograms[n].counts for n in ranges["histogram_tensors"]]))
    return caches, files


def build_manifest(
    *, model_sha256: str, model_source: str, batch: Any, config: CalibrationConfig, runner: Mapping[str, Any],
    num_tensors: int, files: Mapping[str, bytes], verdict: Mapping[str, Any] | None = None,
    smoothing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of manifest.json, without ``timings_s`` (the caller adds it last).

    ``smoothing`` (only when the model was smoothed): alpha, the smoothed tensors, and the smoothed
    model (model.smoothed.onnx) and its sha256: the caches and the Q/DQ model are of that model."""
    manifest = {
        "trtcal_version": __version__,
        "format_version": FORMAT_VERSION,
        "model": {"sha256": model_sha256, "source": os.path.basename(model_source)},
        "batch": {
            "fingerprint": batch.fingerprint,
            "num_rows": batch.num_rows,
            "row_range": list(batch.row_range),
            "spec": dict(batch.spec),
            "inputs": [info.to_dict() for info in batch.inputs.values()],
        },
        "config": config.to_dict(),
        "runner": dict(runner),
        "tensors": num_tensors,
        "default_cache": cache_name(config.algorithms[0]),
        "verdict": verdict,
        "artifacts": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in sorted(files.items())
        },
    }
    if smoothing is not None:
        manifest["smoothing"] = dict(smoothing)
    return manifest
