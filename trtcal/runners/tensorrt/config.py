"""The TensorRT adapter's settings: `CalibratorConfig` and `EngineBuildConfig` (every default once)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from trtcal.errors import (
    ConfigError,
)

log = logging.getLogger(__name__)


# trtcal algorithm name -> the TensorRT base class that implements it.
ALGORITHM_BASE_CLASSES: Mapping[str, str] = {
    "entropy2": "IInt8EntropyCalibrator2",
    "minmax": "IInt8MinMaxCalibrator",
    "entropy": "IInt8EntropyCalibrator",
    "legacy": "IInt8LegacyCalibrator",
}
# Header suffixes seen in real TensorRT caches; the other two are trtcal's best guess.
_VERIFIED_HEADER_ALGORITHMS = frozenset({"EntropyCalibration2", "MinMaxCalibration"})

PartialBatchPolicy = Literal["error", "drop"]
ShapeSpec = Sequence[int] | tuple[Sequence[int], Sequence[int], Sequence[int]]


@dataclass(frozen=True, kw_only=True)
class CalibratorConfig:
    """How a live TensorRT calibrator is fed.

    Attributes:
        algorithm: "entropy2", "minmax", "entropy" or "legacy" (TensorRT's four calibrators).
        micro_batch: samples per get_batch; None serves the source's items as they come (each
            must then have the same shape). TensorRT's entropy results depend on it.
        partial_batch: what to do with a last micro-batch smaller than `micro_batch`: "error"
            (nothing is dropped silently) or "drop" (leave those samples out, with a warning).
            TensorRT reads every batch at the calibration shape, so it cannot be served as is.
        quantile: IInt8LegacyCalibrator only, in (0, 1].
        regression_cutoff: IInt8LegacyCalibrator only, in (0, 1].
        write_cache: store the cache TensorRT writes into the `cache` target.
    """

    algorithm: str = "entropy2"
    micro_batch: int | None = None
    partial_batch: PartialBatchPolicy = "error"
    quantile: float = 0.9999
    regression_cutoff: float = 1.0
    write_cache: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHM_BASE_CLASSES:
            hint = ""
            if self.algorithm in ("percentile", "mse"):
                hint = (
                    f"; TensorRT has no {self.algorithm} calibrator: compute it with trtcal's own backend and "
                    "build with the resulting cache, or use 'legacy' with a quantile"
                )
            raise ConfigError(
                f"algorithm={self.algorithm!r} is not a TensorRT calibrator; choose one of "
                f"{sorted(ALGORITHM_BASE_CLASSES)}{hint}"
            )
        if self.micro_batch is not None and (
            isinstance(self.micro_batch, bool)
            or not isinstance(self.micro_batch, int)
            or self.micro_batch < 1
        ):
            raise ConfigError(f"micro_batch must be a positive integer or None, got {self.micro_batch!r}")
        if self.partial_batch not in ("error", "drop"):
            raise ConfigError(f"partial_batch must be 'error' or 'drop', got {self.partial_batch!r}")
        for field_name in ("quantile", "regression_cutoff"):
            value = getattr(self, field_name)
            if not (isinstance(value, (int, float)) and 0.0 < float(value) <= 1.0):
                raise ConfigError(f"{field_name} must be in (0, 1], got {value!r}")

    @property
    def header_algorithm(self) -> str:
        from trtcal.core import header_algorithm

        return header_algorithm(self.algorithm)


@dataclass(frozen=True, kw_only=True)
class EngineBuildConfig:
    """Builder settings for `build_engine`.

    Attributes:
        workspace_bytes: limit of TensorRT's workspace memory pool; None keeps TensorRT's default.
        calibrate_before_fusion: set QuantizationFlag.CALIBRATE_BEFORE_FUSION (matters for the
            legacy and entropy calibrators; entropy2 and minmax always calibrate before fusion).
        fp16: also allow FP16 kernels (BuilderFlag.FP16).
        builder_optimization_level: 0-5, None keeps TensorRT's default.
        replay_algorithm: calibrator class used to replay a `cache` ("entropy2", "minmax" or
            "entropy"); its header name is written into the replayed cache.
    """

    workspace_bytes: int | None = None
    calibrate_before_fusion: bool = False
    fp16: bool = False
    builder_optimization_level: int | None = None
    replay_algorithm: str = "entropy2"

    def __post_init__(self) -> None:
        if self.workspace_bytes is not None and (
            isinstance(self.workspace_bytes, bool)
            or not isinstance(self.workspace_bytes, int)
            or self.workspace_bytes < 1
        ):
            raise ConfigError(
                f"workspace_bytes must be a positive integer or None, got {self.workspace_bytes!r}"
            )
        if self.builder_optimization_level is not None and self.builder_optimization_level not in range(6):
            raise ConfigError(
                f"builder_optimization_level must be 0..5 or None, got {self.builder_optimization_level!r}"
            )
        if self.replay_algorithm not in ("entropy2", "minmax", "entropy"):
            raise ConfigError(
                f"replay_algorithm must be 'entropy2', 'minmax' or 'entropy', got {self.replay_algorithm!r} "
                "(a legacy calibrator's cache also depends on its quantile, cutoff and histogram cache)"
            )


_C = TypeVar("_C")


def _config_from(cls: type[_C], **values: Any) -> _C:
    # None means "not given": the dataclass stays the only place defaults live.
    return cls(**{k: v for k, v in values.items() if v is not None})
