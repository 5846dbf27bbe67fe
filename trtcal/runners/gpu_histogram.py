"""Pass-1 statistics and pass-2 histograms computed where the activations live (GPU or CPU).

The activations of a micro-batch are reduced in place on their device; only the small results
(4 numbers and `num_bins` counts per tensor) come back to the host, once per pass.

Two kernel backends compute the same numbers:

* ``"cupy"``: two CUDA C kernels compiled at run time by CuPy (NVRTC), launched on PyTorch's
  current stream over the tensor's memory. One read of the activation per pass: vectorised
  16-byte loads, per-block shared-memory histograms (bins 0 and ``num_bins - 1``, where ReLU6
  zeros and saturated values pile up, are counted in registers so they do not serialise the
  shared-memory atomics). Used for float32 CUDA tensors when CuPy is installed.
* ``"torch"``: plain PyTorch operators (abs, clamp, multiply, truncate, ``bincount``); runs on
  any device, CPU included, and is the CPU path tested in CI.

Both follow `trtcal.core.histogram`'s bin rule exactly: ``inv_width = float32(num_bins) /
float32(hist_amax)`` computed in float32 on the host, ``bin = min(trunc(float32(min(|x|,
float32(hist_amax))) * inv_width), num_bins - 1)`` with a single rounding float32 multiply, so
given the same activations both produce counts identical to `trtcal.core.fill_counts`, and
statistics equal to `trtcal.core.reduce_stats`. NaN and Inf are counted, never binned; with
``nonfinite="error"`` the collectors raise `NonFiniteError` when the results are read (the
device does not stop mid-pass: that would cost a host synchronisation per tensor).

Nothing here synchronises with the device until `results()`; `update()` only enqueues work.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from trtcal.core.histogram import DEFAULT_NUM_BINS, Histogram, NonFinitePolicy, TensorStats
from trtcal.errors import BackendUnavailableError, ConfigError, DataError, NonFiniteError

if TYPE_CHECKING:
    import torch

__all__ = [
    "KernelBackend",
    "DeviceStatsCollector",
    "DeviceHistogramCollector",
    "hist_inv_width",
    "reduce_stats_device",
    "fill_counts_device",
    "resolve_backend",
    "cupy_available",
]

log = logging.getLogger(__name__)

KernelBackend = Literal["auto", "torch", "cupy"]
_BACKENDS = ("auto", "torch", "cupy")

# torch path: elements per chunk (bounds the int64 index temporaries: 8 bytes per element).
_TORCH_CHUNK_CUDA = 1 << 24
_TORCH_CHUNK_CPU = 1 << 20
# cupy path: elements per launch, so per-thread and per-block uint32 counters cannot overflow.
_CUPY_LAUNCH_MAX = 1 << 30
_KEY_EMPTY_MIN = 0xFFFFFFFF  # order key above every finite float32
_KEY_EMPTY_MAX = 0  # order key below every finite float32


def _check_policy(nonfinite: str) -> None:
    if nonfinite not in ("error", "ignore"):
        raise ConfigError(f"nonfinite policy must be 'error' or 'ignore', got {nonfinite!r}")


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ConfigError(f"kernel backend must be one of {_BACKENDS}, got {backend!r}")


def hist_inv_width(num_bins: int, hist_amax: float, *, tensor: str = "tensor") -> tuple[float, float]:
    """(float32(hist_amax), inv_width) as Python floats holding exact float32 values.

    `inv_width` is 0.0 when `hist_amax` is 0 (every finite value lands in bin 0, as on the CPU).

    Raises:
        ConfigError: `num_bins` < 1, `hist_amax` negative or not finite. A range so small that
            float32(num_bins) / float32(hist_amax) overflows is degenerate (bin 0), as in trtcal.core.
    """
    if num_bins < 1:
        raise ConfigError(f"num_bins must be >= 1, got {num_bins}")
    if not (np.isfinite(hist_amax) and hist_amax >= 0.0):
        raise ConfigError(f"hist_amax must be finite and >= 0, got {hist_amax!r} for tensor {tensor!r}")
    if hist_amax <= 0.0:
        return 0.0, 0.0
    with np.errstate(over="ignore", divide="ignore"):
        amax32 = np.float32(hist_amax)  # may round to inf above float32's range: inv_width 0, as on the CPU
        inv = np.float32(num_bins) / amax32
    if not (amax32 > 0 and np.isfinite(inv)):
        return 0.0, 0.0  # degenerate range, as trtcal.core: every finite value lands in bin 0
    return float(amax32), float(inv)


def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:  # ImportError, or CUDA driver errors raised as CUDARuntimeError
        return False


def resolve_backend(backend: KernelBackend, device: torch.device) -> Literal["torch", "cupy"]:
    """The backend that will run on `device`: "cupy" needs a CUDA device and CuPy."""
    _check_backend(backend)
    if backend == "torch":
        return "torch"
    on_cuda = device.type == "cuda"
    if backend == "cupy":
        if not on_cuda:
            raise ConfigError(f"kernel backend 'cupy' needs a CUDA device, got {device}; use 'torch' or 'auto'")
        if not cupy_available():
            raise BackendUnavailableError(
                "kernel backend 'cupy' was asked for but CuPy is not installed or sees no GPU; "
                "install cupy-cuda12x/cupy-cuda13x matching your CUDA, or use backend 'torch'"
            )
        return "cupy"
    return "cupy" if on_cuda and cupy_available() else "torch"


# ------------------------------------------------------------------------------------------------
# CUDA kernels (CuPy RawModule)
# ------------------------------------------------------------------------------------------------

_CUDA_SOURCE = r"""
#define FULL_MASK 0xffffffffu
#ifndef UNROLL
#define UNROLL 4
#endif
#ifndef REPLICAS
#define REPLICAS 4
#endif

