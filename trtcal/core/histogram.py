"""Histograms of |x| for calibration, filled from micro-batches.

Two modes:

* **Exact two-pass** (trtcal's default). Pass 1 reduces `TensorStats` (exact max |x|, signed
  min/max, NaN/Inf counts) over the whole calibration batch; pass 2 fills an integer histogram
  of |x| on the fixed range [0, amax]. Integer counts and maxima are associative, so shards
  merge bit-identically in any order and grouping.
* **Growing** (TensorRT-compatible, for measuring order sensitivity). The first micro-batch
  sets the range; when a later value exceeds it, the range doubles (possibly several times)
  and adjacent bin pairs merge into the lower half, as TensorRT's developer guide describes.

Bin rule (shared with the GPU kernels, so both give identical counts): with
`inv_width = float32(num_bins) / float32(hist_amax)` computed in float32,
`bin(x) = min(floor(float32(|x|) * inv_width), num_bins - 1)`; values equal to `hist_amax`
land in the last bin. If `hist_amax == 0`, or it is so small (< ~1e-35) that `inv_width`
overflows float32, the range is degenerate and every value lands in bin 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from trtcal.errors import ConfigError, DataError, NonFiniteError

__all__ = [
    "DEFAULT_NUM_BINS",
    "NonFinitePolicy",
    "TensorStats",
    "Histogram",
    "reduce_stats",
    "merge_stats",
    "bin_indices",
    "fill_counts",
    "histogram_of",
    "merge_histograms",
    "GrowingHistogram",
]

DEFAULT_NUM_BINS = 2048
NonFinitePolicy = Literal["error", "ignore"]

# Elements per chunk when filling: keeps temporaries in L2 so the fill is one pass over memory.
_CHUNK = 1 << 16
# np.add.at got a fast path for 1-d integer indices in numpy 1.25 (about 1.5x faster than
# np.bincount, which scans the indices for their min and max before counting); both are exact.
_ADD_AT_IS_FAST = np.lib.NumpyVersion(np.__version__) >= "1.25.0"

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True)
class TensorStats:
    """Pass-1 statistics of one tensor over everything seen so far (exactly mergeable)."""

    amax: float = 0.0  # max |x| over finite values
    min: float = float("inf")  # signed min over finite values
    max: float = float("-inf")  # signed max over finite values
    count: int = 0  # finite values seen
    nan_count: int = 0
    inf_count: int = 0


@dataclass(frozen=True, eq=False)
class Histogram:
    """Integer counts of |x| over [0, hist_amax] in `len(counts)` equal bins."""

    counts: npt.NDArray[np.int64]
    hist_amax: float
    stats: TensorStats = field(default_factory=TensorStats)

    @property
    def num_bins(self) -> int:
        return int(self.counts.shape[0])

    @property
    def bin_width(self) -> float:
        return self.hist_amax / self.num_bins

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return (
            self.hist_amax == other.hist_amax
            and self.stats == other.stats
            and np.array_equal(self.counts, other.counts)
        )

    __hash__ = None  # type: ignore[assignment]


def _check_policy(policy: str) -> None:
    if policy not in ("error", "ignore"):
        raise ConfigError(f"nonfinite policy must be 'error' or 'ignore', got {policy!r}")


def reduce_stats(x: npt.ArrayLike, *, tensor: str = "tensor", nonfinite: NonFinitePolicy = "error") -> TensorStats:
    """Pass 1 over one micro-batch: exact max |x|, signed min/max, NaN/Inf counts.

    Raises NonFiniteError naming `tensor` when NaN/Inf occur and `nonfinite == "error"`.
    """
    _check_policy(nonfinite)
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"tensor {tensor!r} has non-numeric dtype {arr.dtype}")
    flat = arr.reshape(-1)
    if flat.size == 0:
        return TensorStats()
    if np.issubdtype(flat.dtype, np.integer):
        flat = flat.astype(np.float64)
    mn = flat.min()
    mx = flat.max()
    nan_count = inf_count = 0
    if not (np.isfinite(mn) and np.isfinite(mx)):
        finite = np.isfinite(flat)
        nan_count = int(np.count_nonzero(np.isnan(flat)))
        inf_count = int(flat.size - np.count_nonzero(finite) - nan_count)
        if nonfinite == "error":
            raise NonFiniteError(
                f"tensor {tensor!r} holds {nan_count} NaN and {inf_count} Inf values; the FP32 model produces "
                "non-finite activations on this data. Check the input preprocessing, or pass "
                "nonfinite='ignore' (--on-nonfinite ignore) to skip them (they are counted in the report)",
                tensor=tensor,
                nan_count=nan_count,
                inf_count=inf_count,
            )
        flat = flat[finite]
        if flat.size == 0:
            return TensorStats(nan_count=nan_count, inf_count=inf_count)
        mn = flat.min()
        mx = flat.max()
    return TensorStats(
        amax=float(max(abs(float(mn)), abs(float(mx)))),
        min=float(mn),
        max=float(mx),
        count=int(flat.size),
        nan_count=nan_count,
        inf_count=inf_count,
    )


def merge_stats(stats: Iterable[TensorStats]) -> TensorStats:
    """Exact, order-independent merge of pass-1 statistics."""
    out = TensorStats()
    for s in stats:
        out = TensorStats(
            amax=max(out.amax, s.amax),
            min=min(out.min, s.min),
            max=max(out.max, s.max),
            count=out.count + s.count,
            nan_count=out.nan_count + s.nan_count,
            inf_count=out.inf_count + s.inf_count,
        )
    return out


def _inv_width(num_bins: int, hist_amax: float) -> np.float32 | None:
    """float32(num_bins) / float32(hist_amax), or None for a degenerate (zero or denormal-tiny) range."""
    amax32 = np.float32(hist_amax)
    if not amax32 > 0:
        return None
    with np.errstate(over="ignore"):
        inv: np.float32 = np.float32(num_bins) / amax32
    return inv if np.isfinite(inv) else None


def bin_indices(abs_x: npt.NDArray[np.float32], num_bins: int, hist_amax: float) -> npt.NDArray[np.intp]:
    """Bin index of each |x| (float32) under the module's bin rule. Pure; does not mutate."""
    inv_width = _inv_width(num_bins, hist_amax)
    if inv_width is None:
        return np.zeros(abs_x.shape, dtype=np.intp)
    scaled = np.minimum(abs_x, np.float32(hist_amax)) * inv_width  # float32 multiply: identical on CPU and GPU
    idx: npt.NDArray[np.intp] = scaled.astype(np.intp)  # truncation == floor for non-negative values
    np.minimum(idx, num_bins - 1, out=idx)
    return idx


