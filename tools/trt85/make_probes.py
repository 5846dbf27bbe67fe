#!/usr/bin/env python3
"""Crafted activations for black-box experiments on TensorRT's calibrators (runs anywhere).

Each probe is one tensor whose |x| histogram we control exactly. It is stored compactly as its
distinct float32 values and how often each occurs (`v:NAME`, `c:NAME`); the GPU side
(probe_trt.py) expands it with np.repeat, so both machines see the same bytes.

Most probes put every value at a bin centre (k + 0.5)·R/2048 of a power-of-two range R, plus
exactly one value equal to R (the max), so the 2048-bin histogram is the same under any
reasonable binning arithmetic: the experiments then test the *search*, not the binning. A few
"edge" probes use a non-power-of-two R and values on or next to bin edges to test the binning.

usage: make_probes.py OUT.npz [--seed 0]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

NUM_BINS = 2048


def centres(r: float) -> np.ndarray:
    return ((np.arange(NUM_BINS, dtype=np.float64) + 0.5) * (r / NUM_BINS)).astype(np.float32)


def from_counts(counts: np.ndarray, r: float, zeros: int = 0, signed: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Values at bin centres with the given counts, one value == r, `zeros` exact zeros.

    Half of each bin's values (rounded down) are negative when `signed`: TensorRT's histogram is
    of |x|, which the experiments check too.
    """
    counts = np.asarray(counts, dtype=np.int64).copy()
    vals, cnts = [], []
    c = centres(r)
    nz = np.nonzero(counts)[0]
    for k in nz:
        n = int(counts[k])
        neg = n // 2 if signed else 0
        if n - neg:
            vals.append(c[k])
            cnts.append(n - neg)
        if neg:
            vals.append(-c[k])
            cnts.append(neg)
    vals.append(np.float32(r))
    cnts.append(1)
    if zeros:
        vals.append(np.float32(0.0))
        cnts.append(zeros)
    return np.asarray(vals, dtype=np.float32), np.asarray(cnts, dtype=np.int64)


