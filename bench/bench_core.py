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


def bench_entropy(repeat: int) -> None:
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

    try:
        import torch  # noqa: F401
        from modelopt.torch.quantization.calib.histogram import _compute_amax_entropy
    except Exception as exc:  # ModelOpt needs torch; report instead of faking a number
        print(f"ModelOpt _compute_amax_entropy: not measured ({type(exc).__name__}: {exc})")
    else:
        mo_edges = np.linspace(0, amax, counts.size + 1)
        mo_fn = lambda: _compute_amax_entropy(counts.copy(), mo_edges, 8, False, stride=1, start_bin=128)  # noqa: E731
        t_mo = best_of(mo_fn, 1)
        print(f"entropy (ModelOpt _compute_amax_entropy, same histogram): {t_mo * 1e3:.1f} ms  -> trtcal is {t_mo / t_ours:.0f}x faster  amax={float(mo_fn()):.4f}")


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
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, numpy {np.__version__}, OMP_NUM_THREADS=1")
    bench_entropy(repeat=3 if args.quick else 20)
    bench_fill(2_000_000 if args.quick else 128_000_000, repeat=1 if args.quick else 3)


if __name__ == "__main__":
    main()
