"""Calibration caches for live calibrators: header rewriting, cache keys, file and store bindings."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from trtcal._version import FORMAT_VERSION
from trtcal.errors import (
    CacheFormatError,
    ConfigError,
    StorageError,
)

log = logging.getLogger(__name__)


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
