"""Slow, obviously correct references for the scale searches (loops, float64, scipy's KL).

Written from the algorithm text (docs/algorithms.md: entropy2, and "What is known about TensorRT's
own calibrators"), independently of trtcal.core.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import entropy as kl_divergence


def slow_entropy_kl(counts, i, num_levels=128):
    """KL(P || Q) of candidate i, literally: bin k < i goes to level floor(num_levels * k / i)."""
    counts = [int(c) for c in counts]
    p = [float(c) for c in counts[:i]]
    p[i - 1] += float(sum(counts[i:]))
    source = counts[:i]
    level = [(num_levels * k) // i for k in range(i)]
    total = [0.0] * num_levels
    nonempty = [0] * num_levels
    for k in range(i):
        total[level[k]] += source[k]
        nonempty[level[k]] += 1 if source[k] > 0 else 0
    q = [total[level[k]] / nonempty[level[k]] if source[k] > 0 else 0.0 for k in range(i)]
    if sum(q) == 0:
        return math.inf
    for pk, qk in zip(p, q):
        if pk > 0 and qk == 0:
            return math.inf
    return float(kl_divergence(p, q))


def slow_entropy2(counts, hist_amax, start_bin=128, stop_bin=None, tie_tolerance=1e-12, suppress_first_bin=True):
    """TensorRT 8.5's rule (docs/algorithms.md): bin 0 := bin 1, the largest i among equal minima,
    and no clipped candidate whose P (outliers folded in) has a single non-empty bin."""
    counts = [int(c) for c in counts]
    if len(counts) > 1:
        counts[0] = counts[1] if suppress_first_bin else 0
    n = len(counts)
    stop = n if stop_bin is None else stop_bin
    divergences = []
    for i in range(start_bin, stop + 1):
        p = counts[:i]
        p[i - 1] += sum(counts[i:])
        if i < n and sum(1 for c in p if c > 0) == 1:
            continue
        divergences.append((i, slow_entropy_kl(counts, i)))
    finite = [kl for _, kl in divergences if not math.isinf(kl)]
    if not finite:
        return float(hist_amax), None, math.inf
    best_kl = min(finite)
    best_i = max(i for i, kl in divergences if kl <= best_kl + tie_tolerance * max(1.0, abs(best_kl)))
    return (best_i + 0.5) * hist_amax / n, best_i, best_kl


def slow_percentile(counts, hist_amax, percentile):
    n = len(counts)
    total = sum(int(c) for c in counts)
    running = 0
    for k, c in enumerate(counts):
        running += int(c)
        if running >= percentile / 100.0 * total:
            return (k + 1) * hist_amax / n
    return hist_amax


def slow_mse(counts, hist_amax, start_bin=128, levels=127):
    n = len(counts)
    w = hist_amax / n
    best, best_i = math.inf, None
    for i in range(start_bin, n):
        t = (i + 0.5) * w
        step = t / levels
        err = 0.0
        for k, c in enumerate(counts):
            if c == 0:
                continue
            centre = (k + 0.5) * w
            if k <= i:
                err += c * step * step / 12.0
            else:
                err += c * ((centre - t) ** 2 + w * w / 12.0)
        if err < best:
            best, best_i = err, i
    return (best_i + 0.5) * w


def slow_histogram(x, num_bins, hist_amax):
    """|x| counts with the documented bin rule, one value at a time."""
    counts = np.zeros(num_bins, dtype=np.int64)
    inv = np.float32(num_bins) / np.float32(hist_amax)
    for v in np.abs(np.asarray(x, dtype=np.float32)).ravel():
        k = int(np.float32(min(v, np.float32(hist_amax))) * inv)
        counts[min(k, num_bins - 1)] += 1
    return counts