def fill_counts(
    x: npt.ArrayLike,
    num_bins: int,
    hist_amax: float,
    *,
    tensor: str = "tensor",
    nonfinite: NonFinitePolicy = "error",
) -> npt.NDArray[np.int64]:
    """Pass 2 over one micro-batch: int64 counts of |x| on [0, hist_amax].

    Values above `hist_amax` (impossible in exact two-pass mode) are clamped into the last bin.
    Non-finite values raise NonFiniteError (policy "error") or are skipped (policy "ignore").

    Each chunk of `_CHUNK` values takes the fast path when its largest scaled value is at most
    `float32(hist_amax) * inv_width` (always, in exact two-pass mode): `|x * inv_width|` is then
    exactly the clamped product of the bin rule (float32 rounding is symmetric in sign and
    monotonic), and indices past the last bin are folded into it after counting. Any other
    chunk (NaN, Inf, values above the range) goes through `_fill_chunk_clamped`, the bin rule
    step by step, so the counts never depend on which path a chunk took.
    """
    _check_policy(nonfinite)
    if num_bins < 1:
        raise ConfigError(f"num_bins must be >= 1, got {num_bins}")
    if not (np.isfinite(hist_amax) and hist_amax >= 0.0):
        raise ConfigError(f"hist_amax must be finite and >= 0, got {hist_amax!r} for tensor {tensor!r}")
    flat = np.asarray(x).reshape(-1)
    counts = np.zeros(num_bins, dtype=np.int64)
    if flat.size == 0:
        return counts
    inv_width = _inv_width(num_bins, hist_amax)
    if inv_width is None:
        finite = int(np.count_nonzero(np.isfinite(flat)))
        if finite != flat.size and nonfinite == "error":
            reduce_stats(flat, tensor=tensor, nonfinite="error")
        counts[0] = finite
        return counts
    amax32 = np.float32(hist_amax)
    # The scaled value of hist_amax itself: about num_bins, or NaN when hist_amax overflows float32
    # (inv_width 0), which sends every chunk down the clamped path.
    with np.errstate(invalid="ignore"):
        top: np.float32 = amax32 * inv_width
    # Bins num_bins-1 .. int(top) all mean "the last bin"; they are folded into it at the end.
    wide = np.zeros(max(num_bins, int(top) + 1) if np.isfinite(top) else num_bins, dtype=np.int64)
    scaled = np.empty(min(_CHUNK, flat.size), dtype=np.float32)
    idx = np.empty(scaled.size, dtype=np.intp)
    # float32 -> int32 -> intp is about 1.6x faster than float32 -> intp and truncates the same
    # way for values that fit int32 (every scaled value is <= top here).
    idx32 = np.empty(scaled.size, dtype=np.int32) if wide.size < np.iinfo(np.int32).max else None
    with np.errstate(over="ignore", invalid="ignore"):  # |x| far above the range or NaN top: the clamped path handles it
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start : start + _CHUNK]
            a = scaled[: chunk.size]
            np.multiply(chunk if chunk.dtype == np.float32 else chunk.astype(np.float32), inv_width, out=a)
            np.abs(a, out=a)
            if not a.max() <= top:  # NaN and Inf both surface in the max (NaN fails the comparison)
                counts += _fill_chunk_clamped(chunk, num_bins, amax32, inv_width, tensor=tensor, nonfinite=nonfinite)
                continue
            i = idx[: chunk.size]
            if idx32 is None:
                np.copyto(i, a, casting="unsafe")  # truncation == floor for non-negative values
            else:
                np.copyto(idx32[: chunk.size], a, casting="unsafe")
                np.copyto(i, idx32[: chunk.size])
            _count_into(wide, i)
    counts += wide[:num_bins]
    counts[num_bins - 1] += wide[num_bins:].sum()
    return counts