def density_counts(pdf: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Multinomial counts of n samples over the 2048 bins with probabilities ~ pdf."""
    p = np.asarray(pdf, dtype=np.float64)
    p = p / p.sum()
    return rng.multinomial(n, p)


def build(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    rng = np.random.default_rng(seed)
    probes: dict[str, tuple[np.ndarray, np.ndarray, dict]] = {}
    x = (np.arange(NUM_BINS) + 0.5) / NUM_BINS  # bin centres in units of R
    R = 4.0

    def add(name, vals_cnts, **meta):
        probes[name] = (vals_cnts[0], vals_cnts[1], meta)

    # 1. Smooth shapes at several sample counts: half-normal and Laplace (|x| exponential).
    for shape in ("hnorm", "laplace"):
        for s in (0.01, 0.03, 0.08, 0.2, 0.4):
            for n in (2_000, 50_000, 1_000_000):
                pdf = np.exp(-0.5 * (x / s) ** 2) if shape == "hnorm" else np.exp(-x / s)
                add(f"{shape}_s{s}_n{n}", from_counts(density_counts(pdf, n, rng), R), family=shape, s=s, n=n)
    # 2. The same body with a zero spike (ReLU outputs): exact zeros 0 %, 20 %, 50 %, 90 %.
    body = density_counts(np.exp(-x / 0.1), 200_000, rng)
    for z in (0.0, 0.2, 0.5, 0.9):
        zeros = int(round(200_000 * z / (1 - z)))
        add(f"zspike_z{z}", from_counts(body, R, zeros=zeros), family="zspike", z=z)
    # Zero spike on a wide body (ReLU6-like: flat to the top with a pile at R).
    flat = density_counts(np.ones(NUM_BINS), 100_000, rng)
    for z in (0.0, 0.3, 0.7, 0.95):
        zeros = int(round(100_000 * z / (1 - z)))
        c = flat.copy()
        c[-1] += 5_000
        add(f"relu6_z{z}", from_counts(c, R, zeros=zeros), family="relu6", z=z)
    # 3. Uniform bodies of several widths (a = fraction of the range) plus the max.
    for a in (0.05, 0.3, 0.6, 0.95, 1.0):
        pdf = (x <= a).astype(float)
        add(f"uniform_a{a}", from_counts(density_counts(pdf, 300_000, rng), R), family="uniform", a=a)
    # 4. Few distinct values (sparse histograms): k levels at random bins, random counts.
    for k in (1, 2, 3, 5, 10, 30, 100, 400):
        for rep in range(2):
            c = np.zeros(NUM_BINS, dtype=np.int64)
            bins = rng.choice(NUM_BINS, size=k, replace=False)
            c[bins] = rng.integers(1, 5_000, size=k)
            add(f"sparse_k{k}_r{rep}", from_counts(c, R), family="sparse", k=k)
    # 5. Tiny sample counts.
    for n in (1, 2, 5, 20, 100, 500):
        pdf = np.exp(-x / 0.1)
        add(f"tiny_n{n}", from_counts(density_counts(pdf, n, rng), R), family="tiny", n=n)
    # 6. Mass concentrated below bin 128 plus outliers (tests the first candidate).
    for top in (20, 64, 127, 128, 129, 200):
        pdf = (np.arange(NUM_BINS) < top).astype(float)
        c = density_counts(pdf, 100_000, rng)
        add(f"low_top{top}", from_counts(c, R), family="low", top=top)
    # 7. Combs: every m-th bin filled (tests how empty bins are expanded in Q).
    for m in (2, 3, 7, 16, 17):
        c = np.zeros(NUM_BINS, dtype=np.int64)
        idx = np.arange(0, NUM_BINS, m)
        c[idx] = density_counts(np.exp(-x[idx] / 0.15), 200_000, rng)
        add(f"comb_m{m}", from_counts(c, R), family="comb", m=m)
    # 8. Bimodal and heavy tails.
    for mu in (0.2, 0.5, 0.8):
        pdf = np.exp(-0.5 * ((x - mu) / 0.03) ** 2) + np.exp(-x / 0.02)
        add(f"bimodal_mu{mu}", from_counts(density_counts(pdf, 400_000, rng), R), family="bimodal", mu=mu)
    for alpha in (1.5, 2.5, 4.0):
        pdf = (1 + x / 0.01) ** (-alpha)
        add(f"pareto_a{alpha}", from_counts(density_counts(pdf, 400_000, rng), R), family="pareto", alpha=alpha)
    # 9. Random piecewise shapes (many generic cases for fitting).
    for rep in range(60):
        knots = np.sort(rng.uniform(0, 1, size=rng.integers(2, 6)))
        level = rng.exponential(1.0, size=knots.size + 1) * (rng.uniform(size=knots.size + 1) < 0.8)
        level[0] = max(level[0], 0.1)
        pdf = level[np.searchsorted(knots, x)] * np.exp(-x / rng.uniform(0.02, 1.0))
        n = int(10 ** rng.uniform(3, 6))
        zeros = int(n * rng.choice([0.0, 0.0, 0.3, 0.6]))
        add(f"rand_{rep}", from_counts(density_counts(pdf, n, rng), R, zeros=zeros), family="rand", n=n)
    # 10. Sign and scale checks: the same counts with all values negative, and at other ranges.
    base = density_counts(np.exp(-x / 0.05), 100_000, rng)
    v, c = from_counts(base, R, signed=False)
    add("sign_pos", (v, c), family="sign")
    add("sign_neg", (-v, c), family="sign")
    for r in (2.0 ** -10, 0.25, 1.0, 64.0, 2.0 ** 20):
        add(f"range_r{r:g}", from_counts(base, r), family="range", r=r)
    # 11. Degenerate: all zeros, a single value, a constant tensor.
    add("all_zero", (np.asarray([0.0], np.float32), np.asarray([1000], np.int64)), family="degenerate")
    add("one_value", (np.asarray([R], np.float32), np.asarray([1], np.int64)), family="degenerate")
    add("constant", (np.asarray([1.5], np.float32), np.asarray([5000], np.int64)), family="degenerate")
    # 12. Binning edges: non-power-of-two ranges, values exactly on, and one ulp around, edges.
    for r in (3.0, 0.7, 10.0 / 3.0):
        c = density_counts(np.exp(-x / 0.1), 100_000, rng)
        v, cnt = from_counts(c, r)
        edges64 = np.arange(1, NUM_BINS) * (r / NUM_BINS)
        pick = rng.choice(NUM_BINS - 1, size=300, replace=False)
        e = edges64[pick].astype(np.float32)
        extra = np.concatenate([e, np.nextafter(e, np.float32(0)), np.nextafter(e, np.float32(np.inf))])
        v = np.concatenate([v, extra]).astype(np.float32)
        cnt = np.concatenate([cnt, rng.integers(1, 400, size=extra.size)])
        add(f"edges_r{r:.4f}", (v, cnt), family="edges", r=r)
    # Non-power-of-two ranges with plain random data (binning arithmetic at scale).
    for r in (3.0, 0.7, 1.2345, 255.0):
        vals = (np.abs(rng.standard_normal(200_000)) * (r / 8)).astype(np.float32)
        vals = np.minimum(vals, np.float32(r))
        vals[0] = np.float32(r)
        u, cnt = np.unique(vals, return_counts=True)
        add(f"gauss_r{r:g}", (u, cnt.astype(np.int64)), family="gauss", r=r)
    # 13. Spikes in the first bins: what happens to bin 0 (exact zeros vs small non-zero values)?
    spike_body = density_counts(np.exp(-x / 0.1), 100_000, rng)
    for where in (0, 1, 2, 3):
        for size in (5_000, 50_000, 500_000):
            c = spike_body.copy()
            c[where] += size
            add(f"spike_b{where}_n{size}", from_counts(c, R), family="spike", where=where, size=size)
    for size in (5_000, 50_000):
        c = spike_body.copy()
        c[0] += size
        add(f"spike_b0z_n{size}", from_counts(c, R, zeros=size), family="spike0z", size=size)
    return probes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    probes = build(a.seed)
    arrays = {}
    meta = {}
    for name, (v, c, m) in probes.items():
        arrays[f"v:{name}"] = v
        arrays[f"c:{name}"] = c
        meta[name] = m
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez_compressed(a.out, **arrays)
    total = sum(int(c.sum()) for _, c, _ in probes.values())
    print(f"{len(probes)} probes, {total:,} values -> {a.out}")


if __name__ == "__main__":
    main()
