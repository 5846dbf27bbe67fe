"""Calibration configuration: the one place where calibration defaults live."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from trtcal.core.cache_format import trt_version_int
from trtcal.core.histogram import DEFAULT_NUM_BINS
from trtcal.core.scales import METHODS, compute_amax
from trtcal.errors import ConfigError

__all__ = ["CalibrationConfig", "MAX_NUM_BINS"]

MAX_NUM_BINS = 1 << 20  # far beyond any use; keeps a typo from allocating gigabytes per tensor
TENSOR_SELECTIONS = ("all", "quantizable")
NONFINITE_POLICIES = ("error", "ignore")


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """How to calibrate. Validated on construction (ConfigError names the field).

    Attributes:
        algorithms: scale-search methods (keys of `trtcal.core.METHODS`); all are computed from the
            same histograms; the first one also becomes ``calibration.cache``.
        trt_version: TensorRT version whose header the caches carry, e.g. "10.16.1".
        micro_batch: samples per ONNX Runtime run (memory grows with it, not with the batch size).
        num_bins: histogram bins on [0, max |x|] per tensor.
        method_params: per-method parameters, e.g. ``{"percentile": {"percentile": 99.99}}``.
        tensors: "all" floating activations, "quantizable" op inputs, or a tuple of tensor names.
        nonfinite: "error" raises NonFiniteError naming the tensor; "ignore" skips NaN/Inf values
            (they are counted in ranges.json).
        manual_ranges: tensor -> amax that overrides (or adds to) the calibrated value.
        device: "cpu", or "cuda"/"cuda:N": ONNX Runtime's CUDA provider when onnxruntime-gpu is
            installed, else the PyTorch runner (statistics on the GPU) when torch sees CUDA.
        processes: CPU processes that collect the statistics, each on a contiguous slice of the
            batch, merged exactly (the artifacts are the bytes of one worker; tested). 1: in this
            process. 0: one per 2 cores, at most 8. Needs a local .arrow/.npy batch file (other
            batches are collected in this process). Not part of any cache key.
    """

    algorithms: tuple[str, ...] = ("entropy2",)
    trt_version: str = "10.16.1"
    micro_batch: int = 32
    num_bins: int = DEFAULT_NUM_BINS
    method_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tensors: str | tuple[str, ...] = "all"
    nonfinite: str = "error"
    manual_ranges: Mapping[str, float] = field(default_factory=dict)
    device: str = "cpu"
    processes: int = 1

    def __post_init__(self) -> None:
        algorithms = (self.algorithms,) if isinstance(self.algorithms, str) else tuple(self.algorithms)
        if not algorithms:
            raise ConfigError("algorithms: give at least one method")
        unknown = [a for a in algorithms if a not in METHODS]
        if unknown:
            raise ConfigError(f"algorithms: unknown method(s) {unknown}; choose from {sorted(METHODS)}")
        if len(set(algorithms)) != len(algorithms):
            raise ConfigError(f"algorithms: {list(algorithms)} names a method twice")
        object.__setattr__(self, "algorithms", algorithms)

        if not isinstance(self.trt_version, str):
            raise ConfigError(f"trt_version must be a string like '10.16.1', got {self.trt_version!r}")
        try:
            trt_version_int(self.trt_version)
        except ConfigError as exc:
            raise ConfigError(f"trt_version: {exc}") from None

        for name, low in (("micro_batch", 1), ("num_bins", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.num_bins > MAX_NUM_BINS:
            raise ConfigError(f"num_bins must be <= {MAX_NUM_BINS}, got {self.num_bins}")

        params = {str(k): dict(v) for k, v in dict(self.method_params).items()}
        for method, kwargs in params.items():
            if method not in algorithms:
                raise ConfigError(f"method_params: {method!r} is not one of the requested algorithms {list(algorithms)}")
            # Validate the names and values now, on a one-bin histogram, rather than after collection.
            try:
                compute_amax([1] * min(self.num_bins, 256), 1.0, method, **kwargs)
            except ConfigError as exc:
                raise ConfigError(f"method_params[{method!r}]: {exc}") from None
        object.__setattr__(self, "method_params", copy.deepcopy(params))

        if isinstance(self.tensors, str):
            if self.tensors not in TENSOR_SELECTIONS:
                raise ConfigError(f"tensors must be one of {TENSOR_SELECTIONS} or a list of tensor names, got {self.tensors!r}")
        else:
            names = tuple(self.tensors)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"tensors: a list of tensor names must be non-empty strings, got {names!r}")
            object.__setattr__(self, "tensors", names)

        if self.nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")

        manual = {}
        for name, amax in dict(self.manual_ranges).items():
            try:
                value = float(amax)
            except (TypeError, ValueError):
                value = math.nan
            if not isinstance(name, str) or not name or not (math.isfinite(value) and value > 0.0):
                raise ConfigError(f"manual_ranges: tensor {name!r} needs a finite amax > 0, got {amax!r}")
            manual[name] = value
        object.__setattr__(self, "manual_ranges", manual)

        if not isinstance(self.device, str) or not (
            self.device in ("cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or not 0 <= self.processes <= 256:
            raise ConfigError(f"processes must be an int from 0 (auto) to 256, got {self.processes!r}")

    def resolved_processes(self) -> int:
        """`processes` with 0 (auto) resolved for this machine."""
        if self.processes:
            return self.processes
        return max(1, min(8, (os.cpu_count() or 1) // 2))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); `from_dict` inverts it."""
        out = asdict(self)
        out["algorithms"] = list(self.algorithms)
        if not isinstance(self.tensors, str):
            out["tensors"] = list(self.tensors)
        out["method_params"] = {k: dict(v) for k, v in sorted(self.method_params.items())}
        out["manual_ranges"] = dict(sorted(self.manual_ranges.items()))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown calibration config field(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        if "algorithms" in values and not isinstance(values["algorithms"], str):
            values["algorithms"] = tuple(values["algorithms"])
        if "tensors" in values and not isinstance(values["tensors"], str):
            values["tensors"] = tuple(values["tensors"])
        return cls(**values)
