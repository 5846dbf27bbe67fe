#!/usr/bin/env python3
"""Which entropy-search rule explains TensorRT 8.5.3's EntropyCalibration2 lines? (CPU, offline)

usage: hypotheses.py [PROBES.npz] [--slow]

Runs each hypothesis over the 172 probe histograms of tests/reference/data/trt85_entropy2_probes.npz
and prints how many give TensorRT's candidate i (threshold (i + 0.5)·R/2048) and which miss.
The table in docs/algorithms.md ("Remaining misses") is this script's output. --slow adds the
per-candidate variants (float32 accumulation, epsilon smoothing), about a minute each.
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from trtcal.core.scales import _argmin_last, entropy_divergences, entropy_start_bin  # noqa: E402

NUM_BINS = 2048
Curve = tuple[np.ndarray, np.ndarray]


def trt_candidates(z) -> dict[str, int]:
    out = {}
    for name, r, hexval in zip(z["names"], z["hist_amax"], z["entropy2_hex"]):
        amax = struct.unpack(">f", bytes.fromhex(str(hexval)))[0] * 127
        out[str(name)] = int(round(amax / (float(r) / NUM_BINS) - 0.5))
    return out


def bin0(h: np.ndarray, rule: str) -> np.ndarray:
    h = h.astype(np.int64).copy()
    if rule == "drop":
        h[0] = 0
    elif rule == "bin1":
        h[0] = h[1]
    return h


def last_min(cand: np.ndarray, kl: np.ndarray, mask: np.ndarray | None = None) -> int | None:
    k = kl if mask is None else np.where(mask, kl, np.inf)
    return int(cand[_argmin_last(k)]) if np.isfinite(k).any() else None


def pick_global(cand, kl, h):
    return last_min(cand, kl) or NUM_BINS


def pick_no_single(cand, kl, h):
    return last_min(cand, kl, cand >= entropy_start_bin(h)) or NUM_BINS


def pick_coarse(stride: int, window: int):
    def pick(cand, kl, h):
        coarse = last_min(cand, kl, cand % stride == 0)
        if coarse is None:
            return pick_global(cand, kl, h)
        return last_min(cand, kl, np.abs(cand - coarse) <= window) or NUM_BINS

    return pick


def pick_early(descending: bool):
    def pick(cand, kl, h):
        order = range(cand.size - 1, -1, -1) if descending else range(cand.size)
        best, best_kl = None, np.inf
        for j in order:
            if not np.isfinite(kl[j]):
                continue
            if kl[j] <= best_kl:
                best, best_kl = int(cand[j]), kl[j]
            else:
                break
        return best or NUM_BINS

    return pick


def q_by_total(h: np.ndarray) -> Curve:
    cand, kl = entropy_divergences(h)
    cum = np.cumsum(h)
    with np.errstate(divide="ignore"):
        return cand, kl + np.log(cum[-1] / cum[cand - 1])


def direct_curve(h: np.ndarray, dtype=np.float64, eps: float = 0.0) -> Curve:
    """KL(P || Q) one candidate at a time, in `dtype`; eps > 0: MXNet/TVM-style smoothing of P and
    Q (zeros get eps, non-zeros lose eps·zeros/non-zeros), on counts."""
    cand = np.arange(128, h.size + 1)
    kl = np.full(cand.size, np.inf)
    hf = h.astype(dtype)
    for j, i in enumerate(cand):
        p = hf[:i].copy()
        p[i - 1] += hf[i:].sum(dtype=dtype)
        level = (128 * np.arange(i)) // i
        nz = h[:i] > 0
        tot = np.bincount(level, weights=hf[:i], minlength=128).astype(dtype)
        cnt = np.bincount(level, weights=nz, minlength=128)
        q = np.where(nz, tot[level] / np.maximum(cnt[level], 1), 0).astype(dtype)
        if np.any((p > 0) & (q == 0)) or q.sum() == 0:
            continue
        if eps:
            for v in (p, q):
                zero = v == 0
                if zero.any():
                    v += np.where(zero, dtype(eps), -dtype(eps * zero.sum() / (~zero).sum()))
            if (p <= 0).any() or (q <= 0).any():
                continue  # smoothing took a bin below zero: no distribution (MXNet fails here too)
        p /= p.sum(dtype=dtype)
        q /= q.sum(dtype=dtype)
        m = p > 0
        value = float(np.sum(p[m] * np.log(p[m] / q[m]), dtype=dtype))
        kl[j] = value if np.isfinite(value) else np.inf
    return cand, kl


def score(label: str, hists: dict[str, np.ndarray], trt: dict[str, int], curve: Callable, pick: Callable) -> None:
    miss = []
    for name, h in hists.items():
        cand, kl = curve(h)
        got = pick(cand, kl, h)
        if got != trt[name]:
            miss.append(f"{name} {trt[name]}/{got}")
    shown = ", ".join(miss[:6]) + (" …" if len(miss) > 6 else "")
    print(f"{len(hists) - len(miss):4d}/{len(hists)}  {label}  misses (TensorRT i/rule i): {shown}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probes", nargs="?", default=str(ROOT / "tests/reference/data/trt85_entropy2_probes.npz"))
    ap.add_argument("--slow", action="store_true")
    ap.add_argument("--only-slow", action="store_true", help="skip the fast table")
    a = ap.parse_args()
    z = np.load(a.probes)
    trt = trt_candidates(z)
    raw = {str(n): c for n, c, r in zip(z["names"], z["counts"], z["hist_amax"]) if r > 0}
    odd = sum(1 for n in raw if trt[n] % 2)
    print(f"{len(raw)} probes; TensorRT's i is odd for {odd} (so no search over a 2x-decimated histogram)")
    fast = lambda h: entropy_divergences(h)  # noqa: E731
    for rule in () if a.only_slow else ("drop", "bin1", "keep"):
        hists = {n: bin0(c, rule) for n, c in raw.items()}
        score(f"bin 0 {rule}, global minimum", hists, trt, fast, pick_global)
        score(f"bin 0 {rule}, no single-bin clip", hists, trt, fast, pick_no_single)
    for rule in () if a.only_slow else ("drop", "bin1"):
        hists = {n: bin0(c, rule) for n, c in raw.items()}
        for stride, window in ((128, 0), (128, 64), (128, 127), (128, 256), (64, 63), (256, 255)):
            score(f"bin 0 {rule}, coarse stride {stride} then +-{window}", hists, trt, fast, pick_coarse(stride, window))
        score(f"bin 0 {rule}, Q normalised by N (clipping costs ln(N/C_i))", hists, trt, q_by_total, pick_global)
        score(f"bin 0 {rule}, from i=2048 down, stop when KL rises", hists, trt, fast, pick_early(True))
        score(f"bin 0 {rule}, from i=128 up, stop when KL rises", hists, trt, fast, pick_early(False))
    if a.slow or a.only_slow:
        hists = {n: bin0(c, "drop") for n, c in raw.items()}
        score("bin 0 drop, float32 per candidate", hists, trt, lambda h: direct_curve(h, np.float32), pick_global)
        for eps in (1e-4, 1e-2, 1.0):
            score(f"bin 0 drop, smoothing eps={eps}", hists, trt, lambda h, e=eps: direct_curve(h, eps=e), pick_global)
        hists = {n: bin0(c, "bin1") for n, c in raw.items()}
        score("bin 0 bin1, float32 per candidate", hists, trt, lambda h: direct_curve(h, np.float32), pick_global)
        score("bin 0 bin1, smoothing eps=1e-4", hists, trt, lambda h: direct_curve(h, eps=1e-4), pick_global)


if __name__ == "__main__":
    main()