// Order-preserving key of a float32: unsigned comparison of keys == float comparison, with
// -0.0 < +0.0. Integer min/max atomics on keys give an exact, order-independent min/max.
__device__ __forceinline__ unsigned int order_key(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct StatsAcc { unsigned int kmin, kmax, nan_c, inf_c; };

__device__ __forceinline__ void stats_one(StatsAcc& s, float f) {
    float a = fabsf(f);
    if (a == __int_as_float(0x7f800000)) { s.inf_c++; }
    else if (a != a) { s.nan_c++; }
    else { unsigned int k = order_key(f); s.kmin = min(s.kmin, k); s.kmax = max(s.kmax, k); }
}

// acc: [min_key, max_key, nan_count, inf_count] as unsigned 64-bit (a torch int64 tensor).
extern "C" __global__ void trtcal_stats_f32(const float* __restrict__ x, long long n,
                                            unsigned long long* __restrict__ acc) {
    StatsAcc s = {0xffffffffu, 0u, 0u, 0u};
    const long long n4 = n >> 2;
    const float4* __restrict__ x4 = reinterpret_cast<const float4*>(x);
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long base = tid; base < n4; base += stride * UNROLL) {
        float4 v[UNROLL];
        #pragma unroll
        for (int j = 0; j < UNROLL; j++) {
            long long i = base + j * stride;
            if (i < n4) v[j] = __ldcs(x4 + i);
        }
        #pragma unroll
        for (int j = 0; j < UNROLL; j++) {
            if (base + j * stride < n4) {
                stats_one(s, v[j].x); stats_one(s, v[j].y); stats_one(s, v[j].z); stats_one(s, v[j].w);
            }
        }
    }
    for (long long i = (n4 << 2) + tid; i < n; i += stride) stats_one(s, x[i]);
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        s.kmin = min(s.kmin, __shfl_xor_sync(FULL_MASK, s.kmin, off));
        s.kmax = max(s.kmax, __shfl_xor_sync(FULL_MASK, s.kmax, off));
        s.nan_c += __shfl_xor_sync(FULL_MASK, s.nan_c, off);
        s.inf_c += __shfl_xor_sync(FULL_MASK, s.inf_c, off);
    }
    if ((threadIdx.x & 31) == 0) {
        if (s.kmin != 0xffffffffu) atomicMin(acc + 0, (unsigned long long)s.kmin);
        if (s.kmax != 0u) atomicMax(acc + 1, (unsigned long long)s.kmax);
        if (s.nan_c) atomicAdd(acc + 2, (unsigned long long)s.nan_c);
        if (s.inf_c) atomicAdd(acc + 3, (unsigned long long)s.inf_c);
    }
}

