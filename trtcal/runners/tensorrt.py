"""TensorRT 10 adapter: live INT8 calibrators fed from trtcal's calibration batch, cache replay,
and INT8 engine builds (the `tensorrt` extra; TensorRT and cuda-python are imported lazily).

What lives here, in the order TensorRT meets it:

* `make_calibrator(algorithm, batch_source, ...)` returns an `ArrowBatchCalibrator` that is also a
  subclass of TensorRT's `IInt8EntropyCalibrator2`, `IInt8MinMaxCalibrator`,
  `IInt8EntropyCalibrator` or `IInt8LegacyCalibrator` (chosen by `algorithm`). `get_batch(names)`
  serves the batch in micro-batches through device buffers allocated once, returns their
  addresses in the order of `names`, and `None` at the end, when the buffers are freed.
* `make_replay_calibrator(cache, ...)` returns a `CacheReplayCalibrator`: it hands TensorRT a
  trtcal-computed cache whose header is rewritten for the installed TensorRT and the calibrator's
  algorithm, so TensorRT uses trtcal's scales and never asks for data.
* `build_engine(model, cache=... | calibrator=..., ...)` parses the ONNX model, sets
  `BuilderFlag.INT8`, the calibration profile, manual dynamic ranges and
  `QuantizationFlag.CALIBRATE_BEFORE_FUSION`, and returns the serialized engine.
* `calibrate_with_tensorrt(model, batch_source, ...)` is the entry point for
  `trtcal calibrate --backend tensorrt`: it returns the cache TensorRT wrote.

TensorRT swallows exceptions raised inside calibrator methods (it prints them and goes on). Every
method TensorRT calls is therefore trapped here: the exception is logged with its context, kept
on the calibrator, and `build_engine` raises it once TensorRT returns.

TensorRT 11 removed implicit calibration (and `BuilderFlag.INT8`, `set_dynamic_range`, the
quantization flags); `load_tensorrt` turns that into a clear error pointing at the Q/DQ export.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol, TypeGuard, TypeVar, cast, runtime_checkable

import numpy as np

from trtcal._version import FORMAT_VERSION
from trtcal.errors import (
    BackendUnavailableError,
    CacheFormatError,
    ConfigError,
    DataError,
    ModelError,
    StorageError,
)
from trtcal.progress import NO_PROGRESS, ProgressCallback

__all__ = [
    "ALGORITHM_BASE_CLASSES",
    "ArrowBatchCalibrator",
    "BytesStore",
    "CacheReplayCalibrator",
    "CalibratorConfig",
    "CudaRuntimeMemory",
    "DeviceBatchBuffers",
    "DeviceMemory",
    "EngineBuildConfig",
    "PyCudaMemory",
    "build_engine",
    "calibrate_with_tensorrt",
    "check_tensorrt_version",
    "iter_micro_batches",
    "load_device_memory",
    "load_tensorrt",
    "make_calibrator",
    "make_replay_calibrator",
    "resolve_profile_shapes",
    "rewrite_cache_header",
    "tensorrt_cache_key",
]

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

INSTALL_HINT = (
    "TensorRT is not installed. The TensorRT backend needs TensorRT 10.x and cuda-python on a machine "
    "with an NVIDIA GPU: pip install 'trtcal[tensorrt]' with NVIDIA's package index added as an extra "
    "index (the TensorRT wheels on PyPI download their libraries from it; see TensorRT's installation "
    "guide). Without TensorRT, calibrate with the default ONNX Runtime backend: its calibration.cache "
    "loads in TensorRT 10 (trtexec --calib, or `trtcal engine build --cache` where TensorRT exists) "
    "and its Q/DQ model builds in TensorRT 11."
)

STAGE = "tensorrt calibration"


class MicroBatchSource(Protocol):
    """What trtcal's CalibrationBatch offers (trtcal.batch)."""

    @property
    def num_rows(self) -> int: ...

    def iter_micro_batches(self, size: int) -> Iterator[dict[str, np.ndarray]]: ...


BatchSource = MicroBatchSource | Mapping[str, Any] | Iterable[Mapping[str, Any]]
PartialBatchPolicy = Literal["error", "drop"]
ShapeSpec = Sequence[int] | tuple[Sequence[int], Sequence[int], Sequence[int]]


# --------------------------------------------------------------------------------------------
# TensorRT version detection
# --------------------------------------------------------------------------------------------

_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?")


