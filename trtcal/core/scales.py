"""Scale search: pure functions of a |x| histogram returning amax (scale = amax / 127).

Every function takes `counts` (integer counts of |x| in `len(counts)` equal bins over
[0, hist_amax]) and returns amax as a Python float. Inputs are never mutated.

Methods (see docs/algorithms.md for the full derivations and what is and is not TensorRT's):

* ``entropy2``: TensorRT 8.5's IInt8EntropyCalibrator2 rule, found by black-box experiments on
  TensorRT 8.5.3 (docs/algorithms.md): bin 0 takes bin 1's count; candidates i = 128 … num_bins,
  but none below i = f + 2 for f the first non-empty bin (a clipped P of one bin is never taken);
  the outliers are folded into the last kept bin of P; Q merges the first i bins into 128 levels,
  bin k going to level floor(128·k / i), each level's total spread over its non-empty bins;
  KL(P || Q); the LARGEST i among equal minima; threshold (i + 0.5) · bin_width.
* ``entropy``: TensorRT's IInt8EntropyCalibrator runs the same search (identical scales on every
  probe tensor in TensorRT 8.5.3); it differs only in calibrating after layer fusion, a graph
  matter that only the TensorRT backend reproduces.
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
    "SEARCH_VERSIONS",
    "compute_amax",
    "amax_entropy2",
    "amax_entropy",
    "amax_minmax",
    "amax_percentile",
    "amax_mse",
    "amax_legacy",
    "entropy_divergences",
    "suppress_first_bin",
    "entropy_start_bin",
]

# A method's search version, bumped when its result for the same histogram changes; part of the store
# key of every calibration that computes the method (trtcal/orchestrator/keys.py), so an entry made
# by an older rule is never served. Methods not listed are at version 1 and add nothing to keys.
# entropy2/entropy 2: bin 0 := bin 1 and no single-bin clip (TensorRT 8.5.3, docs/algorithms.md).
SEARCH_VERSIONS = {"entropy2": 2, "entropy": 2}

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

    `counts` are used as given (amax_entropy2 replaces bin 0 first). Bin k < i belongs to level
    floor(num_levels·k / i), so level g holds bins [ceil(g·i/L), ceil((g+1)·i/L)).
    Closed form: with N the total count, C_i = sum(H[:i]) and tail_i = N - C_i,
    KL_i = (1/N)·[Σ_{k<i-1} H_k ln H_k + P_{i-1} ln P_{i-1} − Σ_g G_g ln(G_g / n_g) − tail_i ln Q_{i-1}]
           + ln(C_i / N),
    where G_g is level g's total, n_g its number of non-empty bins, P_{i-1} = H_{i-1} + tail_i and
    Q_{i-1} = G / n of the last bin's level. KL is +inf when the folded outliers land on an empty
    last bin (P > 0 where Q = 0).
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

    # Level boundaries per candidate, ceil(g·i/L): shape (num_candidates, num_levels + 1).
    levels = np.arange(num_levels + 1, dtype=np.int64)
    bounds = -((-cand[:, None] * levels[None, :]) // num_levels)
    g_tot = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]
    g_nz = (nz_cum[bounds[:, 1:]] - nz_cum[bounds[:, :-1]]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        g_term = np.where(g_tot > 0, g_tot * np.log(np.where(g_tot > 0, g_tot, 1.0) / np.where(g_nz > 0, g_nz, 1.0)), 0.0)
    plogq = g_term.sum(axis=1)

    # The last kept bin (i - 1) is always in the last level (L - 1).
    q_last = np.where(last > 0, g_tot[:, -1] / np.where(g_nz[:, -1] > 0, g_nz[:, -1], 1.0), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail_term = np.where(tail > 0, tail * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
    plogq = plogq + tail_term

    with np.errstate(divide="ignore", invalid="ignore"):
        kl = (plogp - plogq) / total + np.log(np.where(c_i > 0, c_i, 1.0) / total)
    infinite = ((tail > 0) & (last == 0)) | (c_i == 0)
    kl = np.where(infinite, np.inf, kl)
    return cand, kl


# Divergences this close count as equal (float64 rounding of the closed form, ~1e-15): TensorRT
# then takes the larger candidate (sparse histograms often tie exactly at KL = 0).
TIE_TOLERANCE = 1e-12


def _argmin_first(values: npt.NDArray[np.float64]) -> int:
    # np.argmin returns the first minimum: ties go to the smallest candidate (mse).
    return int(np.argmin(values))


def _argmin_last(values: npt.NDArray[np.float64]) -> int:
    """Index of the last value within TIE_TOLERANCE of the minimum: ties go to the largest i."""
    best = float(np.min(values))
    near = np.nonzero(values <= best + TIE_TOLERANCE * max(1.0, abs(best)))[0]
    return int(near[-1])


def suppress_first_bin(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """A copy with bin 0's count replaced by bin 1's, as TensorRT 8.5 does before its entropy search.

    Bin 0 holds the zeros of ReLU outputs and the near-zero noise of everything else. TensorRT 8.5.3
    gave the same scale with or without a spike of exact zeros there, but a spike in bin 1 moved its
    scale as if bin 0 held the spike too (docs/algorithms.md); NVIDIA's pytorch-quantization does
    the same (`bins[0] = bins[1]`). Zeros quantize exactly whatever the scale.
    """
    out: npt.NDArray[np.int64] = counts.copy()
    if out.size > 1:
        out[0] = out[1]
    return out


def entropy_start_bin(counts: npt.NDArray[np.int64], start_bin: int = START_BIN) -> int:
    """The first candidate i: start_bin, but never a clipped P of a single non-empty bin.

    With f the first non-empty bin, a candidate i <= f + 1 folds everything into one bin, so its
    KL is exactly 0. TensorRT 8.5.3 still kept the full range there (probe sparse_k3_r1,
    docs/algorithms.md); i = num_bins stays a candidate.
    """
    nonzero = np.flatnonzero(counts)
    first = int(nonzero[0]) if nonzero.size else 0
    return min(max(start_bin, first + 2), int(counts.size))


def amax_entropy2(
    counts: npt.ArrayLike, hist_amax: float, *, start_bin: int = START_BIN, num_levels: int = NUM_LEVELS
) -> float:
    """TensorRT EntropyCalibration2: (i* + 0.5) · bin_width, the rule of the module docstring."""
    h = _as_counts(counts)
    amax = _check_amax(hist_amax)
    if amax == 0.0 or not h.any():
        return amax
    h = suppress_first_bin(h)
    if not h.any():
        return amax  # every value in bin 0 (a range wider than the data): nothing to search
    cand, kl = entropy_divergences(h, start_bin=entropy_start_bin(h, start_bin), num_levels=num_levels)
    if not np.isfinite(kl).any():
        return amax  # every candidate clips mass onto an empty bin: keep the full range
    i = int(cand[_argmin_last(kl)])
    return float((i + 0.5) * (amax / h.size))


def amax_entropy(
    counts: npt.ArrayLike, hist_amax: float, *, start_bin: int = START_BIN, num_levels: int = NUM_LEVELS
) -> float:
    """TensorRT Entropy (v1): the entropy2 search (v1 differs only in calibrating after fusion)."""
    return amax_entropy2(counts, hist_amax, start_bin=start_bin, num_levels=num_levels)


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