struct HistAcc { unsigned int lo, hi, nonfinite; };

// trtcal.core's bin rule: clamp |x| to amax, ONE float32 multiply (no FMA contraction: __fmul_rn),
// truncate, clamp to the last bin. Bins 0 and last are counted in registers.
__device__ __forceinline__ void bin_one(HistAcc& h, unsigned int* __restrict__ sh, float f,
                                        float amax, float inv_w, int last) {
    float a = fabsf(f);
    if (!(a <= 3.402823466e38f)) { h.nonfinite++; return; }  // NaN fails every comparison
    a = fminf(a, amax);
    int b = __float2int_rz(__fmul_rn(a, inv_w));
    b = min(b, last);
    if (b == 0) h.lo++;
    else if (b == last) h.hi++;
    else atomicAdd(sh + b, 1u);
}

// counts: [num_bins] unsigned 64-bit; nonfinite: [1] unsigned 64-bit. Shared: REPLICAS * num_bins.
extern "C" __global__ void trtcal_hist_f32(const float* __restrict__ x, long long n, float amax,
                                           float inv_w, int num_bins,
                                           unsigned long long* __restrict__ counts,
                                           unsigned long long* __restrict__ nonfinite) {
    extern __shared__ unsigned int sh_all[];
    for (int i = threadIdx.x; i < REPLICAS * num_bins; i += blockDim.x) sh_all[i] = 0u;
    __syncthreads();
    unsigned int* sh = sh_all + ((threadIdx.x >> 5) % REPLICAS) * num_bins;
    const int last = num_bins - 1;
    HistAcc h = {0u, 0u, 0u};
    const long long n4 = n >> 2;
    const float4* __restrict__ x4 = reinterpret_cast<const float4*>(x);
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long base = tid; base < n4; base += stride * UNROLL) {
        float4 v[UNROLL];
        #pragma unroll
        for (int j = 0; j < UNROLL; j++) {
            long long i = base + j * stride;
            if (i < n4) v[j] = __ldcs(x4 + i);
        }
        #pragma unroll
        for (int j = 0; j < UNROLL; j++) {
            if (base + j * stride < n4) {
                bin_one(h, sh, v[j].x, amax, inv_w, last); bin_one(h, sh, v[j].y, amax, inv_w, last);
                bin_one(h, sh, v[j].z, amax, inv_w, last); bin_one(h, sh, v[j].w, amax, inv_w, last);
            }
        }
    }
    for (long long i = (n4 << 2) + tid; i < n; i += stride) bin_one(h, sh, x[i], amax, inv_w, last);
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        h.lo += __shfl_xor_sync(FULL_MASK, h.lo, off);
        h.hi += __shfl_xor_sync(FULL_MASK, h.hi, off);
        h.nonfinite += __shfl_xor_sync(FULL_MASK, h.nonfinite, off);
    }
    if ((threadIdx.x & 31) == 0) {
        if (h.lo) atomicAdd(sh + 0, h.lo);
        if (h.hi) atomicAdd(sh + last, h.hi);
        if (h.nonfinite) atomicAdd(nonfinite, (unsigned long long)h.nonfinite);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < num_bins; b += blockDim.x) {
        unsigned long long total = 0;
        #pragma unroll
        for (int r = 0; r < REPLICAS; r++) total += sh_all[r * num_bins + b];
        if (total) atomicAdd(counts + b, total);
    }
}
"""

_THREADS = 512
_REPLICAS = 4
_UNROLL = 4


class _CupyKernels:
    """The compiled kernels of one CUDA device (compiled once per process and device)."""

    _lock = threading.Lock()
    _by_device: dict[int, _CupyKernels] = {}

    def __init__(self, device_index: int) -> None:
        import cupy

        with cupy.cuda.Device(device_index):
            module = cupy.RawModule(
                code=_CUDA_SOURCE,
                options=("-std=c++17", f"-DREPLICAS={_REPLICAS}", f"-DUNROLL={_UNROLL}"),
            )
            self.stats = module.get_function("trtcal_stats_f32")
            self.hist = module.get_function("trtcal_hist_f32")
            props = cupy.cuda.runtime.getDeviceProperties(device_index)
        self.device_index = device_index
        self.num_sms = int(props["multiProcessorCount"])
        self.max_blocks = self.num_sms * (2048 // _THREADS)

    @classmethod
    def get(cls, device_index: int) -> _CupyKernels:
        with cls._lock:
            kernels = cls._by_device.get(device_index)
            if kernels is None:
                kernels = cls._by_device[device_index] = cls(device_index)
            return kernels

    def _grid(self, n: int) -> int:
        per_block = _THREADS * 4 * _UNROLL
        return max(1, min(self.max_blocks, -(-n // per_block)))

    def launch(self, fn: Any, grid: int, args: tuple[Any, ...], shared_mem: int, device: torch.device) -> None:
        import cupy
        import torch

        stream = torch.cuda.current_stream(device)
        with cupy.cuda.Device(self.device_index), cupy.cuda.ExternalStream(stream.cuda_stream):
            fn((grid,), (_THREADS,), args, shared_mem=shared_mem)


def _flat_float32_cuda(x: torch.Tensor) -> torch.Tensor:
    """x as one contiguous, 16-byte-aligned float32 vector on its device (a view when it already is)."""
    import torch

    flat = x.reshape(-1).to(torch.float32).contiguous()
    if flat.data_ptr() % 16:  # an offset view: the float4 loads need alignment
        flat = flat.clone()
    return flat


def _keys_to_float(keys: npt.NDArray[np.uint32]) -> npt.NDArray[np.float32]:
    """Inverse of the kernels' order_key."""
    keys = keys.astype(np.uint32)
    bits = np.where(keys & np.uint32(0x80000000), keys & np.uint32(0x7FFFFFFF), ~keys).astype(np.uint32)
    return bits.view(np.float32)


