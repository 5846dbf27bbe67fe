"""Candidate entropy-calibration rules, parametrised, for fitting TensorRT's cache values offline.

Every variant computes KL(P || Q) for every candidate i and returns the chosen i; the fitting
script (fit_entropy.py) runs them over the probe histograms and TensorRT's answers.

Parameters (defaults = trtcal's entropy2 before issue 18):
  zero     "suppress" (bin 0 := bin 1), "keep", "drop" (bin 0 := 0)
  start    first candidate i (128)
  stop     last candidate i, inclusive (2048)
  group    how the first i bins merge into 128 levels:
           "floor": group j = bins [floor(j i/128), floor((j+1) i/128))
           "ceil":  group j = bins [ceil(j i/128), ceil((j+1) i/128))  (k -> floor(128 k / i))
           "stride": m = i // 128 bins a group, the remainder joins the last group
  mask     which bins receive Q: "h" (H[k] > 0) or "p" (P[k] > 0: the folded outliers count)
  qsrc     Q is built from "h" (H[:i]) or "p" (P, outliers folded in)
  expand   "nz": a group's total spread over its masked bins; "all": over all its bins
  pq0      P > 0 where Q = 0: "inf" (candidate rejected) or "skip" (term ignored)
  tie      "first" or "last" minimum
"""

from __future__ import annotations

import numpy as np

DEFAULT = dict(
    zero="suppress", start=128, stop=2048, group="floor", mask="h", qsrc="h", expand="nz", pq0="inf", tie="first", levels=128, qnorm="q", div="kl"
)


_LEVEL_FUNCS = {
    "ceil1": lambda k, i, L: (L * (k + 1)) // i,
    "ceil_m1": lambda k, i, L: (L * k) // np.maximum(i - 1, 1),
    "centre128": lambda k, i, L: ((2 * k + 1) * L) // (2 * i),
    "round": lambda k, i, L: (2 * L * k + i) // (2 * i),
    "ceil_p1": lambda k, i, L: (L * k) // (i + 1),
    "ceil_f32": lambda k, i, L: np.floor(k.astype(np.float32) / np.float32(i / L)).astype(np.int64),
}
_CACHE: dict = {}


def _bounds_from_levels(cand: np.ndarray, group: str, levels: int) -> np.ndarray:
    key = (group, levels, int(cand[0]), int(cand[-1]))
    if key not in _CACHE:
        out = np.empty((cand.size, levels + 1), dtype=np.int64)
        for r, i in enumerate(cand):
            k = np.arange(i, dtype=np.int64)
            lv = np.clip(_LEVEL_FUNCS[group](k, i, levels), 0, levels - 1)
            out[r] = np.searchsorted(lv, np.arange(levels + 1), side="left")
            out[r, -1] = i
        _CACHE[key] = out
    return _CACHE[key]


def bounds_for(cand: np.ndarray, group: str, levels: int = 128) -> np.ndarray:
    if group in _LEVEL_FUNCS:
        return _bounds_from_levels(cand, group, levels)
    j = np.arange(levels + 1, dtype=np.int64)[None, :]
    c = cand[:, None]
    if group == "centre":
        # bin k -> level floor((k + 0.5) * levels / (i - 0.5)), the last bin clamped into the last level
        b = -((-(j * (2 * c - 1) - levels)) // (2 * levels))
        b = np.clip(b, 0, c)
        b[:, 0] = 0
        b[:, -1] = cand
        return b
    if group == "floor":
        return (c * j) // levels
    if group == "ceil":
        return -((-c * j) // levels)
    if group == "stride":
        m = c // levels
        b = m * j
        b[:, -1] = cand
        return b
    raise ValueError(group)


def kl_curve(counts: np.ndarray, **kw) -> tuple[np.ndarray, np.ndarray]:
    v = {**DEFAULT, **kw}
    h = np.asarray(counts, dtype=np.int64).copy()
    h_orig = h.copy()
    if v["zero"] == "suppress":
        h[0] = h[1]
    elif v["zero"] in ("drop", "drop_p", "drop_mask"):
        h[0] = 0
    n_bins = h.size
    cand = np.arange(v["start"], min(v["stop"], n_bins) + 1, dtype=np.int64)
    hf = h.astype(np.float64)
    total = hf.sum()
    cum = np.concatenate([[0.0], np.cumsum(hf)])
    # drop_p: P loses bin 0 but Q keeps its count and its place; drop_mask: Q keeps its place only
    hq = h_orig.astype(np.float64) if v["zero"] == "drop_p" else hf
    cum_q = np.concatenate([[0.0], np.cumsum(hq)])
    mask_src = h_orig if v["zero"] in ("drop_p", "drop_mask") else h
    nz = np.concatenate([[0], np.cumsum(mask_src > 0)])
    hlogh = np.where(hf > 0, hf * np.log(np.where(hf > 0, hf, 1)), 0.0)
    hlc = np.concatenate([[0.0], np.cumsum(hlogh)])
    c_i = cum[cand]
    tail = total - c_i
    last = hf[cand - 1]
    p_last = last + tail
    levels = v["levels"]
    b = bounds_for(cand, v["group"], levels)
    g_h = cum[b[:, 1:]] - cum[b[:, :-1]]  # H totals per group
    g_n = (nz[b[:, 1:]] - nz[b[:, :-1]]).astype(np.float64)  # H>0 bins per group
    size = (b[:, 1:] - b[:, :-1]).astype(np.float64)
    # The last bin (i-1) belongs to the last non-empty group (bounds are non-decreasing).
    gl = levels - 1 - np.argmax((size[:, ::-1] > 0), axis=1)
    rows = np.arange(cand.size)
    last_masked_h = last > 0
    add_mask = (v["mask"] == "p") & (~last_masked_h) & (tail > 0)
    g_n[rows, gl] += add_mask
    g_q = cum_q[b[:, 1:]] - cum_q[b[:, :-1]]
    if v["qsrc"] == "p":
        g_q[rows, gl] += tail
    g_p = g_h.copy()
    g_p[rows, gl] += tail * (last_masked_h | add_mask)  # P mass on masked bins of the last group
    denom = g_n if v["expand"] == "nz" else size
    with np.errstate(divide="ignore", invalid="ignore"):
        qv = np.where(denom > 0, g_q / np.where(denom > 0, denom, 1), 0.0)
        sq = (g_n * qv).sum(axis=1)
        ok = (qv > 0) & (g_p > 0)
        plogq = np.where(ok, g_p * np.log(np.where(ok, qv, 1)), 0.0).sum(axis=1)
        bad = ((qv <= 0) & (g_p > 0)).any(axis=1)
        bad |= (tail > 0) & ~(last_masked_h | add_mask)  # outliers folded onto a bin Q never fills
        plogp = hlc[cand - 1] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1)), 0.0)
        norm = sq if v["qnorm"] == "q" else np.full_like(sq, total)
        kl = (plogp - plogq) / total - np.log(total) + np.log(np.where(norm > 0, norm, 1))
    if v["pq0"] == "inf":
        kl = np.where(bad | (sq <= 0), np.inf, kl)
    else:
        kl = np.where(sq <= 0, np.inf, kl)
    return cand, kl


def choose(counts: np.ndarray, **kw) -> int:
    v = {**DEFAULT, **kw}
    cand, kl = kl_curve(counts, **kw)
    if not np.isfinite(kl).any():
        return int(cand[-1])
    if v["tie"] == "first":
        return int(cand[int(np.argmin(kl))])
    return int(cand[kl.size - 1 - int(np.argmin(kl[::-1]))])