def check_tensorrt_version(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a TensorRT version string, if this adapter supports it.

    Raises:
        BackendUnavailableError: TensorRT 11+ (implicit calibration removed), older than 10,
            or an unreadable version string.
    """
    m = _VERSION_RE.match(str(version))
    if not m:
        raise BackendUnavailableError(
            f"cannot read the TensorRT version {version!r}; is the 'tensorrt' module TensorRT's own package?"
        )
    major, minor, patch = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if major >= 11:
        raise BackendUnavailableError(
            f"TensorRT {version} is installed, but implicit INT8 calibration no longer exists in TensorRT 11: "
            "the IInt8Calibrator family, BuilderFlag.INT8, ITensor.set_dynamic_range and the quantization flags "
            "were removed in 11.0 in favour of explicit quantization. Export a Q/DQ model with "
            "`trtcal export qdq` and build that with TensorRT 11, or install TensorRT 10.x (10.16 is the last "
            "release with calibrators) to use this backend."
        )
    if major < 10:
        raise BackendUnavailableError(
            f"TensorRT {version} is installed; trtcal's TensorRT backend needs TensorRT 10.x. "
            "trtcal can still write a calibration cache for it (set the cache's target TensorRT version), "
            "which trtexec --calib or your own calibrator can load."
        )
    return major, minor, patch


def load_tensorrt() -> ModuleType:
    """Import TensorRT and check that it is a 10.x release.

    Raises:
        BackendUnavailableError: TensorRT missing (with the install hint), broken, or not 10.x.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(f"{INSTALL_HINT} (import tensorrt: {exc})") from exc
    except OSError as exc:  # the Python module is there but libnvinfer is not loadable
        raise BackendUnavailableError(
            f"TensorRT's Python module is installed but its libraries do not load ({exc}); "
            "reinstall TensorRT 10.x so its libraries match the Python bindings."
        ) from exc
    version = getattr(trt, "__version__", None)
    if not isinstance(version, str):
        raise BackendUnavailableError(
            "the installed 'tensorrt' module has no __version__; it is probably the placeholder package "
            f"whose real wheels failed to download. {INSTALL_HINT}"
        )
    check_tensorrt_version(version)
    module: ModuleType = trt
    return module


def _trt_version_int(trt: ModuleType) -> int:
    from trtcal.core import trt_version_int

    return trt_version_int(str(trt.__version__))


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Micro-batches
# --------------------------------------------------------------------------------------------


def _as_arrays(chunk: Any, index: int) -> dict[str, np.ndarray]:
    if not isinstance(chunk, Mapping):
        raise DataError(
            f"batch source item {index} is a {type(chunk).__name__}; expected a mapping of input name to array"
        )
    if not chunk:
        raise DataError(f"batch source item {index} holds no inputs")
    arrays = {str(name): np.asarray(value) for name, value in chunk.items()}
    for name, arr in arrays.items():
        if arr.ndim == 0:
            raise DataError(f"batch source item {index}: input {name!r} is a scalar; expected [N, ...]")
    return arrays


def _rows(arrays: Mapping[str, np.ndarray], index: int) -> int:
    counts = {name: int(arr.shape[0]) for name, arr in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"batch source item {index}: inputs have different numbers of samples {counts}")
    return next(iter(counts.values()))


def iter_micro_batches(
    source: BatchSource, micro_batch: int | None, *, partial_batch: PartialBatchPolicy = "error"
) -> Iterator[dict[str, np.ndarray]]:
    """Serve a calibration batch as micro-batches of exactly `micro_batch` samples, in order.

    `source` is a `trtcal.batch.CalibrationBatch` (anything with
    `iter_micro_batches(size)` and `num_rows`), one mapping input name -> array [N, ...] (sliced
    without copying), or an iterable of such mappings of any sizes (re-cut into `micro_batch`-sized
    pieces; pieces that straddle two items are concatenated). With `micro_batch=None` the items
    (or the whole batch) are served as they are.

    Raises:
        DataError: an item is not a mapping of arrays, inputs disagree on names or sample counts,
            the source is empty, or (with partial_batch="error") the samples do not fill the
            last micro-batch.
    """
    chunks: Iterable[Any]
    if _is_calibration_batch(source):
        rows_total = int(source.num_rows)
        if rows_total == 0:
            raise DataError("the calibration batch is empty: the batch source gave no samples")
        chunks = source.iter_micro_batches(micro_batch or rows_total)
    elif isinstance(source, Mapping):
        chunks = [source]
    else:
        chunks = cast(Iterable[Any], source)
    names: tuple[str, ...] | None = None
    total = 0
    served = 0
    pending: dict[str, list[np.ndarray]] = {}
    pending_rows = 0
    for index, chunk in enumerate(chunks):
        arrays = _as_arrays(chunk, index)
        if names is None:
            names = tuple(arrays)
        elif set(arrays) != set(names):
            raise DataError(
                f"batch source item {index} has inputs {sorted(arrays)}, but earlier items had {sorted(names)}"
            )
        rows = _rows(arrays, index)
        total += rows
        if micro_batch is None:
            if rows:
                served += rows
                yield arrays
            continue
        offset = 0
        while offset < rows:
            take = min(micro_batch - pending_rows, rows - offset)
            if pending_rows == 0 and take == micro_batch:
                # Whole micro-batch inside one item: a view, no copy.
                yield {name: arrays[name][offset : offset + take] for name in names}
                served += take
            else:
                for name in names:
                    pending.setdefault(name, []).append(arrays[name][offset : offset + take])
                pending_rows += take
                if pending_rows == micro_batch:
                    yield {name: np.concatenate(pending[name], axis=0) for name in names}
                    served += pending_rows
                    pending, pending_rows = {}, 0
            offset += take
    if total == 0:
        raise DataError("the calibration batch is empty: the batch source gave no samples")
    if pending_rows:
        if partial_batch == "drop":
            log.warning(
                "dropping the last %d of %d calibration samples: they do not fill a micro-batch of %d "
                "(TensorRT reads every batch at the calibration shape)",
                pending_rows,
                total,
                micro_batch,
            )
            if served == 0:
                raise DataError(
                    f"the calibration batch has {total} samples, fewer than one micro-batch of {micro_batch}"
                )
        else:
            raise DataError(
                f"the calibration batch has {total} samples, which leaves a last micro-batch of {pending_rows} "
                f"(micro_batch={micro_batch}); TensorRT reads every calibration batch at the same shape. "
                f"Choose a micro_batch that divides {total}, or set partial_batch='drop' to leave those "
                f"{pending_rows} samples out"
            )


def _is_calibration_batch(source: Any) -> TypeGuard[MicroBatchSource]:
    return callable(getattr(source, "iter_micro_batches", None)) and hasattr(source, "num_rows")


def _count_micro_batches(
    source: BatchSource, micro_batch: int | None, partial_batch: PartialBatchPolicy
) -> int | None:
    """Number of micro-batches when it is known without reading data."""
    if micro_batch is None:
        return None
    if _is_calibration_batch(source):
        rows = int(source.num_rows)
    elif isinstance(source, Mapping) and source:
        try:
            rows = _rows({n: np.asarray(a) for n, a in source.items()}, 0)
        except (DataError, IndexError):
            return None  # the iterator reports it properly
    else:
        return None
    full, rest = divmod(rows, micro_batch)
    if rest and partial_batch == "error":
        return None
    return full


# --------------------------------------------------------------------------------------------
# Device memory (cuda-python, or pycuda where that is what is installed)
# --------------------------------------------------------------------------------------------


@runtime_checkable
class DeviceMemory(Protocol):
    """The four CUDA operations the calibrator needs. Pointers are plain ints."""

    def malloc(self, nbytes: int) -> int: ...

    def copy_to_device(self, device_ptr: int, host: np.ndarray) -> None: ...

    def copy_to_host(self, host: np.ndarray, device_ptr: int) -> None: ...

    def free(self, device_ptr: int) -> None: ...


class CudaRuntimeMemory:
    """DeviceMemory over cuda-python's runtime module (`cuda.bindings.runtime` or `cuda.cudart`).

    TensorRT uses the CUDA runtime too, so allocations land in the same (primary) context.
    """

    def __init__(self, cudart: Any):
        self._cudart = cudart

    def _error_name(self, err: Any) -> str:
        try:
            result = self._cudart.cudaGetErrorName(err)
            name = result[1] if isinstance(result, tuple) else result
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # the name is only decoration for the message
            return str(err)

    def _check(self, result: Any, call: str) -> Any:
        values = result if isinstance(result, tuple) else (result,)
        err, rest = values[0], values[1:]
        raw: Any = getattr(err, "value", err)
        code = int(raw)
        if code != 0:
            name = self._error_name(err)
            hint = " (lower the micro-batch size)" if "MemoryAllocation" in name else ""
            raise BackendUnavailableError(f"CUDA call {call} failed: {name} ({code}){hint}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self._cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)"))

    def copy_to_device(self, device_ptr: int, host: np.ndarray) -> None:
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(
            self._cudart.cudaMemcpy(device_ptr, host.ctypes.data, host.nbytes, kind),
            f"cudaMemcpy(host to device, {host.nbytes} bytes)",
        )

    def copy_to_host(self, host: np.ndarray, device_ptr: int) -> None:
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(
            self._cudart.cudaMemcpy(host.ctypes.data, device_ptr, host.nbytes, kind),
            f"cudaMemcpy(device to host, {host.nbytes} bytes)",
        )

    def free(self, device_ptr: int) -> None:
        self._check(self._cudart.cudaFree(device_ptr), "cudaFree")