def _stats_from_counts(
    *, vmin: float, vmax: float, total: int, nan_count: int, inf_count: int, tensor: str, nonfinite: str
) -> TensorStats:
    if nan_count or inf_count:
        if nonfinite == "error":
            raise NonFiniteError(
                f"tensor {tensor!r} holds {nan_count} NaN and {inf_count} Inf values; the FP32 model produces "
                "non-finite activations on this data. Check the input preprocessing, or pass "
                "nonfinite='ignore' (--on-nonfinite ignore) to skip them (they are counted in the report)",
                tensor=tensor,
                nan_count=nan_count,
                inf_count=inf_count,
            )
    count = total - nan_count - inf_count
    if count == 0:
        return TensorStats(nan_count=nan_count, inf_count=inf_count)
    return TensorStats(
        amax=float(max(abs(vmin), abs(vmax))),
        min=vmin,
        max=vmax,
        count=count,
        nan_count=nan_count,
        inf_count=inf_count,
    )


def _device_of(device: str | torch.device | None) -> torch.device:
    import torch

    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class _Registry:
    """Tensor name -> row of the collectors' device buffers."""

    def __init__(self, names: Sequence[str]) -> None:
        if len(set(names)) != len(names):
            raise ConfigError("tensor names given to a collector must be unique")
        self.names = list(names)
        self.row = {name: i for i, name in enumerate(self.names)}

    def index(self, name: str) -> int:
        try:
            return self.row[name]
        except KeyError:
            raise ConfigError(f"tensor {name!r} was not registered with this collector") from None


