"""Cache keys: sha256 of a canonical JSON of everything that determines an entry's artifacts.

Canonical JSON here means: UTF-8, object keys sorted, no whitespace, no NaN/Infinity, only JSON
types (dict with str keys, list/tuple, str, int, float, bool, None). Python writes floats with the
shortest repr that round-trips, so equal inputs give equal bytes on every machine. `1` and `1.0`
are different inputs; configs should normalise their types before they are keyed.

The TensorRT header version is deliberately not part of a key: it is applied when a cache is
exported (`CacheStore.export_trt_cache`), so one entry serves every TensorRT version.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trtcal._version import FORMAT_VERSION
from trtcal.errors import ConfigError

__all__ = ["KeyInputs", "canonical_json", "compute_cache_key", "key_inputs_dict"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_json_value(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"{where}: string is not valid Unicode (lone surrogate)") from None
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {value!r} is not a finite number; JSON has no NaN/Infinity")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: object key {k!r} is not a string")
            _check_json_value(v, f"{where}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json_value(v, f"{where}[{i}]")
        return
    raise ConfigError(
        f"{where}: {type(value).__name__} is not a JSON value; convert it (e.g. numpy scalars with .item())"
    )


def canonical_json(value: Any) -> bytes:
    """The canonical JSON bytes of `value` (see the module docstring). Raises ConfigError if not JSON."""
    _check_json_value(value, "inputs")
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


@dataclass(frozen=True, kw_only=True)
class KeyInputs:
    """What determines a calibration entry. Every field goes into the key.

    Args:
        model_sha256: sha256 (hex) of the ONNX model file's bytes.
        batch_fingerprint: fingerprint of the calibration batch (its sha256 or a digest of its rows).
        preprocessing: the preprocessing spec (preset name and parameters), JSON values only.
        algorithm: trtcal method name (entropy2, minmax, percentile, mse, legacy, entropy).
        algorithm_params: the method's parameters (num_bins, percentile, ...).
        runner: FP32 runner kind (e.g. "onnxruntime-cpu").
        runner_version: the runner library's version.
        extra: anything else that changes the artifacts (micro-batch size, tensor selection, ...).
        format_version: trtcal's artifact format version (trtcal._version.FORMAT_VERSION).
    """

    model_sha256: str
    batch_fingerprint: str
    preprocessing: Mapping[str, Any]
    algorithm: str
    algorithm_params: Mapping[str, Any] = field(default_factory=dict)
    runner: str
    runner_version: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.model_sha256, str) or _SHA256.fullmatch(self.model_sha256) is None:
            raise ConfigError(f"model_sha256 must be 64 lower-case hex digits, got {self.model_sha256!r}")
        for name in ("batch_fingerprint", "algorithm", "runner", "runner_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > 256:
                raise ConfigError(f"{name} must be a non-empty string of at most 256 characters, got {value!r}")
        for name in ("preprocessing", "algorithm_params", "extra"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be a mapping of JSON values, got {type(value).__name__}")
            _check_json_value(value, name)
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int) or self.format_version < 1:
            raise ConfigError(f"format_version must be a positive int, got {self.format_version!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_sha256": self.model_sha256,
            "batch_fingerprint": self.batch_fingerprint,
            "preprocessing": _plain(self.preprocessing),
            "algorithm": self.algorithm,
            "algorithm_params": _plain(self.algorithm_params),
            "runner": self.runner,
            "runner_version": self.runner_version,
            "extra": _plain(self.extra),
            "format_version": self.format_version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyInputs:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown key input field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**dict(data))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def key_inputs_dict(inputs: KeyInputs | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object that is hashed: a KeyInputs as a dict, or a mapping with `format_version` filled in."""
    if isinstance(inputs, KeyInputs):
        return inputs.to_dict()
    if not isinstance(inputs, Mapping):
        raise ConfigError(f"key inputs must be a KeyInputs or a mapping, got {type(inputs).__name__}")
    if not inputs:
        raise ConfigError("key inputs are empty; a key must cover everything that determines the artifacts")
    plain: dict[str, Any] = _plain(inputs)
    plain.setdefault("format_version", FORMAT_VERSION)
    return plain


def compute_cache_key(inputs: KeyInputs | Mapping[str, Any]) -> str:
    """sha256 (64 hex digits) of the canonical JSON of `inputs`.

    A plain mapping gets `format_version` (trtcal's artifact format) added when it lacks one, so a
    format change always changes every key.

    >>> compute_cache_key({"a": 1, "format_version": 1}) == compute_cache_key({"format_version": 1, "a": 1})
    True
    """
    return hashlib.sha256(canonical_json(key_inputs_dict(inputs))).hexdigest()