class PyCudaMemory:
    """DeviceMemory over pycuda, in the device's primary context (the one TensorRT uses)."""

    def __init__(self, driver: Any, device_index: int = 0):
        self._driver = driver
        self._device_index = device_index
        self._context: Any = None
        self._allocations: dict[int, Any] = {}

    def _ensure_context(self) -> None:
        if self._context is None:
            self._driver.init()
            self._context = self._driver.Device(self._device_index).retain_primary_context()
            self._context.push()

    def malloc(self, nbytes: int) -> int:
        self._ensure_context()
        allocation = self._driver.mem_alloc(nbytes)
        ptr = int(allocation)
        self._allocations[ptr] = allocation
        return ptr

    def copy_to_device(self, device_ptr: int, host: np.ndarray) -> None:
        self._driver.memcpy_htod(device_ptr, host)

    def copy_to_host(self, host: np.ndarray, device_ptr: int) -> None:
        self._driver.memcpy_dtoh(host, device_ptr)

    def free(self, device_ptr: int) -> None:
        self._allocations.pop(device_ptr).free()
        if not self._allocations and self._context is not None:
            self._context.pop()
            self._context = None


def load_device_memory() -> DeviceMemory:
    """The CUDA runtime as DeviceMemory: cuda-python (new or old layout), else pycuda.

    Only imports; no CUDA call is made until the first allocation.

    Raises:
        BackendUnavailableError: neither cuda-python nor pycuda is importable.
    """
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6 layout

        return CudaRuntimeMemory(runtime)
    except ImportError:
        pass
    try:
        from cuda import cudart  # older cuda-python layout

        return CudaRuntimeMemory(cudart)
    except ImportError:
        pass
    try:
        import pycuda.driver as driver
    except ImportError as exc:
        raise BackendUnavailableError(
            "a live TensorRT calibrator needs CUDA from Python: pip install cuda-python (part of "
            f"'trtcal[tensorrt]'), or pycuda ({exc})"
        ) from exc
    return PyCudaMemory(driver)


@dataclass(frozen=True)
class _DeviceBuffer:
    ptr: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype


class DeviceBatchBuffers:
    """One device buffer per network input, allocated at the first micro-batch and reused."""

    def __init__(self, memory: DeviceMemory):
        self._memory = memory
        self._buffers: dict[str, _DeviceBuffer] = {}
        self.allocations = 0  # how many cudaMalloc calls were made (tests check it stays at one per input)

    @property
    def pointers(self) -> dict[str, int]:
        return {name: buf.ptr for name, buf in self._buffers.items()}

    def load(self, batch: Mapping[str, np.ndarray], names: Sequence[str]) -> list[int]:
        """Copy `batch` to the device; the device pointers in the order of `names`."""
        missing = [name for name in names if name not in batch]
        if missing:
            raise DataError(
                f"TensorRT asks for network input(s) {missing}, but the calibration batch holds {sorted(batch)}; "
                "the batch's column names must be the model's input names"
            )
        pointers: list[int] = []
        for name in names:
            host = np.ascontiguousarray(batch[name])
            buf = self._buffers.get(name)
            if buf is None:
                if host.nbytes == 0:
                    raise DataError(f"input {name!r}: the micro-batch has no data (shape {host.shape})")
                buf = _DeviceBuffer(
                    self._memory.malloc(host.nbytes), host.nbytes, tuple(host.shape), host.dtype
                )
                self._buffers[name] = buf
                self.allocations += 1
            elif tuple(host.shape) != buf.shape or host.dtype != buf.dtype:
                raise DataError(
                    f"input {name!r}: this micro-batch is {host.dtype}{list(host.shape)}, but the device buffer "
                    f"was allocated for {buf.dtype}{list(buf.shape)}; every calibration batch must have the same "
                    "shape and dtype (set micro_batch so the batch is cut evenly)"
                )
            self._memory.copy_to_device(buf.ptr, host)
            pointers.append(buf.ptr)
        return pointers

    def close(self) -> None:
        """Free every buffer (idempotent). Raises the first failure after trying them all."""
        first_error: BaseException | None = None
        buffers, self._buffers = self._buffers, {}
        for name, buf in buffers.items():
            try:
                self._memory.free(buf.ptr)
            except Exception as exc:
                log.error("freeing the device buffer of input %r failed: %s", name, exc)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error


# --------------------------------------------------------------------------------------------
# Calibration caches: header rewriting, keys, stores
# --------------------------------------------------------------------------------------------


@runtime_checkable
class BytesStore(Protocol):
    """What the calibrators need from a cache store: bytes by key.

    `get_bytes` returns None (or raises KeyError / FileNotFoundError) when the key is absent.
    trtcal.storage.CacheStore, or anything with these two methods, plugs in.
    """

    def get_bytes(self, key: str) -> bytes | None: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...


CacheTarget = str | os.PathLike[str] | BytesStore


def rewrite_cache_header(data: bytes, *, trt_version: str | int, algorithm: str) -> bytes:
    """The same cache with header `TRT-<version>-<Algorithm>`, entries re-emitted bit for bit.

    TensorRT ignores a cache whose header names another version or calibrator; the scales
    themselves do not depend on either. Entries are re-encoded from their exact float32 bits
    (never through amax), so only the header and formatting (padding, CRLF) can change.

    Raises:
        CacheFormatError: `data` is not a TensorRT calibration cache, or holds no tensors.
        ConfigError: unknown version or algorithm.
    """
    from trtcal.core import header_algorithm, read_trt_cache, trt_version_int
    from trtcal.core.cache_format import scale_to_hex

    cache = read_trt_cache(data)
    if not cache.scale:
        raise CacheFormatError("the calibration cache holds no tensors; nothing to replay")
    lines = [f"TRT-{trt_version_int(trt_version)}-{header_algorithm(algorithm)}"]
    lines += [f"{name}: {scale_to_hex(scale)}" for name, scale in cache.scale.items()]
    return ("\n".join(lines) + "\n").encode("utf-8")


def tensorrt_cache_key(
    base_key: str,
    *,
    trt_version: str | int,
    algorithm: str,
    micro_batch: int | None = None,
    quantile: float | None = None,
    regression_cutoff: float | None = None,
) -> str:
    """Store key (64 hex digits) of the cache a live TensorRT calibrator writes.

    `base_key` identifies the model and calibration batch (e.g. trtcal's calibration key). The
    TensorRT version and calibrator are part of the key because TensorRT rejects other versions'
    caches; the micro-batch size because TensorRT's entropy histograms depend on it; the legacy
    parameters because TensorRT rejects a legacy cache made with others.
    """
    from trtcal.core import header_algorithm, trt_version_int

    if not isinstance(base_key, str) or not base_key:
        raise ConfigError("cache_key must be a non-empty string identifying the model and calibration batch")
    fields: dict[str, Any] = {
        "kind": "tensorrt-live-calibration-cache",
        "base_key": base_key,
        "trt_version": trt_version_int(trt_version),
        "algorithm": header_algorithm(algorithm),
        "micro_batch": micro_batch,
        "format_version": FORMAT_VERSION,
    }
    if algorithm == "legacy":
        fields["quantile"] = quantile
        fields["regression_cutoff"] = regression_cutoff
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class _CacheBinding(Protocol):
    where: str

    def read(self) -> bytes | None: ...

    def write(self, data: bytes) -> None: ...