class DeviceStatsCollector:
    """Pass 1 for a fixed set of tensors, accumulated on one device without host synchronisation.

    Args:
        tensors: names of the tensors that will be passed to `update`.
        device: where the activations live ("cuda", "cuda:1", "cpu"; default: the current GPU, else CPU).
        backend: "auto" (CuPy kernels for float32 CUDA tensors when CuPy is installed, else torch),
            "torch" or "cupy".
    """

    def __init__(
        self, tensors: Sequence[str], *, device: str | torch.device | None = None, backend: KernelBackend = "auto"
    ) -> None:
        import torch

        self.device = _device_of(device)
        self.backend = resolve_backend(backend, self.device)
        self._reg = _Registry(tensors)
        n = len(self._reg.names)
        self._totals = [0] * n  # elements seen per tensor: known on the host, no sync needed
        # cupy: [min_key, max_key, nan, inf]; torch: counts [nan, inf] + float64 min/max.
        self._acc = torch.zeros((n, 4), dtype=torch.int64, device=self.device)
        self._acc[:, 0] = _KEY_EMPTY_MIN
        self._acc[:, 1] = _KEY_EMPTY_MAX
        self._fmin = torch.full((n,), float("inf"), dtype=torch.float64, device=self.device)
        self._fmax = torch.full((n,), float("-inf"), dtype=torch.float64, device=self.device)
        self._kernels = _CupyKernels.get(self.device.index or 0) if self.backend == "cupy" else None

    @property
    def tensors(self) -> list[str]:
        return list(self._reg.names)

    def update(self, name: str, x: torch.Tensor) -> None:
        """Fold one micro-batch of tensor `name` (any shape) into the running statistics."""
        import torch

        row = self._reg.index(name)
        if x.device != self.device:
            raise ConfigError(f"tensor {name!r} is on {x.device}, but this collector runs on {self.device}")
        if not (x.is_floating_point() or x.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)):
            raise DataError(f"tensor {name!r} has non-numeric dtype {x.dtype}")
        n = x.numel()
        if n == 0:
            return
        self._totals[row] += n
        if self._kernels is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            flat = _flat_float32_cuda(x)  # f16/bf16 -> f32 is exact: same min/max
            for start in range(0, n, _CUPY_LAUNCH_MAX):
                part = flat[start : start + _CUPY_LAUNCH_MAX]
                k = self._kernels
                k.launch(
                    k.stats,
                    k._grid(part.numel()),
                    (np.uint64(part.data_ptr()), np.int64(part.numel()), np.uint64(self._acc[row].data_ptr())),
                    0,
                    self.device,
                )
            return
        self._update_torch(row, x)

    def _update_torch(self, row: int, x: torch.Tensor) -> None:
        import torch

        flat = x.reshape(-1)
        if not flat.is_floating_point():
            flat = flat.to(torch.float64)
        if not flat.is_cuda:  # CPU: a finite check costs no device sync, so take the one-pass route
            lo, hi = torch.aminmax(flat)
            if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
                self._fmin[row] = torch.minimum(self._fmin[row], lo.to(torch.float64))
                self._fmax[row] = torch.maximum(self._fmax[row], hi.to(torch.float64))
                return
        finite = torch.isfinite(flat)
        nan = torch.isnan(flat).sum()
        bad = flat.numel() - finite.sum()
        self._acc[row, 2] += nan
        self._acc[row, 3] += bad - nan
        inf = torch.tensor(float("inf"), dtype=flat.dtype, device=flat.device)
        lo = torch.where(finite, flat, inf).amin().to(torch.float64)
        hi = torch.where(finite, flat, -inf).amax().to(torch.float64)
        self._fmin[row] = torch.minimum(self._fmin[row], lo)
        self._fmax[row] = torch.maximum(self._fmax[row], hi)

    def results(self, *, nonfinite: NonFinitePolicy = "error") -> dict[str, TensorStats]:
        """Copy the statistics back (one synchronisation) as `trtcal.core.TensorStats` per tensor.

        Raises:
            NonFiniteError: a tensor held NaN/Inf and `nonfinite == "error"` (the first such tensor
                in registration order is named).
        """
        _check_policy(nonfinite)
        acc = self._acc.cpu().numpy()
        fmin = self._fmin.cpu().numpy()
        fmax = self._fmax.cpu().numpy()
        kmin = _keys_to_float(acc[:, 0].astype(np.uint64).astype(np.uint32))
        kmax = _keys_to_float(acc[:, 1].astype(np.uint64).astype(np.uint32))
        out: dict[str, TensorStats] = {}
        for i, name in enumerate(self._reg.names):
            # A tensor may have gone through both paths (e.g. a float64 micro-batch): take both.
            lo = min(float(fmin[i]), float(kmin[i]) if acc[i, 0] != _KEY_EMPTY_MIN else float("inf"))
            hi = max(float(fmax[i]), float(kmax[i]) if acc[i, 1] != _KEY_EMPTY_MAX else float("-inf"))
            out[name] = _stats_from_counts(
                vmin=lo,
                vmax=hi,
                total=self._totals[i],
                nan_count=int(acc[i, 2]),
                inf_count=int(acc[i, 3]),
                tensor=name,
                nonfinite=nonfinite,
            )
        return out


