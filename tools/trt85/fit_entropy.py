#!/usr/bin/env python3
"""Fit entropy-rule variants to TensorRT's answers on the probes (CPU; after probe_trt.py probes).

usage: fit_entropy.py PROBES.npz RESULT.json [--algo entropy2] [--show 20]
Prints, per variant, how many tensors it reproduces (same i; and bit-exact scale), and the
probes TensorRT answered off the (i + 0.5)·R/2048 lattice.
"""

from __future__ import annotations

import argparse
import itertools
import json
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import variants  # noqa: E402

NUM_BINS = 2048


def hex_to_float(h: str) -> float:
    return struct.unpack(">f", struct.pack(">I", int(h, 16)))[0]


def histogram(values: np.ndarray, counts: np.ndarray, rule: str = "mul32", top: str = "clamp") -> tuple[np.ndarray, float]:
    """|x| counts in 2048 bins of [0, R] (R = max |x|). top="clamp": R itself in bin 2047;
    top="own": R in a bin 2048 of its own (2049 bins)."""
    a = np.abs(values.astype(np.float32))
    r = np.float32(a.max())
    if r == 0:
        return np.zeros(NUM_BINS, np.int64), 0.0
    if rule == "mul32":
        idx = np.floor(a * (np.float32(NUM_BINS) / r))
    elif rule == "div32":
        idx = np.floor(a / (r / np.float32(NUM_BINS)))
    else:
        idx = np.floor(a.astype(np.float64) * NUM_BINS / float(r))
    idx = idx.astype(np.int64)
    if top == "clamp":
        idx = np.minimum(idx, NUM_BINS - 1)
        return np.bincount(idx, weights=counts, minlength=NUM_BINS).astype(np.int64), float(r)
    idx = np.minimum(idx, NUM_BINS)
    return np.bincount(idx, weights=counts, minlength=NUM_BINS + 1).astype(np.int64), float(r)


def tensors(z, result, algo):
    """(probe, kind, values, counts, trt_scale) for every calibrated tensor of the probes."""
    cache = result["caches"][algo]
    for name, info in result["probes"].items():
        v, c = z[f"v:{name}"], z[f"c:{name}"]
        for kind in ("input", "relu"):
            t = info[kind]
            if t not in cache:
                continue
            vv = v if kind == "input" else np.maximum(v, np.float32(0))
            yield name, kind, vv, c, hex_to_float(cache[t])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("probes")
    ap.add_argument("result")
    ap.add_argument("--algo", default="entropy2")
    ap.add_argument("--show", type=int, default=15)
    ap.add_argument("--grid", default="zero,group,levels")
    ap.add_argument("--set", default="", help="fixed parameters, e.g. qsrc=p,mask=p")
    ap.add_argument("--top", default="clamp,own")
    a = ap.parse_args()
    z = np.load(a.probes)
    result = json.load(open(a.result))
    rows = []
    data = list(tensors(z, result, a.algo))
    for name, kind, v, c, s in data:
        h, r = histogram(v, c)
        amax = float(np.float32(s) * np.float32(127))
        i_real = amax / (r / NUM_BINS) - 0.5 if r > 0 else float("nan")
        rows.append((name, kind, h, r, s, amax, i_real))
    off = [(n, k, r, amax, i) for n, k, _, r, _, amax, i in rows if not (r > 0 and abs(i - round(i)) < 1e-3)]
    print(f"{len(rows)} tensors; {len(off)} off the (i+0.5)R/2048 lattice:")
    for n, k, r, amax, i in off[: a.show]:
        print(f"  {n}/{k}: R={r!r} amax={amax!r} i={i:.4f}")
    grid = {
        "zero": ["keep", "suppress", "drop"],
        "group": ["floor", "ceil", "stride", "centre"],
        "mask": ["h", "p"],
        "qsrc": ["h", "p"],
        "expand": ["nz", "all"],
        "stop": [2048, 2047],
        "tie": ["first", "last"],
        "pq0": ["inf", "skip"],
        "start": [128, 127, 1],
        "levels": [128, 127],
    }
    keys = a.grid.split(",")
    fixed = {}
    for item in filter(None, a.set.split(",")):
        k, val = item.split("=")
        fixed[k] = int(val) if val.isdigit() else val
    ok_rows = {(n, k): int(round(i)) for n, k, h, r, _, _, i in rows if r > 0 and abs(i - round(i)) < 1e-3}
    scores = []
    for top in a.top.split(","):
        hists = {}
        for name, kind, v, c, _ in data:
            if (name, kind) in ok_rows:
                hists[(name, kind)] = histogram(v, c, top=top)[0]
        for combo in itertools.product(*(grid[k] for k in keys)):
            kw = {**fixed, **dict(zip(keys, combo))}
            if top == "own":
                kw.setdefault("stop", 2049)
            shift = 1 if top == "own" else 0  # own: i kept bins end at bin B = i - 1
            miss = []
            for key, b_trt in ok_rows.items():
                b = variants.choose(hists[key], **kw) - shift
                if b != b_trt:
                    miss.append((key[0], key[1], b_trt, b))
            scores.append((len(miss), {"top": top, **kw}, miss))
            print(f"  {len(ok_rows) - len(miss)}/{len(ok_rows)} {top} {kw}", flush=True)
    scores.sort(key=lambda s: s[0])
    for nmiss, kw, _miss in scores[:8]:
        print(f"{len(ok_rows) - nmiss}/{len(ok_rows)} same B: {kw}")
    best = scores[0]
    print("misses of the best variant (probe/kind: TensorRT B vs variant B):")
    for n, k, i, j in best[2][: a.show]:
        print(f"  {n}/{k}: {i} vs {j}")


if __name__ == "__main__":
    main()