class _FileCache:
    """A cache file at a plain path; written atomically (temporary file, then rename)."""

    def __init__(self, path: Path):
        self.path = path
        self.where = str(path)

    def read(self) -> bytes | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(
                f"cannot read calibration cache {self.path}: {exc}", url=str(self.path)
            ) from exc
        if not data:
            log.warning("calibration cache %s is empty; TensorRT will calibrate", self.path)
            return None
        return data

    def write(self, data: bytes) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            raise StorageError(
                f"cannot write calibration cache {self.path}: {exc}", url=str(self.path)
            ) from exc


class _StoreCache:
    """A cache under one key of a BytesStore."""

    def __init__(self, store: BytesStore, key: str):
        self.store = store
        self.key = key
        self.where = f"key {key} of {type(store).__name__}"

    def read(self) -> bytes | None:
        try:
            data = self.store.get_bytes(self.key)
        except (KeyError, FileNotFoundError):
            return None
        return None if data is None else bytes(data)

    def write(self, data: bytes) -> None:
        self.store.put_bytes(self.key, data)


def _bind_cache(cache: CacheTarget | None, key: Callable[[], str] | None) -> _CacheBinding | None:
    if cache is None:
        return None
    if isinstance(cache, (str, os.PathLike)):
        return _FileCache(Path(cache))
    if callable(getattr(cache, "get_bytes", None)) and callable(getattr(cache, "put_bytes", None)):
        if key is None:
            raise ConfigError(
                "a cache store needs cache_key= (identifying the model and calibration batch); the TensorRT "
                "version and algorithm are added to it"
            )
        return _StoreCache(cache, key())
    raise ConfigError(
        f"cache must be a file path or an object with get_bytes(key)/put_bytes(key, data), got {type(cache).__name__}"
    )


# --------------------------------------------------------------------------------------------
# Calibrators
# --------------------------------------------------------------------------------------------

_T = TypeVar("_T")


def _trapped(default: Any) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Wrap a method TensorRT calls: keep and log any exception, return `default` instead."""

    def wrap(fn: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(fn)
        def method(self: _TrtCalibratorMixin, *args: Any) -> Any:
            try:
                return fn(self, *args)
            except BaseException as exc:  # TensorRT would swallow it; keep it for build_engine
                self._record_error(fn.__name__, exc)
                return default

        return method

    return wrap


class _TrtCalibratorMixin:
    """What every trtcal calibrator shares: trapped errors and the TensorRT base class init."""

    _trt_base: Any = None  # set on the concrete subclass
    _algorithm: str = "entropy2"

    def _init_trt_base(self) -> None:
        # pybind11 trampolines must have their base __init__ called explicitly, or TensorRT crashes.
        type(self)._trt_base.__init__(self)
        self.errors: list[tuple[str, BaseException]] = []

    def _context(self) -> str:
        return f"{type(self).__name__}(algorithm={self._algorithm})"

    def _record_error(self, method: str, exc: BaseException) -> None:
        log.error("%s: %s() raised %s: %s", self._context(), method, type(exc).__name__, exc, exc_info=exc)
        self.errors.append((method, exc))

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    def raise_if_failed(self) -> None:
        """Raise the first exception a TensorRT callback raised (TensorRT itself only printed it)."""
        if not self.errors:
            return
        method, exc = self.errors[0]
        if len(self.errors) > 1:
            log.error("%d more calibrator errors after the first", len(self.errors) - 1)
        if hasattr(exc, "add_note"):
            exc.add_note(
                f"raised inside {self._context()}.{method}(), called by TensorRT during the engine build"
            )
        raise exc

    @_trapped(default=1)
    def get_batch_size(self) -> int:
        # Explicit-batch networks (all of TensorRT 10) carry the batch in the input shapes.
        return 1


def _bytes_at(ptr: Any, length: int) -> bytes:
    """Bytes behind a pointer handed over by TensorRT's Python bindings (a PyCapsule or an int)."""
    if not length or ptr is None:
        return b""
    if isinstance(ptr, int):
        return ctypes.string_at(ptr, length)
    if type(ptr).__name__ == "PyCapsule":
        api = ctypes.pythonapi
        api.PyCapsule_GetName.restype = ctypes.c_char_p
        api.PyCapsule_GetName.argtypes = [ctypes.py_object]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        address = api.PyCapsule_GetPointer(ptr, api.PyCapsule_GetName(ptr))
        if not address:
            raise DataError("TensorRT passed a null histogram-cache pointer")
        return ctypes.string_at(address, length)
    return bytes(memoryview(ptr))[:length]


class _LegacyMethods:
    """The IInt8LegacyCalibrator hooks (mixed into legacy calibrators only)."""

    config: CalibratorConfig
    histogram_cache: bytes | None

    def get_quantile(self) -> float:
        return float(self.config.quantile)

    def get_regression_cutoff(self) -> float:
        return float(self.config.regression_cutoff)

    def read_histogram_cache(self, length: Any) -> None:
        # TensorRT's Python binding passes `length` by value, so Python cannot report a size:
        # a histogram cache can be written from Python but never read back (Polygraphy agrees).
        return None

    @_trapped(default=None)
    def write_histogram_cache(self, ptr: Any, length: int) -> None:
        self.histogram_cache = _bytes_at(ptr, int(length))
        log.debug("TensorRT wrote a %d-byte legacy histogram cache", len(self.histogram_cache))