class DeviceHistogramCollector:
    """Pass 2 for a fixed set of tensors: integer counts of |x| on [0, hist_amax], on one device.

    Args:
        hist_amax: tensor name -> the range of its histogram (pass 1's merged amax).
        num_bins: bins per histogram.
        device, backend: as for `DeviceStatsCollector`.

    Raises:
        ConfigError: a bad `num_bins` or `hist_amax` (see `hist_inv_width`).
    """

    def __init__(
        self,
        hist_amax: Mapping[str, float],
        *,
        num_bins: int = DEFAULT_NUM_BINS,
        device: str | torch.device | None = None,
        backend: KernelBackend = "auto",
    ) -> None:
        import torch

        self.device = _device_of(device)
        self.backend = resolve_backend(backend, self.device)
        self.num_bins = int(num_bins)
        self._reg = _Registry(list(hist_amax))
        self._amax = {name: float(v) for name, v in hist_amax.items()}
        self._rule = {name: hist_inv_width(self.num_bins, v, tensor=name) for name, v in self._amax.items()}
        n = len(self._reg.names)
        self._counts = torch.zeros((n, self.num_bins), dtype=torch.int64, device=self.device)
        self._nonfinite = torch.zeros((n, 2), dtype=torch.int64, device=self.device)  # [nan+inf, -]
        self._kernels = _CupyKernels.get(self.device.index or 0) if self.backend == "cupy" else None
        if self._kernels is not None:
            shared = 4 * _REPLICAS * self.num_bins
            if shared > 48 * 1024:
                # Above 48 KB a kernel must opt in per launch configuration; torch ops handle it.
                log.info("num_bins=%d needs %d bytes of shared memory; using torch kernels", self.num_bins, shared)
                self._kernels = None
                self.backend = "torch"

    @property
    def tensors(self) -> list[str]:
        return list(self._reg.names)

    def update(self, name: str, x: torch.Tensor) -> None:
        """Add one micro-batch of tensor `name` (any shape) to its histogram."""
        import torch

        row = self._reg.index(name)
        if x.device != self.device:
            raise ConfigError(f"tensor {name!r} is on {x.device}, but this collector runs on {self.device}")
        n = x.numel()
        if n == 0:
            return
        amax32, inv_w = self._rule[name]
        if self._kernels is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            flat = _flat_float32_cuda(x)  # the CPU rule also casts to float32 first (RNE)
            k = self._kernels
            for start in range(0, n, _CUPY_LAUNCH_MAX):
                part = flat[start : start + _CUPY_LAUNCH_MAX]
                k.launch(
                    k.hist,
                    k._grid(part.numel()),
                    (
                        np.uint64(part.data_ptr()),
                        np.int64(part.numel()),
                        np.float32(amax32),
                        np.float32(inv_w),
                        np.int32(self.num_bins),
                        np.uint64(self._counts[row].data_ptr()),
                        np.uint64(self._nonfinite[row].data_ptr()),
                    ),
                    4 * _REPLICAS * self.num_bins,
                    self.device,
                )
            return
        self._update_torch(row, x, amax32, inv_w)

    def _update_torch(self, row: int, x: torch.Tensor, amax32: float, inv_w: float) -> None:
        import torch

        flat = x.reshape(-1)
        on_cpu = not flat.is_cuda
        chunk = min(flat.numel(), _TORCH_CHUNK_CPU if on_cpu else _TORCH_CHUNK_CUDA)
        last = self.num_bins - 1
        counts = self._counts[row]
        # Scratch reused across chunks: fresh large CPU allocations cost page faults on every chunk.
        buf = torch.empty(chunk, dtype=torch.float32, device=flat.device)
        idx_buf = torch.empty(chunk, dtype=torch.int64, device=flat.device)
        ones = torch.ones(chunk, dtype=torch.int64, device=flat.device) if on_cpu else None
        for start in range(0, flat.numel(), chunk):
            part = flat[start : start + chunk]
            a, idx = buf[: part.numel()], idx_buf[: part.numel()]
            torch.abs(part.to(torch.float32), out=a)
            if on_cpu and bool(torch.isfinite(a.max())):  # CPU: checking costs no device sync
                bad: Any = 0
            else:
                bad = a.numel() - torch.isfinite(a).sum()
                # NaN/Inf go to bin 0 here and are taken out of it below: exact, no masking pass.
                torch.nan_to_num_(a, nan=0.0, posinf=0.0, neginf=0.0)
            a.clamp_max_(amax32).mul_(inv_w)  # float32 * float32 scalar (exactly representable): one rounding
            idx.copy_(a).clamp_max_(last)  # float -> int64 truncates; == floor for |x| >= 0
            if ones is not None:  # scatter_add is the fastest exact integer histogram on the CPU
                counts.scatter_add_(0, idx, ones[: idx.numel()])
            else:  # bincount accumulates in shared memory on the GPU
                counts += torch.bincount(idx, minlength=self.num_bins)
            counts[0] -= bad
            self._nonfinite[row, 0] += bad

    def results(
        self, *, nonfinite: NonFinitePolicy = "error", stats: Mapping[str, TensorStats] | None = None
    ) -> dict[str, Histogram]:
        """Copy the histograms back (one synchronisation) as `trtcal.core.Histogram` per tensor.

        Args:
            nonfinite: "error" raises NonFiniteError for the first tensor that held NaN/Inf.
            stats: pass-1 statistics attached to each Histogram (default: empty TensorStats).
        """
        _check_policy(nonfinite)
        counts = self._counts.cpu().numpy()
        bad = self._nonfinite.cpu().numpy()
        out: dict[str, Histogram] = {}
        for i, name in enumerate(self._reg.names):
            if bad[i, 0] and nonfinite == "error":
                raise NonFiniteError(
                    f"tensor {name!r} holds {int(bad[i, 0])} NaN or Inf values in the histogram pass; the FP32 "
                    "model produces non-finite activations on this data. Check the input preprocessing, or "
                    "pass nonfinite='ignore' (--on-nonfinite ignore) to skip them",
                    tensor=name,
                )
            out[name] = Histogram(
                counts=counts[i].astype(np.int64, copy=True),
                hist_amax=self._amax[name],
                stats=(stats or {}).get(name, TensorStats()),
            )
        return out

    def nonfinite_counts(self) -> dict[str, int]:
        """NaN + Inf values skipped per tensor so far (synchronises)."""
        bad = self._nonfinite[:, 0].cpu().numpy()
        return {name: int(bad[i]) for i, name in enumerate(self._reg.names)}


