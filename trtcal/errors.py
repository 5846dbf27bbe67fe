"""trtcal's exception tree.

    TrtcalError                      every error a user can act on
    ├── ConfigError (ValueError)     a config field is invalid; names the field and the allowed values
    ├── DataError                    calibration data: empty, wrong name/shape/dtype, NaN/Inf, bad images
    │   └── NonFiniteError           NaN or Inf in an activation tensor
    ├── ModelError                   the ONNX model cannot be loaded or is unsuitable
    ├── CacheFormatError (ValueError) a TensorRT calibration cache or manifest is malformed
    ├── StorageError                 a store/filesystem operation failed (carries the URL, never credentials)
    │   ├── CorruptEntryError        a stored entry's hashes do not match
    │   └── ReadOnlyStoreError       a write was attempted on a read-only store
    ├── WorkerError                  a Ray task/actor failed (carries the actor/node id)
    └── BackendUnavailableError      an optional backend (TensorRT, CUDA, Ray) is missing or unsupported

    InternalError                    a bug in trtcal itself; deliberately NOT a TrtcalError

Every message says what was wrong (the offending file, tensor or field) and what to do.
"""

from __future__ import annotations

__all__ = [
    "TrtcalError",
    "ConfigError",
    "DataError",
    "NonFiniteError",
    "ModelError",
    "CacheFormatError",
    "StorageError",
    "CorruptEntryError",
    "ReadOnlyStoreError",
    "WorkerError",
    "BackendUnavailableError",
    "InternalError",
]


class TrtcalError(Exception):
    """Base of every error a user can act on."""


class ConfigError(TrtcalError, ValueError):
    """A configuration value is invalid."""


class DataError(TrtcalError):
    """The calibration data is unusable (empty, wrong shape/dtype/name, corrupt input)."""


class NonFiniteError(DataError):
    """An activation tensor holds NaN or Inf values."""

    def __init__(self, message: str, *, tensor: str = "", nan_count: int = 0, inf_count: int = 0):
        super().__init__(message)
        self.tensor = tensor
        self.nan_count = nan_count
        self.inf_count = inf_count


class ModelError(TrtcalError):
    """The ONNX model cannot be loaded or used."""


class CacheFormatError(TrtcalError, ValueError):
    """A calibration cache (or another trtcal data file) is malformed."""

    def __init__(self, message: str, *, line: int | None = None):
        if line is not None:
            message = f"line {line}: {message}"
        super().__init__(message)
        self.line = line


class StorageError(TrtcalError):
    """A storage operation failed. `url` never contains credentials."""

    def __init__(self, message: str, *, url: str = ""):
        super().__init__(message)
        self.url = url


class CorruptEntryError(StorageError):
    """A stored entry failed verification (missing artifact or sha256 mismatch)."""

    def __init__(self, message: str, *, url: str = "", key: str = ""):
        super().__init__(message, url=url)
        self.key = key


class ReadOnlyStoreError(StorageError):
    """A write was attempted on a store opened read-only."""


class WorkerError(TrtcalError):
    """A Ray task or actor failed."""

    def __init__(self, message: str, *, actor_id: str = "", node_id: str = ""):
        super().__init__(message)
        self.actor_id = actor_id
        self.node_id = node_id


class BackendUnavailableError(TrtcalError):
    """An optional backend (TensorRT, CUDA, PyTorch, Ray) is not installed or not supported."""


class InternalError(Exception):
    """A bug in trtcal. Not a TrtcalError on purpose: nobody should catch it as a user error."""
