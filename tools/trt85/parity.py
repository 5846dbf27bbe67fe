#!/usr/bin/env python3
"""trtcal's scales vs TensorRT's cache for one real model (CPU; after session1.sh).

usage: parity.py E2_CACHE [--dump DUMP.npz] [--minmax MM_CACHE] [--onnx MODEL --views VIEWS.npy]
                 [--offset 127 --scale 0.0078125] [--method entropy2]

Two sources of activations:
  --dump   the |x| histograms of TensorRT's own FP32 engine on the GPU (probe_trt.py dump), so
           the comparison isolates the scale rule from CPU-vs-GPU rounding of the activations;
  --onnx   ONNX Runtime on this CPU over the same inputs (what `trtcal calibrate` sees).
For each TensorRT cache line it reports bit-exact / same bin / further apart.
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from trtcal.core import compute_amax  # noqa: E402
from trtcal.core.histogram import histogram_of  # noqa: E402

NUM_BINS = 2048


def read_cache(path: str) -> dict[str, float]:
    out = {}
    for line in Path(path).read_text().splitlines()[1:]:
        if line.strip():
            name, h = line.rsplit(":", 1)
            out[name] = struct.unpack(">f", bytes.fromhex(h.strip()))[0]
    return out


def scale_of(amax: float) -> float:
    return float(np.float32(np.float32(amax) / np.float32(127.0)))


def ort_histograms(model: str, x: np.ndarray, chunk: int = 8) -> dict[str, tuple[np.ndarray, float]]:
    """Every float activation's exact two-pass histogram (max |x| over all samples, then counts),
    running `chunk` samples at a time so large feature maps fit in memory."""
    import onnx
    import onnxruntime as ort

    m = onnx.shape_inference.infer_shapes(onnx.load(model))
    g = m.graph
    have = {o.name for o in g.output}
    for vi in g.value_info:  # every float activation becomes an output
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and vi.name not in have:
            g.output.append(onnx.helper.make_tensor_value_info(vi.name, onnx.TensorProto.FLOAT, None))
            have.add(vi.name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    fetch = [o.name for o in sess.get_outputs()]

    def runs():
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk]
            vals = sess.run(fetch, {name: part})
            out = {name: part}
            out.update({n: v for n, v in zip(fetch, vals) if isinstance(v, np.ndarray) and v.dtype == np.float32})
            yield out

    amax: dict[str, float] = {}
    for res in runs():
        for n, v in res.items():
            amax[n] = max(amax.get(n, 0.0), float(np.abs(v).max()) if v.size else 0.0)
    counts = {n: np.zeros(NUM_BINS, np.int64) for n in amax}
    for res in runs():
        for n, v in res.items():
            counts[n] += histogram_of(v, num_bins=NUM_BINS, hist_amax=amax[n]).counts
    return {n: (counts[n], amax[n]) for n in amax}


def dump_histograms(path: str, rule: str = "mul32") -> dict[str, tuple[np.ndarray, float]]:
    z = np.load(path)
    out = {}
    for k in z.files:
        if k.startswith("amax:"):
            n = k[5:]
            amax = float(z[k])
            counts = z[f"{rule}:{n}"] if f"{rule}:{n}" in z.files else np.zeros(NUM_BINS + 1, np.int64)
            out[n] = (counts, amax)
    return out


def compare(
    trt: dict[str, float], hists: dict[str, tuple[np.ndarray, float]], method: str, label: str, show: int, mm: dict[str, float] | None = None
) -> None:
    exact = same_bin = far = missing = 0
    same_max = same_max_exact = 0
    worst = []
    for name, s_trt in trt.items():
        if name not in hists:
            missing += 1
            continue
        counts, amax = hists[name]
        if counts.size == NUM_BINS + 1 and method not in ("entropy2_trt",):
            counts = np.concatenate([counts[:-2], [counts[-2] + counts[-1]]])  # R back into bin 2047
        a = compute_amax(counts, amax, method) if amax > 0 else 0.0
        s = scale_of(a) if a > 0 else 0.0
        w = amax / NUM_BINS
        if mm is not None and name in mm and scale_of(amax) == mm[name]:
            same_max += 1
            same_max_exact += s == s_trt
        if s == s_trt:
            exact += 1
        elif w > 0 and abs(s_trt * 127 - a) <= w * 1.0001:
            same_bin += 1
        else:
            far += 1
        if s != s_trt:
            worst.append((abs(s_trt * 127 - a) / (w or 1), name, s_trt * 127, a))
    n = exact + same_bin + far
    print(f"{label}: {n} tensors: {exact} bit-exact, {same_bin} within one bin, {far} further; {missing} not in the activations")
    if mm is not None:
        print(f"  of the {same_max} with TensorRT's max |x| bit for bit: {same_max_exact} bit-exact")
    for d, name, t, a in sorted(worst, reverse=True)[:show]:
        print(f"   {name}: TensorRT amax {t:.6g}, trtcal {a:.6g} ({d:.1f} bins)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache")
    ap.add_argument("--dump")
    ap.add_argument("--minmax")
    ap.add_argument("--onnx")
    ap.add_argument("--views")
    ap.add_argument("--method", default="entropy2")
    ap.add_argument("--offset", default="127", help="uint8 views: float32 = (x - OFFSET) * SCALE, as trt_calibrate.py")
    ap.add_argument("--scale", default="0.0078125")
    ap.add_argument("--rule", default="mul32")
    ap.add_argument("--show", type=int, default=8)
    a = ap.parse_args()
    trt = read_cache(a.cache)
    if a.dump:
        hists = dump_histograms(a.dump, a.rule)
        if a.minmax:
            mm = read_cache(a.minmax)
            same = sum(1 for n, s in mm.items() if n in hists and scale_of(hists[n][1]) == s)
            print(f"dump vs TensorRT MinMax cache: {same}/{len(mm)} max |x| bit-exact")
        compare(trt, hists, a.method, f"{a.method} from TensorRT's activations", a.show, read_cache(a.minmax) if a.minmax else None)
    if a.onnx:
        x = np.load(a.views)
        if x.dtype != np.float32:  # uint8 views, as trt_calibrate.py's load_samples: float32 (x - offset) * scale; float32 as is
            x = (x.astype(np.float32) - np.float32(float(a.offset))) * np.float32(float(a.scale))
        hists = ort_histograms(a.onnx, x)
        if a.minmax:
            mm = read_cache(a.minmax)
            same = sum(1 for n, s in mm.items() if n in hists and scale_of(hists[n][1]) == s)
            print(f"ONNX Runtime vs TensorRT MinMax cache: {same}/{len(mm)} max |x| bit-exact")
        compare(trt, hists, a.method, f"{a.method} from ONNX Runtime's activations", a.show, read_cache(a.minmax) if a.minmax else None)


if __name__ == "__main__":
    main()
