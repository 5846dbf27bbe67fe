"""Slow, obviously correct references for the scale searches (loops, float64, scipy's KL).

Written from the algorithm text (docs/algorithms.md: entropy2, and "What is known about TensorRT's
own calibrators"), independently of trtcal.core.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import entropy as kl_divergence


def slow_entropy_kl(counts, i, num_levels=128):
    """KL(P || Q) of candidate i, literally as the slide describes it."""
    counts = [int(c) for c in counts]
    p = [float(c) for c in counts[:i]]
    p[i - 1] += float(sum(counts[i:]))
    source = counts[:i]
    q = [0.0] * i
    for j in range(num_levels):
        lo = (j * i) // num_levels
        hi = ((j + 1) * i) // num_levels
        group = source[lo:hi]
        total = float(sum(group))
        nonempty = sum(1 for c in group if c > 0)
        for k in range(lo, hi):
            if source[k] > 0:
                q[k] = total / nonempty
    if sum(q) == 0:
        return math.inf
    for pk, qk in zip(p, q):
        if pk > 0 and qk == 0:
            return math.inf
    return float(kl_divergence(p, q))


def slow_entropy2(counts, hist_amax, start_bin=128, stop_bin=None):
    counts = [int(c) for c in counts]
    if len(counts) > 1:
        counts[0] = counts[1]  # the zero spike is suppressed, as documented
    n = len(counts)
    stop = n if stop_bin is None else stop_bin
    best_i, best_kl = None, math.inf
    for i in range(start_bin, stop + 1):
        kl = slow_entropy_kl(counts, i)
        if kl < best_kl:  # strict: ties keep the smallest i
            best_i, best_kl = i, kl
    if best_i is None:
        return float(hist_amax), None, math.inf
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