def _count_into(counts: npt.NDArray[np.int64], idx: npt.NDArray[np.intp]) -> None:
    """counts[k] += number of k in idx (every idx within range)."""
    if _ADD_AT_IS_FAST:
        np.add.at(counts, idx, 1)
    else:  # pragma: no cover - numpy < 1.25
        counts += np.bincount(idx, minlength=counts.size)


def _fill_chunk_clamped(
    chunk: npt.NDArray[Any],
    num_bins: int,
    amax32: np.float32,
    inv_width: np.float32,
    *,
    tensor: str,
    nonfinite: NonFinitePolicy,
) -> npt.NDArray[np.int64]:
    """The bin rule step by step (clamp |x| to the range, scale, truncate, clamp the index)."""
    a = np.abs(chunk if chunk.dtype == np.float32 else chunk.astype(np.float32))
    if not np.isfinite(a.max()):  # NaN and Inf both surface in the max
        if nonfinite == "error":
            reduce_stats(chunk, tensor=tensor, nonfinite="error")
        a = a[np.isfinite(a)]
    np.minimum(a, amax32, out=a)  # clamp first: no overflow in the multiply
    np.multiply(a, inv_width, out=a)
    idx = a.astype(np.intp)
    np.minimum(idx, num_bins - 1, out=idx)
    return np.bincount(idx, minlength=num_bins).astype(np.int64, copy=False)


