"""The calibrators TensorRT calls: `ArrowBatchCalibrator` (serves a batch through device buffers) and
`CacheReplayCalibrator` (hands TensorRT a trtcal cache), made by `make_calibrator` /
`make_replay_calibrator` as subclasses of the TensorRT base class of the algorithm.

TensorRT swallows exceptions raised inside calibrator methods (it prints them and goes on). Every
method TensorRT calls is therefore trapped: the exception is logged with its context, kept on the
calibrator, and `build_engine` raises it once TensorRT returns.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

from trtcal.errors import (
    BackendUnavailableError,
    CacheFormatError,
    ConfigError,
    DataError,
    StorageError,
)
from trtcal.progress import NO_PROGRESS, ProgressCallback
from trtcal.runners.tensorrt.cache import (
    CacheTarget,
    _bind_cache,
    _CacheBinding,
    rewrite_cache_header,
    tensorrt_cache_key,
)
from trtcal.runners.tensorrt.config import (
    _VERIFIED_HEADER_ALGORITHMS,
    ALGORITHM_BASE_CLASSES,
    CalibratorConfig,
    EngineBuildConfig,
    PartialBatchPolicy,
    _config_from,
)
from trtcal.runners.tensorrt.device_memory import DeviceBatchBuffers, DeviceMemory, load_device_memory
from trtcal.runners.tensorrt.feed import STAGE, BatchSource, _count_micro_batches, iter_micro_batches
from trtcal.runners.tensorrt.version import _trt_version_int, load_tensorrt

log = logging.getLogger(__name__)


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
