"""Device buffers for calibration data: cuda-python's runtime, or pycuda where that is what is installed."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from trtcal.errors import (
    BackendUnavailableError,
    DataError,
)

log = logging.getLogger(__name__)


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

    def free_bytes(self) -> int:
        free, _total = self._check(self._cudart.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free)


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