def histogram_of(
    x: npt.ArrayLike,
    *,
    num_bins: int = DEFAULT_NUM_BINS,
    hist_amax: float | None = None,
    tensor: str = "tensor",
    nonfinite: NonFinitePolicy = "error",
) -> Histogram:
    """Both passes over one array (range = its exact max |x| unless `hist_amax` is given)."""
    stats = reduce_stats(x, tensor=tensor, nonfinite=nonfinite)
    amax = stats.amax if hist_amax is None else float(hist_amax)
    counts = fill_counts(x, num_bins, amax, tensor=tensor, nonfinite=nonfinite)
    return Histogram(counts=counts, hist_amax=amax, stats=stats)


def merge_histograms(histograms: Iterable[Histogram]) -> Histogram:
    """Exact merge of histograms on the same range and bin count (any order, any grouping)."""
    items = list(histograms)
    if not items:
        raise ConfigError("merge_histograms needs at least one histogram")
    first = items[0]
    counts = np.zeros_like(first.counts)
    for h in items:
        if h.num_bins != first.num_bins or h.hist_amax != first.hist_amax:
            raise ConfigError(
                "cannot merge histograms with different ranges or bin counts "
                f"({h.num_bins} bins on [0, {h.hist_amax}] vs {first.num_bins} on [0, {first.hist_amax}]); "
                "fill every shard on the pass-1 amax"
            )
        counts += h.counts
    return Histogram(counts=counts, hist_amax=first.hist_amax, stats=merge_stats(h.stats for h in items))


@dataclass
class GrowingHistogram:
    """TensorRT-style histogram whose range grows by powers of two (order-sensitive by design)."""

    num_bins: int = DEFAULT_NUM_BINS
    tensor: str = "tensor"
    nonfinite: NonFinitePolicy = "error"
    counts: npt.NDArray[np.int64] | None = None
    hist_amax: float = 0.0
    stats: TensorStats = field(default_factory=TensorStats)

    def __post_init__(self) -> None:
        if self.num_bins < 2 or self.num_bins % 2:
            raise ConfigError(f"num_bins must be an even number >= 2 for a growing histogram, got {self.num_bins}")

    def update(self, x: npt.ArrayLike) -> None:
        batch = reduce_stats(x, tensor=self.tensor, nonfinite=self.nonfinite)
        self.stats = merge_stats([self.stats, batch])
        if self.counts is None or self.hist_amax == 0.0:
            # The first non-zero batch sets the range (a zero range cannot be grown by doubling).
            previous_zero = 0 if self.counts is None else int(self.counts[0])
            self.hist_amax = batch.amax
            self.counts = np.zeros(self.num_bins, dtype=np.int64)
            self.counts[0] += previous_zero
        elif batch.amax > self.hist_amax:
            self._grow_to(batch.amax)
        self.counts = self.counts + fill_counts(x, self.num_bins, self.hist_amax, tensor=self.tensor, nonfinite=self.nonfinite)

    def _grow_to(self, amax: float) -> None:
        assert self.counts is not None
        counts = self.counts
        new_amax = self.hist_amax
        while new_amax < amax:
            new_amax *= 2.0
            # Lossless re-binning: bins 2k and 2k+1 of the old range are bin k of the doubled one.
            merged = counts[0::2] + counts[1::2]
            counts = np.concatenate([merged, np.zeros(self.num_bins - merged.size, dtype=np.int64)])
        self.counts = counts
        self.hist_amax = new_amax

    def result(self) -> Histogram:
        counts = self.counts if self.counts is not None else np.zeros(self.num_bins, dtype=np.int64)
        return Histogram(counts=counts.copy(), hist_amax=self.hist_amax, stats=self.stats)
