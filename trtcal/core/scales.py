"""Scale search: pure functions of a |x| histogram returning amax (scale = amax / 127).

Every function takes `counts` (integer counts of |x| in `len(counts)` equal bins over
[0, hist_amax]) and returns amax as a Python float. Inputs are never mutated.

Methods (see docs/algorithms.md for the full derivations and what is and is not TensorRT's):

* ``entropy2``: TensorRT EntropyCalibration2 as publicly described (Migacz, GTC 2017):
  candidates i = start_bin … num_bins, outliers folded into the last kept bin, the first i bins
  merged into `num_levels` groups, expanded over the non-empty bins, KL(P || Q);
  threshold (i + 0.5) · bin_width. Ties go to the smallest i. Bin 0's zero spike (ReLU outputs)
  is suppressed first (`suppress_zero_spike`).
* ``entropy``: the same search restricted to i < num_bins, as the slide's ``range(128, 2048)``
  reads. TensorRT's v1 algorithm is not public; the documented TensorRT difference (v1
  calibrates after layer fusion) is a graph matter only the TensorRT backend reproduces.
* ``minmax``: hist_amax (in trtcal's exact two-pass mode this is the exact max |x|).
* ``percentile``: the smallest bin edge below which at least `percentile` % of |x| lies
  (right edge; ONNX Runtime and ModelOpt report the left edge, one bin lower).
* ``mse``: the candidate (i + 0.5) · bin_width minimising the expected squared error of
  symmetric int8 quantize/dequantize: uniform rounding noise step²/12 inside the range, plus
  the clipping error of the bins beyond it. Ties go to the smallest i.
* ``legacy``: TensorRT's legacy calibrator's algorithm is not public. trtcal's interpretation:
  the `quantile` of |x| (as in ``percentile``), capped at `regression_cutoff` · max |x|.
  NVIDIA's BERT recipe (quantile 0.9999, cutoff 1.0) is therefore the 99.99th percentile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from trtcal.errors import ConfigError

__all__ = [
    "METHODS",
    "compute_amax",
    "amax_entropy2",
    "amax_entropy",
    "amax_minmax",
    "amax_percentile",
    "amax_mse",
    "amax_legacy",
    "entropy_divergences",
]

NUM_LEVELS = 128  # int8 magnitudes: TensorRT quantizes |x| into 128 levels
START_BIN = 128


def _as_counts(counts: npt.ArrayLike) -> npt.NDArray[np.int64]:
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(f"counts must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.floor(arr)):
            raise ConfigError("counts must be whole numbers")
    out = arr.astype(np.int64)  # a copy: callers' arrays are never touched
    if np.any(out < 0):
        raise ConfigError("counts must be non-negative")
    return out


def _check_amax(hist_amax: float) -> float:
    value = float(hist_amax)
    if not (np.isfinite(value) and value >= 0.0):
        raise ConfigError(f"hist_amax must be finite and >= 0, got {hist_amax!r}")
    return value


def entropy_divergences(
    counts: npt.ArrayLike, *, start_bin: int = START_BIN, stop_bin: int | None = None, num_levels: int = NUM_LEVELS
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """KL(P || Q) for every candidate i in [start_bin, stop_bin] (inclusive), vectorised.

    Closed form: with N the total count, C_i = sum(H[:i]) and tail_i = N - C_i,
    KL_i = (1/N)·[Σ_{k<i-1} H_k ln H_k + P_{i-1} ln P_{i-1} − Σ_g G_g ln(G_g / n_g) − tail_i ln Q_{i-1}]
           + ln(C_i / N),
    where g runs over the `num_levels` groups of the first i bins, G_g is a group's total, n_g its
    number of non-empty bins, P_{i-1} = H_{i-1} + tail_i, Q_{i-1} = G / n of the last bin's group.
    KL is +inf when the folded outliers land on an empty last bin (P > 0 where Q = 0).
    Group j of candidate i holds bins [floor(j·i/L), floor((j+1)·i/L)).
    """
    h = _as_counts(counts)
    num_bins = h.size
    stop = num_bins if stop_bin is None else min(stop_bin, num_bins)
    start = max(1, min(start_bin, stop))
    cand = np.arange(start, stop + 1, dtype=np.int64)
    hf = h.astype(np.float64)
    total = float(hf.sum())
    if total == 0.0:
        return cand, np.zeros(cand.size)

    cum = np.concatenate([[0.0], np.cumsum(hf)])  # cum[k] = Σ H[:k]
    nz_cum = np.concatenate([[0], np.cumsum(h > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(hf > 0, hf * np.log(np.where(hf > 0, hf, 1.0)), 0.0)
    hlogh_cum = np.concatenate([[0.0], np.cumsum(hlogh)])

    c_i = cum[cand]
    tail = total - c_i
    last = hf[cand - 1]
    p_last = last + tail
    with np.errstate(divide="ignore", invalid="ignore"):
        p_last_log = np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
    plogp = hlogh_cum[cand - 1] + p_last_log

    # Group boundaries per candidate: shape (num_candidates, num_levels + 1).
    levels = np.arange(num_levels + 1, dtype=np.int64)
    bounds = (cand[:, None] * levels[None, :]) // num_levels
    g_tot = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]
    g_nz = (nz_cum[bounds[:, 1:]] - nz_cum[bounds[:, :-1]]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        g_term = np.where(g_tot > 0, g_tot * np.log(np.where(g_tot > 0, g_tot, 1.0) / np.where(g_nz > 0, g_nz, 1.0)), 0.0)
    plogq = g_term.sum(axis=1)

    # The last kept bin's Q value (its group is the last one, j = L-1).
    q_last = np.where(last > 0, g_tot[:, -1] / np.where(g_nz[:, -1] > 0, g_nz[:, -1], 1.0), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail_term = np.where(tail > 0, tail * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
    plogq = plogq + tail_term

    with np.errstate(divide="ignore", invalid="ignore"):
        kl = (plogp - plogq) / total + np.log(np.where(c_i > 0, c_i, 1.0) / total)
    infinite = ((tail > 0) & (last == 0)) | (c_i == 0)
    kl = np.where(infinite, np.inf, kl)
    return cand, kl


def _argmin_first(values: npt.NDArray[np.float64]) -> int:
    # np.argmin returns the first minimum: ties go to the smallest candidate.
    return int(np.argmin(values))


def suppress_zero_spike(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """A copy with bin 0 set to bin 1's count.

    After ReLU/ReLU6 a large share of |x| is exactly 0; left in bin 0, that spike dominates the KL
    of every wide candidate (the 128 levels merge bin 0 with its neighbours) and the search clips
    ReLU6 outputs to ~0.7 of 6. NVIDIA's PyTorch calibrators (pytorch-quantization, ModelOpt) do
    the same; zeros quantize exactly whatever the scale, so they carry no information for it.
    """
    out: npt.NDArray[np.int64] = counts.copy()
    if out.size > 1:
        out[0] = out[1]
    return out


def amax_entropy2(
    counts: npt.ArrayLike, hist_amax: float, *, start_bin: int = START_BIN, num_levels: int = NUM_LEVELS
) -> float:
    """TensorRT EntropyCalibration2 threshold: (i* + 0.5) · bin_width (bin 0's zero spike suppressed)."""
    h = suppress_zero_spike(_as_counts(counts))
    amax = _check_amax(hist_amax)
    if amax == 0.0 or not h.any():
        return amax
    cand, kl = entropy_divergences(h, start_bin=start_bin, num_levels=num_levels)
    if not np.isfinite(kl).any():
        return amax  # every candidate clips mass onto an empty bin: keep the full range
    i = int(cand[_argmin_first(kl)])
    return float((i + 0.5) * (amax / h.size))


def amax_entropy(
    counts: npt.ArrayLike, hist_amax: float, *, start_bin: int = START_BIN, num_levels: int = NUM_LEVELS
) -> float:
    """Entropy (v1 as trtcal defines it): the entropy2 search over i in [start_bin, num_bins)."""
    h = suppress_zero_spike(_as_counts(counts))
    amax = _check_amax(hist_amax)
    if amax == 0.0 or not h.any():
        return amax
    cand, kl = entropy_divergences(h, start_bin=start_bin, stop_bin=h.size - 1, num_levels=num_levels)
    if not np.isfinite(kl).any():
        return amax
    i = int(cand[_argmin_first(kl)])
    return float((i + 0.5) * (amax / h.size))


def amax_minmax(counts: npt.ArrayLike, hist_amax: float) -> float:
    """The histogram's range: the exact max |x| in two-pass mode."""
    _as_counts(counts)
    return _check_amax(hist_amax)


def _percentile_bin(h: npt.NDArray[np.int64], fraction: float) -> int:
    cum = np.cumsum(h)
    target = fraction * float(cum[-1])
    # First bin whose cumulative count reaches the target.
    return int(np.searchsorted(cum.astype(np.float64), target, side="left"))


def amax_percentile(counts: npt.ArrayLike, hist_amax: float, *, percentile: float = 99.99) -> float:
    """Right edge of the bin where the CDF of |x| first reaches `percentile` (0 < p <= 100)."""
    h = _as_counts(counts)
    amax = _check_amax(hist_amax)
    if not (0.0 < float(percentile) <= 100.0):
        raise ConfigError(f"percentile must be in (0, 100], got {percentile!r}")
    if amax == 0.0 or not h.any():
        return amax
    k = min(_percentile_bin(h, float(percentile) / 100.0), h.size - 1)
    return float((k + 1) * (amax / h.size))


def amax_mse(counts: npt.ArrayLike, hist_amax: float, *, start_bin: int = START_BIN, num_levels: int = 127) -> float:
    """Threshold (i + 0.5)·w minimising E[(x - dq(q(x)))²] under a uniform-in-bin model.

    Inside [0, T]: rounding noise (T / num_levels)² / 12 per value. Beyond T: clipping error
    (c_k - T)² + w²/12 for bin centres c_k > T. Closed form over suffix sums, vectorised.
    """
    h = _as_counts(counts)
    amax = _check_amax(hist_amax)
    if amax == 0.0 or not h.any():
        return amax
    n = h.size
    w = amax / n
    hf = h.astype(np.float64)
    centres = (np.arange(n, dtype=np.float64) + 0.5) * w
    start = max(0, min(start_bin, n - 1))
    cand = np.arange(start, n, dtype=np.int64)
    thresholds = (cand + 0.5) * w
    # Suffix sums over bins strictly beyond the candidate's own bin.
    s0 = np.concatenate([np.cumsum(hf[::-1])[::-1], [0.0]])
    s1 = np.concatenate([np.cumsum((hf * centres)[::-1])[::-1], [0.0]])
    s2 = np.concatenate([np.cumsum((hf * centres * centres)[::-1])[::-1], [0.0]])
    beyond0, beyond1, beyond2 = s0[cand + 1], s1[cand + 1], s2[cand + 1]
    inside = hf.sum() - beyond0
    step = thresholds / num_levels
    clip = beyond2 - 2.0 * thresholds * beyond1 + thresholds**2 * beyond0 + beyond0 * (w * w / 12.0)
    mse = inside * step * step / 12.0 + clip
    i = int(cand[_argmin_first(mse)])
    return float((i + 0.5) * w)


def amax_legacy(
    counts: npt.ArrayLike, hist_amax: float, *, quantile: float = 0.9999, regression_cutoff: float = 1.0
) -> float:
    """trtcal's documented interpretation of TensorRT's legacy calibrator (see module docstring)."""
    if not (0.0 < float(quantile) <= 1.0):
        raise ConfigError(f"quantile must be in (0, 1], got {quantile!r}")
    if not (0.0 < float(regression_cutoff) <= 1.0):
        raise ConfigError(f"regression_cutoff must be in (0, 1], got {regression_cutoff!r}")
    amax = _check_amax(hist_amax)
    q = amax_percentile(counts, amax, percentile=float(quantile) * 100.0)
    return float(min(q, float(regression_cutoff) * amax))


METHODS: Mapping[str, Callable[..., float]] = {
    "entropy2": amax_entropy2,
    "entropy": amax_entropy,
    "minmax": amax_minmax,
    "percentile": amax_percentile,
    "mse": amax_mse,
    "legacy": amax_legacy,
}


def compute_amax(counts: npt.ArrayLike, hist_amax: float, method: str, **params: Any) -> float:
    """amax of a tensor from its |x| histogram by `method` (a key of METHODS).

    Args:
        counts: integer counts of |x| over [0, hist_amax] in equal bins.
        hist_amax: the histogram's upper edge.
        method: "entropy2", "entropy", "minmax", "percentile", "mse" or "legacy".
        **params: method parameters (percentile=, quantile=, regression_cutoff=, start_bin=, ...).

    Raises:
        ConfigError: unknown method, unknown parameter or invalid value.
    """
    try:
        fn = METHODS[method]
    except KeyError:
        raise ConfigError(f"unknown calibration method {method!r}; choose one of {sorted(METHODS)}") from None
    try:
        return fn(counts, hist_amax, **params)
    except TypeError as exc:
        raise ConfigError(f"invalid parameters for method {method!r}: {exc}") from None
