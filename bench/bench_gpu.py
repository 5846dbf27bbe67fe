"""GPU statistics against their anchors, timed in the same run (issue 9). Runs on a CUDA machine.

1. Kernels: the 2048-bin histogram and the pass-1 stats kernels over 1 GiB of float32 on the GPU,
   as a fraction of the card's device-to-device copy bandwidth measured in the same run (bytes
   read + written, as copy bandwidth is quoted), against torch.histc on the same data and the CPU
   NumPy path (trtcal.core.fill_counts, one core). Counts are checked equal to the CPU's.
2. EfficientNet-Lite0 statistics, both passes over all 95 activation tensors, for N real-photo
   views (tests.fixtures.data): the GPU TorchRunner vs the CPU ONNX Runtime runner (timed on
   fewer inputs and scaled linearly; printed as such), and 1 vs 2 GPUs through
   DataParallelStatistics (one persistent worker process per GPU; start-up reported apart).
   The merged 2-GPU statistics are checked bit-identical to the 1-GPU ones.

Run:  python bench/bench_gpu.py [--inputs 10000] [--cpu-inputs 128] [--micro-batch 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.data import INPUT_NAME, PREPROCESS_SPEC, efficientnet_model_path, view  # noqa: E402
from trtcal.core import fill_counts, reduce_stats  # noqa: E402

MODEL_PATH = efficientnet_model_path()  # $TRTCAL_TEST_MODEL, else fetched once by trtcal.demo.model_zoo

RESULTS: dict[str, object] = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def cuda_median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_kernels(num_floats: int) -> None:
    import torch

    from trtcal.runners.gpu_histogram import DeviceHistogramCollector, DeviceStatsCollector, cupy_available

    dev = torch.device("cuda", 0)
    nbytes = num_floats * 4
    src = torch.empty(num_floats, device=dev).normal_()
    dst = torch.empty_like(src)
    copy_ms = cuda_median_ms(lambda d=dst, s=src: d.copy_(s))
    copy_bw = 2 * nbytes / (copy_ms / 1e3)
    log(f"device-to-device copy, {nbytes / 2**30:.1f} GiB: {copy_ms:.3f} ms -> {copy_bw / 1e12:.3f} TB/s (read + write)")
    RESULTS["copy_bandwidth_TBps"] = copy_bw / 1e12
    del dst

    gen = torch.Generator(device=dev).manual_seed(0)
    data = {
        "relu6-like (40% zeros, pile at 6.0)": (torch.randn(num_floats, device=dev, generator=gen) * 4 - 1).clamp_(0, 6),
        "normal": torch.randn(num_floats, device=dev, generator=gen) * 3,
    }
    del src
    backends = ["cupy", "torch"] if cupy_available() else ["torch"]
    if cupy_available():
        from trtcal.runners.gpu_histogram import _CupyKernels

        k = _CupyKernels.get(0)
        for name, fn in (("histogram", k.hist), ("stats", k.stats)):
            log(f"cupy {name} kernel: {fn.num_regs} registers, {fn.local_size_bytes} bytes local memory (spills)")
    rows = []
    for label, x in data.items():
        amax = float(x.abs().max())
        for backend in backends:
            hist = DeviceHistogramCollector({"x": amax}, device=dev, backend=backend)
            ms = cuda_median_ms(lambda h=hist, x=x: h.update("x", x), iters=10 if backend == "torch" else 20)
            rows.append((label, f"histogram, {backend} kernels", ms))
            stats = DeviceStatsCollector(["x"], device=dev, backend=backend)
            ms = cuda_median_ms(lambda s=stats, x=x: s.update("x", x), iters=10 if backend == "torch" else 20)
            rows.append((label, f"pass-1 stats, {backend} kernels", ms))
        ms = cuda_median_ms(lambda x=x, a=amax: torch.histc(x.abs(), bins=2048, min=0, max=a), iters=10)
        rows.append((label, "torch.histc(|x|) (float counts, different bin rule)", ms))
        xa = x.abs()
        ms = cuda_median_ms(lambda xa=xa, a=amax: torch.histc(xa, bins=2048, min=0, max=a), iters=10)
        rows.append((label, "torch.histc on precomputed |x|", ms))
        del xa
        # Equality on a 16 M slice: every GPU path against the CPU reference.
        part = x[: 1 << 24]
        host = part.cpu().numpy()
        want = fill_counts(host, 2048, amax)
        for backend in backends:
            h = DeviceHistogramCollector({"x": amax}, device=dev, backend=backend)
            h.update("x", part)
            assert np.array_equal(h.results()["x"].counts, want), f"{backend} counts differ from the CPU's"
            s = DeviceStatsCollector(["x"], device=dev, backend=backend)
            s.update("x", part)
            assert s.results()["x"] == reduce_stats(host), f"{backend} stats differ from the CPU's"
        # CPU NumPy path, one core, on 64 M floats of the same data (scaled to GB/s).
        cpu = x[: 1 << 26].cpu().numpy()
        best = min(_timed(lambda c=cpu, a=amax: fill_counts(c, 2048, a)) for _ in range(3))
        rows.append((label, "CPU NumPy trtcal.core.fill_counts (1 core)", best * 1e3 * (num_floats / cpu.size)))
        del cpu
    log("\nkernel throughput over %.1f GiB float32 (median of CUDA-event timings; CPU: best of 3, scaled):" % (nbytes / 2**30))
    log(f"{'data':38s} {'kernel':55s} {'ms':>9s} {'GB/s read':>10s} {'of copy BW':>10s}")
    table = []
    for label, what, ms in rows:
        gbps = nbytes / (ms / 1e3) / 1e9
        frac = gbps * 1e9 / copy_bw
        log(f"{label:38s} {what:55s} {ms:9.3f} {gbps:10.1f} {frac:9.1%}")
        table.append({"data": label, "kernel": what, "ms": ms, "GBps_read": gbps, "fraction_of_copy_bw": frac})
    RESULTS["kernels"] = table
    RESULTS["kernel_counts_equal_cpu"] = True
    del data
    torch.cuda.empty_cache()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _views(indices: range) -> tuple[list[str], np.ndarray]:
    out = [view(i) for i in indices]
    return [i for i, _ in out], np.stack([x for _, x in out])


def make_batch(path: Path, n: int) -> None:
    from trtcal.batch import write_batch

    t0 = time.perf_counter()
    chunks = [range(a, min(a + 64, n)) for a in range(0, n, 64)]
    arrays = np.empty((n, 3, 224, 224), dtype=np.float32)
    ids: list[str] = []
    with get_context("spawn").Pool(max(1, (os.cpu_count() or 2) - 1)) as pool:
        for rng, (chunk_ids, chunk) in zip(chunks, pool.imap(_views, chunks)):
            arrays[rng.start : rng.stop] = chunk
            ids += chunk_ids
    t1 = time.perf_counter()
    write_batch(path, {INPUT_NAME: arrays}, ids, spec=PREPROCESS_SPEC)
    log(f"batch: {n} real-photo views, {arrays.nbytes / 1e9:.2f} GB; preprocessing {t1 - t0:.1f} s, writing {time.perf_counter() - t1:.1f} s")


def bench_end_to_end(args: argparse.Namespace, workdir: Path) -> None:
    import torch

    from trtcal.batch import open_batch
    from trtcal.runners.data_parallel import DataParallelStatistics, WorkerSpec
    from trtcal.runners.onnxruntime import OnnxRuntimeRunner
    from trtcal.runners.torch_runner import TorchRunner

    n, mb = args.inputs, args.micro_batch
    path = workdir / f"views-{n}.arrow"
    if not path.exists():
        make_batch(path, n)
    batch = open_batch(path, verify=False)

    def both_passes(runner, rows: int, micro: int):
        t0 = time.perf_counter()
        stats = runner.collect_stats(batch, stop=rows, micro_batch=micro)
        t1 = time.perf_counter()
        amax = {k: s.amax for k, s in stats.items()}
        counts = runner.collect_counts(batch, amax, num_bins=2048, stop=rows, micro_batch=micro)
        t2 = time.perf_counter()
        return stats, counts, t1 - t0, t2 - t1

    # GPU, one card, in this process.
    gpu = TorchRunner(MODEL_PATH, device="cuda:0")
    both_passes(gpu, min(n, 2 * mb), mb)  # warm-up: kernels compiled, cuDNN handles made
    g_stats, g_counts, g1, g2 = both_passes(gpu, n, mb)
    gpu_s = g1 + g2
    log(f"\nGPU TorchRunner (cupy kernels: {gpu.kernel_backend}), {n} inputs, micro-batch {mb}: "
        f"pass 1 {g1:.2f} s + pass 2 {g2:.2f} s = {gpu_s:.2f} s ({n / gpu_s:.0f} inputs/s)")
    RESULTS["gpu_single"] = {"inputs": n, "micro_batch": mb, "pass1_s": g1, "pass2_s": g2, "total_s": gpu_s,
                             "device": torch.cuda.get_device_name(0), "tensors": len(g_stats)}  # fmt: skip

    # Forward only (no statistics): what the statistics cost on top of inference.
    rows = min(n, 2048)
    from trtcal.runners.torch_runner import _inference, fp32_exact

    with fp32_exact(), _inference():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for feeds, _ in gpu._micro_batches(batch, 0, rows, mb):
            for _name, _value in gpu._forward(feeds):
                pass
        torch.cuda.synchronize()
        fwd = time.perf_counter() - t0
    log(f"  forward only (no statistics), {rows} inputs: {fwd:.2f} s ({rows / fwd:.0f} inputs/s); "
        f"one statistics pass: {g1 / n * rows:.2f} s for the same inputs")
    RESULTS["gpu_forward_only"] = {"inputs": rows, "s": fwd}

    # PyTorch-only kernels (no CuPy), fewer inputs.
    rows = min(n, args.torch_kernel_inputs)
    tk = TorchRunner(MODEL_PATH, device="cuda:0", kernel_backend="torch")
    both_passes(tk, min(rows, mb), mb)
    _, _, t1, t2 = both_passes(tk, rows, mb)
    log(f"GPU TorchRunner, torch-op kernels (PyTorch-only image), {rows} inputs: {t1 + t2:.2f} s "
        f"({rows / (t1 + t2):.0f} inputs/s)")
    RESULTS["gpu_single_torch_kernels"] = {"inputs": rows, "total_s": t1 + t2}

    # CPU ONNX Runtime path (all cores of this machine), fewer inputs, scaled linearly.
    cpu_rows = min(n, args.cpu_inputs)
    cpu = OnnxRuntimeRunner(MODEL_PATH, device="cpu")
    c_stats, _, c1, c2 = both_passes(cpu, cpu_rows, 32)
    cpu_per_input = (c1 + c2) / cpu_rows
    cpu_scaled = cpu_per_input * n
    log(f"CPU ONNX Runtime runner ({os.cpu_count()} cores), {cpu_rows} inputs: pass 1 {c1:.2f} s + pass 2 {c2:.2f} s "
        f"= {c1 + c2:.2f} s -> {cpu_scaled:.0f} s for {n} inputs (scaled linearly)")
    log(f"  => GPU is {cpu_scaled / gpu_s:.1f}x faster than the CPU path (goal >= 20x)")
    g_small = gpu.collect_stats(batch, stop=cpu_rows, micro_batch=32)
    worst = max(abs(g_small[k].amax - s.amax) / s.amax for k, s in c_stats.items() if s.amax)
    log(f"  GPU vs CPU amax on the same {cpu_rows} inputs: max relative difference {worst:.2e} (different FP32 kernels)")
    RESULTS["cpu_ort"] = {"inputs": cpu_rows, "pass1_s": c1, "pass2_s": c2, "cores": os.cpu_count(),
                          "scaled_s": cpu_scaled, "speedup_gpu": cpu_scaled / gpu_s, "amax_max_rel_diff": worst}  # fmt: skip

    # Data parallel: one worker process per GPU.
    gpus = torch.cuda.device_count()
    spec = WorkerSpec(model=str(MODEL_PATH), batch=str(path), runner="torch")
    dp: dict[int, tuple] = {}
    for k in sorted({1, min(2, gpus)} if gpus > 1 else {1}):
        devices = [f"cuda:{i}" for i in range(k)]
        t0 = time.perf_counter()
        with DataParallelStatistics(spec, devices) as pool:
            started = time.perf_counter() - t0
            pool.collect(min(n, 2 * mb * k), micro_batch=mb)  # warm-up on the first rows
            t0 = time.perf_counter()
            stats, counts = pool.collect(n, micro_batch=mb)
            elapsed = time.perf_counter() - t0
        dp[k] = (stats, counts, elapsed)
        log(f"DataParallelStatistics on {devices}: {elapsed:.2f} s for {n} inputs ({n / elapsed:.0f} inputs/s); "
            f"worker start-up {started:.1f} s (once per actor, not per calibration)")
        RESULTS[f"dp_{k}"] = {"devices": devices, "s": elapsed, "startup_s": started}
    same_as_single = dp[1][0] == g_stats and all(np.array_equal(dp[1][1][t], g_counts[t]) for t in g_counts)
    log(f"  1-worker result == in-process result, bit for bit: {same_as_single}")
    RESULTS["dp1_equals_inprocess"] = same_as_single
    if 2 in dp:
        equal = dp[2][0] == dp[1][0] and all(np.array_equal(dp[2][1][t], dp[1][1][t]) for t in dp[1][1])
        log(f"  2 GPUs vs 1: {dp[1][2] / dp[2][2]:.2f}x (goal >= 1.8x); merged statistics bit-identical: {equal}")
        RESULTS["dp_speedup"] = dp[1][2] / dp[2][2]
        RESULTS["dp2_equals_dp1"] = equal
    else:
        log("  2 GPUs vs 1: not measured, this machine has one GPU")
    batch.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--cpu-inputs", type=int, default=128)
    parser.add_argument("--torch-kernel-inputs", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument("--kernel-gib", type=float, default=1.0)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    log(f"machine: {platform.machine()}, {os.cpu_count()} cpus; GPUs: {names}; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    RESULTS["gpus"] = names
    RESULTS["torch"] = torch.__version__
    if not args.skip_kernels:
        bench_kernels(int(args.kernel_gib * 2**30 / 4))
    if not args.skip_e2e:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="trtcal-bench-"))
        workdir.mkdir(parents=True, exist_ok=True)
        bench_end_to_end(args, workdir)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2, default=str))


if __name__ == "__main__":
    main()