class ArrowBatchCalibrator(_TrtCalibratorMixin):
    """Feeds TensorRT's calibrator from trtcal's calibration batch (create with `make_calibrator`).

    Attributes:
        calibration_cache: the cache TensorRT wrote (or the one read from `cache`), else None.
        histogram_cache: legacy calibrator only: the histogram cache TensorRT wrote.
        num_batches: micro-batches served so far.
        errors: (method, exception) pairs raised inside TensorRT callbacks.
    """

    def __init__(
        self,
        batch_source: BatchSource,
        *,
        config: CalibratorConfig,
        trt_version: int,
        device_memory: DeviceMemory,
        cache: _CacheBinding | None = None,
        progress: ProgressCallback = NO_PROGRESS,
    ):
        self._init_trt_base()
        self.config = config
        self._algorithm = config.algorithm
        self.trt_version = trt_version
        self._source = batch_source
        self._cache = cache
        self._progress = progress
        self._buffers = DeviceBatchBuffers(device_memory)
        self._batches: Iterator[dict[str, np.ndarray]] | None = None
        self._peeked: dict[str, np.ndarray] | None = None
        self._expected: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._done = False
        self._progress_open = False
        self.num_batches = 0
        self.calibration_cache: bytes | None = None
        self.histogram_cache: bytes | None = None

    # -- data -----------------------------------------------------------------------------

    def _next_batch(self) -> dict[str, np.ndarray] | None:
        if self._peeked is not None:
            batch, self._peeked = self._peeked, None
            return batch
        if self._batches is None:
            self._batches = iter_micro_batches(
                self._source, self.config.micro_batch, partial_batch=self.config.partial_batch
            )
        return next(self._batches, None)

    def peek_shapes(self) -> dict[str, tuple[int, ...]]:
        """Input shapes of the first micro-batch (read once, then served first)."""
        if self._peeked is None and self.num_batches == 0:
            self._peeked = self._next_batch()
        if self._peeked is None:
            return {}
        return {name: tuple(arr.shape) for name, arr in self._peeked.items()}

    def set_input_metadata(self, expected: Mapping[str, tuple[Sequence[int], Any]]) -> None:
        """Shapes (-1 for any) and dtypes TensorRT will read; batches are checked against them."""
        self._expected = {
            name: (tuple(int(d) for d in shape), np.dtype(dtype)) for name, (shape, dtype) in expected.items()
        }

    def _check_batch(self, batch: Mapping[str, np.ndarray], names: Sequence[str]) -> None:
        for name in names:
            if name not in self._expected or name not in batch:
                continue
            shape, dtype = self._expected[name]
            arr = batch[name]
            if arr.dtype != dtype:
                raise DataError(
                    f"micro-batch {self.num_batches}: input {name!r} is {arr.dtype}, but TensorRT reads "
                    f"{dtype} for it; convert it when preparing the calibration batch"
                )
            if len(arr.shape) != len(shape) or any(e not in (-1, a) for e, a in zip(shape, arr.shape)):
                raise DataError(
                    f"micro-batch {self.num_batches}: input {name!r} has shape {list(arr.shape)}, but TensorRT "
                    f"calibrates it at {list(shape)} (-1: any); set micro_batch or the calibration profile to match"
                )

    def _finish(self) -> None:
        self._done = True
        self._buffers.close()
        if self._progress_open:
            self._progress.finish(STAGE)
            self._progress_open = False

    def _context(self) -> str:
        return (
            f"{type(self).__name__}(algorithm={self.config.algorithm}, micro_batch={self.config.micro_batch}, "
            f"batches served={self.num_batches})"
        )

    # -- TensorRT callbacks ----------------------------------------------------------------

    @_trapped(default=None)
    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        if self._done or self.errors:
            return None
        names = [str(n) for n in names]
        batch = self._next_batch()
        if batch is None:
            if self.num_batches == 0:
                raise DataError("the calibration batch source gave no micro-batches")
            log.info("served %d calibration micro-batches to TensorRT", self.num_batches)
            self._finish()
            return None
        if not self._progress_open:
            total = _count_micro_batches(self._source, self.config.micro_batch, self.config.partial_batch)
            self._progress.start(STAGE, total, "batch")
            self._progress_open = True
        self._check_batch(batch, names)
        pointers = self._buffers.load(batch, names)
        self.num_batches += 1
        self._progress.advance(STAGE, 1)
        return pointers

    @_trapped(default=None)
    def read_calibration_cache(self) -> bytes | None:
        if self.calibration_cache is not None:
            return self.calibration_cache
        if self._cache is None:
            return None
        data = self._cache.read()
        if data is None:
            log.info("no calibration cache at %s; TensorRT will calibrate", self._cache.where)
            return None
        from trtcal.core import read_trt_cache

        expected = f"TRT-{self.trt_version}-{self.config.header_algorithm}"
        try:
            found = read_trt_cache(data).header
        except CacheFormatError as exc:
            raise CacheFormatError(f"calibration cache at {self._cache.where} is malformed: {exc}") from exc
        if found != expected:
            raise CacheFormatError(
                f"calibration cache at {self._cache.where} has header {found!r}, but this TensorRT and calibrator "
                f"accept only {expected!r} (TensorRT would silently ignore it and recalibrate). Delete it to "
                "recalibrate, or build from it with `trtcal engine build --cache`, which rewrites the header"
            )
        log.info("TensorRT gets the calibration cache at %s (%s)", self._cache.where, found)
        self.calibration_cache = data
        return data

    @_trapped(default=None)
    def write_calibration_cache(self, cache: Any) -> None:
        data = bytes(cache)  # TensorRT's memoryview dies when this call returns
        self.calibration_cache = data
        if self._cache is not None and self.config.write_cache:
            self._cache.write(data)
            log.info("wrote TensorRT's calibration cache to %s", self._cache.where)

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Free the device buffers (also done when the data runs out). Idempotent."""
        self._done = True
        try:
            self._buffers.close()
        finally:
            if self._progress_open:
                self._progress.finish(STAGE)
                self._progress_open = False

    def __enter__(self) -> ArrowBatchCalibrator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(algorithm={self.config.algorithm!r}, micro_batch={self.config.micro_batch!r}, "
            f"trt_version={self.trt_version}, cache={getattr(self._cache, 'where', None)!r})"
        )


class CacheReplayCalibrator(_TrtCalibratorMixin):
    """Serves a trtcal-computed cache so TensorRT uses its scales (create with `make_replay_calibrator`).

    If TensorRT rejects the cache it asks for data; this calibrator has none, so it records a
    CacheFormatError that `build_engine` raises.
    """

    def __init__(self, cache: bytes, *, algorithm: str, trt_version: int):
        self._init_trt_base()
        self._algorithm = algorithm
        self.trt_version = trt_version
        self.cache_bytes = rewrite_cache_header(cache, trt_version=trt_version, algorithm=algorithm)
        self.written_cache: bytes | None = None
        self.reads = 0

    @_trapped(default=None)
    def get_batch(self, names: Sequence[str]) -> None:
        header = self.cache_bytes.split(b"\n", 1)[0].decode()
        raise CacheFormatError(
            f"TensorRT did not use the replayed calibration cache (header {header!r}) and asked for calibration "
            f"data for {list(names)}; check the TensorRT log above (version or calibrator mismatch, or tensor names "
            "that are not in this model)"
        )

    @_trapped(default=None)
    def read_calibration_cache(self) -> bytes:
        self.reads += 1
        return self.cache_bytes

    @_trapped(default=None)
    def write_calibration_cache(self, cache: Any) -> None:
        self.written_cache = bytes(cache)

    def close(self) -> None:
        return None

    def __enter__(self) -> CacheReplayCalibrator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


@functools.cache
def _concrete_class(mixin: type, base: type, legacy: bool, algorithm: str) -> type:
    bases: tuple[type, ...] = (_LegacyMethods, mixin, base) if legacy else (mixin, base)
    name = f"{mixin.__name__}_{base.__name__}"
    cls: type = type(name, bases, {"_trt_base": base, "_algorithm": algorithm, "__module__": __name__})
    return cls


def _base_class(trt: ModuleType, algorithm: str) -> type:
    class_name = ALGORITHM_BASE_CLASSES[algorithm]
    base: type | None = getattr(trt, class_name, None)
    if base is None:
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} has no {class_name}; implicit calibration needs TensorRT 10.x"
        )
    return base


def make_calibrator(
    algorithm: str | None,
    batch_source: BatchSource,
    *,
    cache: CacheTarget | None = None,
    cache_key: str | None = None,
    micro_batch: int | None = None,
    partial_batch: PartialBatchPolicy | None = None,
    quantile: float | None = None,
    regression_cutoff: float | None = None,
    write_cache: bool | None = None,
    device_memory: DeviceMemory | None = None,
    progress: ProgressCallback = NO_PROGRESS,
) -> ArrowBatchCalibrator:
    """A live TensorRT calibrator of `algorithm` fed from `batch_source`.

    Args:
        algorithm: "entropy2", "minmax", "entropy" or "legacy" (None: CalibratorConfig's default).
        batch_source: a mapping input name -> array [N, ...] (the whole calibration batch), or
            an iterable of such mappings in a fixed order (see `iter_micro_batches`).
        cache: where TensorRT's cache is read from and written to: a file path, or a store with
            get_bytes/put_bytes (then `cache_key` is required).
        cache_key: identifies model + batch in a store; the TensorRT version, algorithm and
            micro-batch size are added (`tensorrt_cache_key`).
        micro_batch, partial_batch, quantile, regression_cutoff, write_cache: see CalibratorConfig.
        device_memory: CUDA operations; default: cuda-python, else pycuda.
        progress: advanced once per micro-batch served.

    Returns:
        An instance of both ArrowBatchCalibrator and the TensorRT calibrator class; use it as a
        context manager (or call close()) so its device buffers are freed.

    Raises:
        ConfigError, BackendUnavailableError (TensorRT or CUDA missing, TensorRT 11+).
    """
    config = _config_from(
        CalibratorConfig,
        algorithm=algorithm,
        micro_batch=micro_batch,
        partial_batch=partial_batch,
        quantile=quantile,
        regression_cutoff=regression_cutoff,
        write_cache=write_cache,
    )
    trt = load_tensorrt()
    version = _trt_version_int(trt)

    def key() -> str:
        return tensorrt_cache_key(
            str(cache_key),
            trt_version=version,
            algorithm=config.algorithm,
            micro_batch=config.micro_batch,
            quantile=config.quantile,
            regression_cutoff=config.regression_cutoff,
        )

    binding = _bind_cache(cache, key if cache_key is not None else None)
    memory = device_memory if device_memory is not None else load_device_memory()
    cls = _concrete_class(
        ArrowBatchCalibrator,
        _base_class(trt, config.algorithm),
        config.algorithm == "legacy",
        config.algorithm,
    )
    calibrator: ArrowBatchCalibrator = cls(
        batch_source,
        config=config,
        trt_version=version,
        device_memory=memory,
        cache=binding,
        progress=progress,
    )
    return calibrator


def _read_cache_argument(cache: bytes | str | os.PathLike[str]) -> bytes:
    if isinstance(cache, (bytes, bytearray, memoryview)):
        return bytes(cache)
    path = Path(cache)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"calibration cache {path} does not exist") from None
    except OSError as exc:
        raise StorageError(f"cannot read calibration cache {path}: {exc}", url=str(path)) from exc


def make_replay_calibrator(
    cache: bytes | str | os.PathLike[str], *, algorithm: str | None = None
) -> CacheReplayCalibrator:
    """A calibrator that hands TensorRT `cache` (bytes or a file) with its header rewritten.

    Args:
        cache: a TensorRT calibration cache, e.g. written by trtcal for any TensorRT version.
        algorithm: the TensorRT calibrator to present it as ("entropy2" default, "minmax",
            "entropy"); entropy2 and minmax calibrate before fusion, so the cache's ONNX tensor
            names match the network TensorRT calibrates.

    Raises:
        CacheFormatError: malformed cache. ConfigError: unsupported algorithm.
        BackendUnavailableError: TensorRT missing or 11+.
    """
    replay = _config_from(EngineBuildConfig, replay_algorithm=algorithm).replay_algorithm
    data = _read_cache_argument(cache)
    trt = load_tensorrt()
    version = _trt_version_int(trt)
    from trtcal.core import header_algorithm

    if header_algorithm(replay) not in _VERIFIED_HEADER_ALGORITHMS:
        log.warning(
            "replaying as %s: its cache header name %r has not been seen in a real TensorRT cache; if TensorRT "
            "rejects it, replay as 'entropy2'",
            replay,
            header_algorithm(replay),
        )
    cls = _concrete_class(CacheReplayCalibrator, _base_class(trt, replay), False, replay)
    calibrator: CacheReplayCalibrator = cls(data, algorithm=replay, trt_version=version)
    return calibrator


# --------------------------------------------------------------------------------------------
# Engine build
# --------------------------------------------------------------------------------------------


def _as_shape(value: Any, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a sequence of integers, got {value!r}") from None
    if any(d < 1 for d in shape):
        raise ConfigError(f"{what} must have positive dimensions, got {list(shape)}")
    return shape


def _shape_triple(spec: Any, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    items = list(spec)
    if len(items) == 3 and all(isinstance(s, Sequence) and not isinstance(s, str) for s in items):
        lo, opt, hi = (_as_shape(s, f"input_shapes[{name!r}]") for s in items)
        if not (len(lo) == len(opt) == len(hi)) or any(not (a <= b <= c) for a, b, c in zip(lo, opt, hi)):
            raise ConfigError(
                f"input_shapes[{name!r}] must satisfy min <= opt <= max per dimension, got {items}"
            )
        return lo, opt, hi
    shape = _as_shape(items, f"input_shapes[{name!r}]")
    return shape, shape, shape


def _fits(network_shape: Sequence[int], shape: Sequence[int]) -> bool:
    return len(network_shape) == len(shape) and all(d in (-1, s) for d, s in zip(network_shape, shape))


def resolve_profile_shapes(
    network_inputs: Mapping[str, Sequence[int]],
    *,
    input_shapes: Mapping[str, ShapeSpec] | None = None,
    calibration_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) for every network input with a dynamic (-1) dimension.

    Priority: `input_shapes[name]` (one shape, or a (min, opt, max) triple); else the shape the
    calibrator will serve; else, when only the leading (batch) dimension is dynamic, batch 1.

    Raises:
        ConfigError: a shape does not fit the network input, names an unknown input, or an
            input has dynamic dimensions no rule can fill.
    """
    input_shapes = dict(input_shapes or {})
    calibration_shapes = dict(calibration_shapes or {})
    unknown = sorted(set(input_shapes) - set(network_inputs))
    if unknown:
        raise ConfigError(
            f"input_shapes names {unknown}, which are not network inputs {sorted(network_inputs)}"
        )
    resolved: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    for name, network_shape in network_inputs.items():
        network_shape = tuple(int(d) for d in network_shape)
        if name in input_shapes:
            triple = _shape_triple(input_shapes[name], name)
        elif -1 not in network_shape:
            continue
        elif name in calibration_shapes:
            shape = tuple(int(d) for d in calibration_shapes[name])
            triple = (shape, shape, shape)
        elif network_shape[0] == -1 and -1 not in network_shape[1:]:
            shape = (1, *network_shape[1:])
            log.info(
                "input %r has a dynamic batch dimension; building for batch 1 (set input_shapes to change)",
                name,
            )
            triple = (shape, shape, shape)
        else:
            raise ConfigError(
                f"input {name!r} has dynamic dimensions {list(network_shape)}; give its shape in input_shapes "
                "(one shape, or min/opt/max)"
            )
        for shape in triple:
            if not _fits(network_shape, shape):
                raise ConfigError(
                    f"shape {list(shape)} does not fit network input {name!r} {list(network_shape)}"
                )
        resolved[name] = triple
    return resolved


def _make_trt_logger(trt: ModuleType) -> Any:
    class _TrtLogger(trt.ILogger):  # type: ignore[name-defined,misc]
        """Routes TensorRT's messages into logging and keeps the errors for error messages."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = getattr(severity, "name", str(severity)).rsplit(".", 1)[-1]
            if level in ("INTERNAL_ERROR", "ERROR"):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif level == "WARNING":
                log.warning("TensorRT: %s", msg)
            else:  # INFO is chatty; VERBOSE more so
                log.debug("TensorRT: %s", msg)

    return _TrtLogger()


def _network_tensors(network: Any) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        tensors[tensor.name] = tensor
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            tensor = layer.get_output(j)
            tensors.setdefault(tensor.name, tensor)
    return tensors


def _range_bounds(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, (int, float, np.floating)):
        amax = float(value)
        lo, hi = -amax, amax
    else:
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"dynamic range of {name!r} must be an amax or (min, max), got {value!r}"
            ) from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < 0.0 < hi):
        raise ConfigError(f"dynamic range of {name!r} must be finite with min < 0 < max, got ({lo}, {hi})")
    return lo, hi


def _apply_dynamic_ranges(network: Any, ranges: Mapping[str, Any]) -> int:
    """Set ranges on the network's tensors; names TensorRT's network lacks are reported, not fatal.

    A range table covers every ONNX activation, and TensorRT's parser folds some of them away
    (constant subgraphs), so a few unknown names are expected; none matching is an error.
    """
    tensors = _network_tensors(network)
    bounds = {name: _range_bounds(name, value) for name, value in ranges.items()}
    missing = [name for name in bounds if name not in tensors]
    if len(missing) == len(bounds):
        raise ConfigError(
            f"none of the {len(bounds)} dynamic_ranges names a tensor of this network (e.g. {missing[:5]}); "
            "names must be the ONNX tensor names"
        )
    if missing:
        log.warning(
            "%d of %d dynamic ranges name tensors TensorRT's network does not have (folded or renamed), e.g. %s",
            len(missing),
            len(bounds),
            missing[:5],
        )
    for name, (lo, hi) in bounds.items():
        if name in tensors and not tensors[name].set_dynamic_range(lo, hi):
            raise ConfigError(f"TensorRT refused the dynamic range ({lo}, {hi}) of tensor {name!r}")
    return len(bounds) - len(missing)


def _calibration_dtype(trt_dtype: Any) -> np.dtype:
    # TensorRT reads calibration data for float inputs as float32, whatever the network type (Polygraphy does the same).
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
    return np.dtype({"INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}.get(name, np.float32))


def _parse_onnx(trt: ModuleType, network: Any, logger: Any, model_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(model_path)):
        return
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    detail = "; ".join(errors[:10]) or "; ".join(logger.errors[-5:]) or "no detail given"
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    raise ModelError(f"TensorRT's ONNX parser rejected {model_path}: {detail}{more}")


def build_engine(
    model_path: str | os.PathLike[str],
    *,
    cache: bytes | str | os.PathLike[str] | None = None,
    calibrator: Any = None,
    dynamic_ranges: Mapping[str, Any] | None = None,
    input_shapes: Mapping[str, ShapeSpec] | None = None,
    calibration_profile: Mapping[str, Sequence[int]] | None = None,
    calibrate_before_fusion: bool | None = None,
    workspace_bytes: int | None = None,
    fp16: bool | None = None,
    builder_optimization_level: int | None = None,
    replay_algorithm: str | None = None,
) -> bytes:
    """Build a serialized INT8 TensorRT engine from an ONNX model.

    Args:
        model_path: the FP32 ONNX model (external data next to it is found by TensorRT).
        cache: a calibration cache (bytes or file) to replay; its header is rewritten for the
            installed TensorRT and `replay_algorithm`, so TensorRT takes its scales as they are.
        calibrator: a live calibrator (e.g. from `make_calibrator`); exclusive with `cache`.
        dynamic_ranges: tensor name -> amax (range ±amax) or (min, max), set with
            ITensor.set_dynamic_range; TensorRT lets them win over calibrated scales. Names
            the network lacks are logged; none matching is a ConfigError.
        input_shapes: optimization-profile shapes of dynamic inputs (see resolve_profile_shapes).
        calibration_profile: input name -> shape TensorRT calibrates at (dynamic inputs only);
            default: the calibrator's first micro-batch, else the profile's opt shape.
        calibrate_before_fusion, workspace_bytes, fp16, builder_optimization_level,
        replay_algorithm: see EngineBuildConfig.

    Returns:
        The serialized engine.

    Raises:
        ConfigError: neither or both of cache/calibrator (dynamic ranges alone are allowed),
            bad shapes or ranges. ModelError: missing model, parser errors, failed build.
        BackendUnavailableError: TensorRT missing, 11+, or no usable GPU.
        Any exception raised inside the calibrator's TensorRT callbacks, after the build.
    """
    build = _config_from(
        EngineBuildConfig,
        workspace_bytes=workspace_bytes,
        calibrate_before_fusion=calibrate_before_fusion,
        fp16=fp16,
        builder_optimization_level=builder_optimization_level,
        replay_algorithm=replay_algorithm,
    )
    if cache is not None and calibrator is not None:
        raise ConfigError(
            "pass either cache= (replay trtcal's scales) or calibrator= (TensorRT calibrates), not both"
        )
    if cache is None and calibrator is None and not dynamic_ranges:
        raise ConfigError("an INT8 engine needs scales: pass cache=, calibrator= or dynamic_ranges=")
    path = Path(model_path)
    if not path.is_file():
        raise ModelError(f"ONNX model {path} does not exist")

    trt = load_tensorrt()
    if cache is not None:
        calibrator = make_replay_calibrator(cache, algorithm=build.replay_algorithm)
    with warnings.catch_warnings():
        # Every calibration API is deprecated since TensorRT 10.1; using them is this adapter's purpose.
        warnings.simplefilter("ignore", DeprecationWarning)
        logger = _make_trt_logger(trt)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(logger, "")
        try:
            builder = trt.Builder(logger)
        except Exception as exc:
            said = "; ".join(logger.errors[-3:])
            raise BackendUnavailableError(
                f"TensorRT could not create a builder ({exc}{'; TensorRT said: ' + said if said else ''}); "
                "TensorRT needs an NVIDIA GPU with a working driver"
            ) from exc
        network = builder.create_network(0)
        _parse_onnx(trt, network, logger, path)

        config = builder.create_builder_config()
        if build.workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, build.workspace_bytes)
        if build.builder_optimization_level is not None:
            config.builder_optimization_level = build.builder_optimization_level
        if not builder.platform_has_fast_int8:
            log.warning("this GPU has no fast INT8; TensorRT may fall back to higher precision")
        config.set_flag(trt.BuilderFlag.INT8)
        if build.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if build.calibrate_before_fusion:
            config.set_quantization_flag(trt.QuantizationFlag.CALIBRATE_BEFORE_FUSION)

        inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
        network_shapes = {name: tuple(tensor.shape) for name, tensor in inputs.items()}
        live = isinstance(calibrator, ArrowBatchCalibrator)
        served: dict[str, tuple[int, ...]] = {}
        if live:
            # A usable cache means TensorRT will not ask for data: then no data is read at all.
            cached = calibrator.read_calibration_cache() is not None
            calibrator.raise_if_failed()
            if not cached:
                served = calibrator.peek_shapes()
        profile_shapes = resolve_profile_shapes(
            network_shapes, input_shapes=input_shapes, calibration_shapes=calibration_profile or served
        )
        if profile_shapes:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile_shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        calibration_shapes = {name: tuple(network_shapes[name]) for name in network_shapes}
        if calibrator is not None:
            dynamic = [name for name, shape in network_shapes.items() if -1 in shape]
            if dynamic:
                chosen = dict(calibration_profile or {})
                unknown = sorted(set(chosen) - set(dynamic))
                if unknown:
                    raise ConfigError(
                        f"calibration_profile names {unknown}, which are not dynamic network inputs {dynamic}"
                    )
                calibration = builder.create_optimization_profile()
                for name in dynamic:
                    shape = _as_shape(
                        chosen.get(name, served.get(name, profile_shapes[name][1])),
                        f"calibration_profile[{name!r}]",
                    )
                    if not _fits(network_shapes[name], shape):
                        raise ConfigError(
                            f"calibration shape {list(shape)} does not fit input {name!r} {list(network_shapes[name])}"
                        )
                    calibration.set_shape(name, shape, shape, shape)
                    calibration_shapes[name] = shape
                if not config.set_calibration_profile(calibration):
                    raise ConfigError(f"TensorRT refused the calibration profile {calibration_shapes}")
            if live:
                for name, shape in served.items():
                    if name in calibration_shapes and not _fits(calibration_shapes[name], shape):
                        raise DataError(
                            f"the calibration batch's micro-batches of input {name!r} are {list(shape)}, but "
                            f"TensorRT calibrates it at {list(calibration_shapes[name])}; set micro_batch (or the "
                            "calibration profile) to match"
                        )
                calibrator.set_input_metadata(
                    {
                        name: (calibration_shapes[name], _calibration_dtype(t.dtype))
                        for name, t in inputs.items()
                    }
                )
            config.int8_calibrator = calibrator
        if dynamic_ranges:
            count = _apply_dynamic_ranges(network, dynamic_ranges)
            log.info("set %d manual dynamic ranges", count)

        log.info("building the INT8 engine of %s with TensorRT %s", path, trt.__version__)
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            if live:
                calibrator.close()
    # Calibrators not made by trtcal (Polygraphy's, say) keep no errors.
    raise_if_failed = getattr(calibrator, "raise_if_failed", None)
    if callable(raise_if_failed):
        raise_if_failed()
    if serialized is None:
        said = "; ".join(logger.errors[-5:]) or "see the TensorRT log"
        raise ModelError(f"TensorRT could not build an INT8 engine of {path}: {said}")
    return bytes(serialized)


def _default_cache_key(model_path: str | os.PathLike[str], batch_source: Any) -> str | None:
    fingerprint = getattr(batch_source, "fingerprint", None)
    if not isinstance(fingerprint, str) or not fingerprint:
        return None  # make_calibrator then asks for cache_key
    digest = hashlib.sha256()
    try:
        with open(model_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ModelError(f"cannot read ONNX model {model_path}: {exc}") from exc
    return f"model:sha256:{digest.hexdigest()}|batch:{fingerprint}"


def calibrate_with_tensorrt(
    model_path: str | os.PathLike[str],
    batch_source: BatchSource,
    *,
    algorithm: str,
    micro_batch: int | None,
    trt_version: str | int | None = None,
    cache: CacheTarget | None = None,
    cache_key: str | None = None,
    partial_batch: PartialBatchPolicy | None = None,
    quantile: float | None = None,
    regression_cutoff: float | None = None,
    input_shapes: Mapping[str, ShapeSpec] | None = None,
    calibrate_before_fusion: bool | None = None,
    workspace_bytes: int | None = None,
    device_memory: DeviceMemory | None = None,
    progress: ProgressCallback = NO_PROGRESS,
) -> bytes:
    """Let TensorRT 10 calibrate `model_path` on `batch_source`; return the cache it wrote.

    The backend of `trtcal calibrate --backend tensorrt` (run where the calibration actor has a
    GPU). TensorRT only calibrates while building an engine, so one engine is built and dropped.

    Args:
        trt_version: target TensorRT version for the returned cache's header; None keeps the
            installed version's header as TensorRT wrote it.
        cache, cache_key: where TensorRT's cache is kept (see make_calibrator). With a store and
            no `cache_key`, a CalibrationBatch's fingerprint and the model's sha256 make one.
        Others: see make_calibrator and build_engine.

    Raises:
        Everything make_calibrator and build_engine raise; ModelError if TensorRT wrote no cache.
    """
    if cache_key is None and cache is not None and not isinstance(cache, (str, os.PathLike)):
        cache_key = _default_cache_key(model_path, batch_source)
    with make_calibrator(
        algorithm,
        batch_source,
        cache=cache,
        cache_key=cache_key,
        micro_batch=micro_batch,
        partial_batch=partial_batch,
        quantile=quantile,
        regression_cutoff=regression_cutoff,
        device_memory=device_memory,
        progress=progress,
    ) as calibrator:
        build_engine(
            model_path,
            calibrator=calibrator,
            input_shapes=input_shapes,
            calibrate_before_fusion=calibrate_before_fusion,
            workspace_bytes=workspace_bytes,
        )
        data = calibrator.calibration_cache
    if data is None:
        raise ModelError(
            f"TensorRT built {model_path} without writing a calibration cache (no tensor of the network was calibrated)"
        )
    if trt_version is not None:
        from trtcal.core import trt_version_int

        data = rewrite_cache_header(data, trt_version=trt_version, algorithm=calibrator.config.algorithm)
        if trt_version_int(trt_version) != calibrator.trt_version:
            log.warning(
                "the cache was computed by TensorRT %s and relabelled for TensorRT %s; TensorRT versions may "
                "name or fuse tensors differently",
                calibrator.trt_version,
                trt_version,
            )
    return data
