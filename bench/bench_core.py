"""Core kernels against their anchors, timed in the same run.

1. Entropy2 search over all candidates of one 2048-bin histogram vs
   ONNX Runtime's HistogramCollector.get_entropy_threshold and ModelOpt's _compute_amax_entropy
   (both given the same histogram: ORT needs a signed histogram, so it gets the mirrored
   4096-bin version with 256 quantized bins = 128 levels per side, its TensorRT-like setting).
2. Histogram filling throughput (float32 input, one core) vs numpy.histogram.

Run:  .venv/bin/python bench/bench_core.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from trtcal.core import compute_amax, fill_counts, histogram_of  # noqa: E402


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_entropy(repeat: int, modelopt_python: str | None = None) -> None:
    rng = np.random.default_rng(0)
    x = np.abs(rng.laplace(size=2_000_000)).astype(np.float32)
    h = histogram_of(x)
    counts, amax = h.counts, h.hist_amax
    t_ours = best_of(lambda: compute_amax(counts, amax, "entropy2"), repeat)
    print(f"entropy2 (trtcal, 1921 candidates, 2048 bins): {t_ours * 1e3:.2f} ms  amax={compute_amax(counts, amax, 'entropy2'):.4f}")

    from onnxruntime.quantization.calibrate import HistogramCollector

    signed = np.concatenate([counts[::-1], counts]).astype(np.int64)
    edges = np.linspace(-amax, amax, signed.size + 1, dtype=np.float32)
    collector = HistogramCollector("entropy", symmetric=True, num_bins=signed.size, num_quantized_bins=256, percentile=99.99, scenario="same")
    ort_fn = lambda: collector.get_entropy_threshold((signed, edges, -amax, amax, amax), 256)  # noqa: E731
    t_ort = best_of(ort_fn, 1)
    print(f"entropy (ONNX Runtime HistogramCollector, same histogram mirrored): {t_ort * 1e3:.1f} ms  -> trtcal is {t_ort / t_ours:.0f}x faster  threshold={ort_fn()[1]:.4f}")

    bench_modelopt(counts, amax, t_ours, modelopt_python)


# Runs inside ModelOpt's own environment (it pins onnxruntime-gpu, so it cannot share ours).
_MODELOPT_SCRIPT = """
import sys, time, numpy as np
from modelopt.torch.quantization.calib.histogram import _compute_amax_entropy
counts = np.load(sys.argv[1]); amax = float(sys.argv[2])
edges = np.linspace(0, amax, counts.size + 1)
best = min((lambda t0: (_compute_amax_entropy(counts.copy(), edges, 8, False, stride=1, start_bin=128), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(3))
print(best, float(_compute_amax_entropy(counts.copy(), edges, 8, False, stride=1, start_bin=128)))
"""


def bench_modelopt(counts: np.ndarray, amax: float, t_ours: float, python: str | None) -> None:
    import subprocess
    import tempfile

    if not python:
        print("ModelOpt _compute_amax_entropy: not measured (pass --modelopt-python, the interpreter of a venv with "
              "`pip install 'nvidia-modelopt[onnx]' torch==2.13.0 requests huggingface_hub`)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "counts.npy")
        np.save(path, counts)
        out = subprocess.run([python, "-c", _MODELOPT_SCRIPT, path, repr(amax)], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"ModelOpt _compute_amax_entropy: failed to run ({out.stderr.strip().splitlines()[-1:]})")
        return
    seconds, mo_amax = (float(v) for v in out.stdout.split())
    print(f"entropy (ModelOpt 0.47 _compute_amax_entropy, same histogram): {seconds * 1e3:.1f} ms  -> trtcal is "
          f"{seconds / t_ours:.0f}x faster  amax={mo_amax:.4f}")


def bench_fill(size: int, repeat: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(size).astype(np.float32)
    amax = float(np.abs(x).max())
    t_ours = best_of(lambda: fill_counts(x, 2048, amax), repeat)
    t_np = best_of(lambda: np.histogram(np.abs(x), bins=2048, range=(0.0, amax)), repeat)
    gbps = x.nbytes / t_ours / 1e9
    print(f"histogram fill, {x.nbytes / 1e6:.0f} MB float32, 2048 bins: trtcal {gbps:.2f} GB/s; "
          f"numpy.histogram(|x|) {x.nbytes / t_np / 1e9:.2f} GB/s  -> ratio {t_np / t_ours:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke test)")
    parser.add_argument("--modelopt-python", default=None, help="python of a venv with nvidia-modelopt (the anchor)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, numpy {np.__version__}, OMP_NUM_THREADS=1")
    bench_entropy(repeat=3 if args.quick else 20, modelopt_python=args.modelopt_python)
    bench_fill(2_000_000 if args.quick else 128_000_000, repeat=1 if args.quick else 3)


if __name__ == "__main__":
    main()