# ------------------------------------------------------------------------------------------------
# One-shot functions with trtcal.core's signatures (used by tests and small callers)
# ------------------------------------------------------------------------------------------------


def reduce_stats_device(
    x: torch.Tensor, *, tensor: str = "tensor", nonfinite: NonFinitePolicy = "error", backend: KernelBackend = "auto"
) -> TensorStats:
    """`trtcal.core.reduce_stats` of a torch tensor, computed on its device."""
    _check_policy(nonfinite)
    collector = DeviceStatsCollector([tensor], device=x.device, backend=backend)
    collector.update(tensor, x)
    return collector.results(nonfinite=nonfinite)[tensor]


def fill_counts_device(
    x: torch.Tensor,
    num_bins: int,
    hist_amax: float,
    *,
    tensor: str = "tensor",
    nonfinite: NonFinitePolicy = "error",
    backend: KernelBackend = "auto",
) -> npt.NDArray[np.int64]:
    """`trtcal.core.fill_counts` of a torch tensor, computed on its device."""
    _check_policy(nonfinite)
    collector = DeviceHistogramCollector({tensor: hist_amax}, num_bins=num_bins, device=x.device, backend=backend)
    collector.update(tensor, x)
    return collector.results(nonfinite=nonfinite)[tensor].counts
