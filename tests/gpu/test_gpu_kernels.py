"""The device kernels and runners on a real GPU: identical counts and stats to trtcal.core given the
same activations (both kernel backends), FP32 activations close to ONNX Runtime's, deterministic
passes, and one worker per GPU merging bit for bit. Skipped where PyTorch sees no CUDA GPU."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (PyTorch sees no CUDA device)"),
]

from tests.fixtures.data import INPUT_NAME, photo_views  # noqa: E402
from tests.unit.runners.test_gpu_histogram import CASE_IDS, CASES, assert_same_as_core  # noqa: E402
from trtcal.core import fill_counts, merge_stats, reduce_stats  # noqa: E402
from trtcal.errors import NonFiniteError  # noqa: E402
from trtcal.runners.gpu_histogram import (  # noqa: E402
    DeviceHistogramCollector,
    DeviceStatsCollector,
    cupy_available,
    fill_counts_device,
    reduce_stats_device,
)

F32 = np.float32
BACKENDS = ["torch", pytest.param("cupy", marks=pytest.mark.skipif(not cupy_available(), reason="CuPy not installed"))]


def cuda_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.copy()).cuda()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("label", "x", "num_bins", "hist_amax"), CASES, ids=CASE_IDS)
def test_gpu_equals_core(backend: str, label: str, x: np.ndarray, num_bins: int, hist_amax: float) -> None:
    assert_same_as_core(x, num_bins, hist_amax, to_tensor=cuda_tensor, backend=backend)


def activation_like(n: int, seed: int) -> np.ndarray:
    """ReLU6-like: about 40 % exact zeros, a pile at exactly 6.0, the rest spread (real activations)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.standard_normal(n).astype(F32) * 4 - 1, 0, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_tensors_and_odd_views(backend: str) -> None:
    rng = np.random.default_rng(11)
    big = activation_like(50_000_003, 1)
    assert_same_as_core(big, 2048, 6.0, to_tensor=cuda_tensor, backend=backend)
    normal = rng.standard_normal(20_000_001).astype(F32) * 3
    assert_same_as_core(normal, 2048, float(np.abs(normal).max()) * 0.731, to_tensor=cuda_tensor, backend=backend)
    base = cuda_tensor(rng.standard_normal((1001, 257)).astype(F32))
    for view in (base[:, 1:], base.t(), base.reshape(-1)[3:], base[::2]):
        ref = np.ascontiguousarray(view.cpu().numpy())
        amax = float(np.abs(ref).max())
        assert reduce_stats_device(view, backend=backend) == reduce_stats(ref)
        assert np.array_equal(fill_counts_device(view, 2048, amax, backend=backend), fill_counts(ref, 2048, amax))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(backend: str, dtype: torch.dtype) -> None:
    t = (torch.randn(100_003, generator=torch.Generator().manual_seed(3)) * 7).to(dtype).cuda()
    ref = t.cpu().to(torch.float64 if dtype == torch.float64 else torch.float32).numpy()
    amax = float(np.abs(ref).max())
    assert reduce_stats_device(t, backend=backend) == reduce_stats(ref)
    assert np.array_equal(fill_counts_device(t, 2048, amax, backend=backend), fill_counts(ref, 2048, amax))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_on_gpu(backend: str) -> None:
    x = activation_like(1_000_003, 5)
    x[[0, 17, 999_999]] = np.nan
    x[[5, 1_000_002]] = np.inf
    x[6] = -np.inf
    assert_same_as_core(x, 2048, 6.0, to_tensor=cuda_tensor, backend=backend, nonfinite="ignore")
    with pytest.raises(NonFiniteError, match="3 NaN and 3 Inf"):
        reduce_stats_device(cuda_tensor(x), tensor="t", backend=backend)
    with pytest.raises(NonFiniteError):
        fill_counts_device(cuda_tensor(x), 2048, 6.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_collectors_accumulate_many_micro_batches(backend: str) -> None:
    parts = [activation_like(n, i) * (i + 1) / 4 for i, n in enumerate((3_000_001, 7, 1_234_567, 64))]
    stats = DeviceStatsCollector(["a"], device="cuda", backend=backend)
    for p in parts:
        stats.update("a", cuda_tensor(p))
    got = stats.results()["a"]
    assert got == merge_stats(reduce_stats(p) for p in parts)
    hist = DeviceHistogramCollector({"a": got.amax}, device="cuda", backend=backend)
    for p in parts:
        hist.update("a", cuda_tensor(p))
    want = sum(fill_counts(p, 2048, got.amax) for p in parts)
    assert np.array_equal(hist.results()["a"].counts, want)


# ---------------------------------------------------------------------------------------------
# Runners on the GPU


@pytest.fixture(scope="module")
def photo_batch():
    from trtcal.batch import batch_from_arrays

    arrays, ids = photo_views(24)
    return batch_from_arrays({INPUT_NAME: arrays}, ids)


@pytest.fixture(scope="module")
def gpu_runner(efficientnet_path):
    from trtcal.runners.torch_runner import TorchRunner

    return TorchRunner(efficientnet_path, device="cuda")


def test_gpu_activations_close_to_onnxruntime_cpu(efficientnet_path, gpu_runner, photo_batch) -> None:
    from trtcal.runners.onnxruntime import OnnxRuntimeRunner

    feed = photo_batch.rows(0, 8)
    got = gpu_runner.run(feed)
    want = OnnxRuntimeRunner(efficientnet_path).run(feed)
    worst = max(float(np.abs(got[n] - want[n]).max() / np.abs(want[n]).max()) for n in want)
    assert worst < 1e-4  # TF32 would land near 1e-3
    assert np.array_equal(got["logits"].argmax(1), want["logits"].argmax(1))


def test_gpu_passes_equal_core_on_the_same_activations(gpu_runner, photo_batch) -> None:
    stats = gpu_runner.collect_stats(photo_batch, micro_batch=8)
    again = gpu_runner.collect_stats(photo_batch, micro_batch=8)
    assert stats == again  # deterministic kernels: the same activations every pass
    acts = [gpu_runner.run(photo_batch.rows(a, a + 8)) for a in (0, 8, 16)]
    for name in gpu_runner.tensor_names:
        assert stats[name] == merge_stats(reduce_stats(a[name]) for a in acts), name
    amax = {n: s.amax for n, s in stats.items()}
    counts = gpu_runner.collect_counts(photo_batch, amax, micro_batch=8)
    for name in gpu_runner.tensor_names:
        want = sum(fill_counts(a[name], 2048, amax[name]) for a in acts)
        assert np.array_equal(counts[name], want), name


def test_backends_agree_on_a_real_model(efficientnet_path, photo_batch) -> None:
    from trtcal.runners.torch_runner import TorchRunner

    if not cupy_available():
        pytest.skip("CuPy not installed")
    a = TorchRunner(efficientnet_path, device="cuda", kernel_backend="torch")
    b = TorchRunner(efficientnet_path, device="cuda", kernel_backend="cupy")
    stats = a.collect_stats(photo_batch, micro_batch=12)
    assert b.collect_stats(photo_batch, micro_batch=12) == stats
    amax = {n: s.amax for n, s in stats.items()}
    ca = a.collect_counts(photo_batch, amax, micro_batch=12)
    cb = b.collect_counts(photo_batch, amax, micro_batch=12)
    assert all(np.array_equal(ca[n], cb[n]) for n in ca)


def test_one_worker_per_gpu_merges_bit_for_bit(efficientnet_path, tmp_path, photo_batch) -> None:
    from trtcal.batch import write_batch
    from trtcal.runners.data_parallel import DataParallelStatistics, WorkerSpec, collect_sliced
    from trtcal.runners.torch_runner import TorchRunner

    path = tmp_path / "views.arrow"
    arrays = photo_batch.array(INPUT_NAME)
    write_batch(path, {INPUT_NAME: arrays}, photo_batch.sample_ids, spec={})
    single = collect_sliced(TorchRunner(efficientnet_path, device="cuda:0"), photo_batch, [(0, 24)], micro_batch=4)
    gpus = torch.cuda.device_count()
    devices = [f"cuda:{i}" for i in range(gpus)] if gpus > 1 else ["cuda:0", "cuda:0"]
    spec = WorkerSpec(model=str(efficientnet_path), batch=str(path), runner="torch")
    with DataParallelStatistics(spec, devices) as pool:
        stats, counts = pool.collect(24, micro_batch=4)
    assert stats == single[0]
    assert all(np.array_equal(counts[n], single[1][n]) for n in counts)


def test_ort_cuda_provider_feeds_device_kernels(efficientnet_path, photo_batch) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (CUDAExecutionProvider missing)")
    from trtcal.runners.onnxruntime import OnnxRuntimeRunner
    from trtcal.runners.torch_runner import OrtDeviceRunner

    runner = OrtDeviceRunner(efficientnet_path, device="cuda")
    stats = runner.collect_stats(photo_batch, micro_batch=8)
    want = OnnxRuntimeRunner(efficientnet_path, device="cuda").collect_stats(photo_batch, micro_batch=8)
    assert stats == want  # same ORT CUDA activations, device kernels == core


def test_calibrate_on_cuda_without_onnxruntime_gpu_uses_the_torch_runner(efficientnet_path, photo_batch, tmp_path) -> None:
    """trtcal.calibrate(device="cuda") where only PyTorch sees the GPU: the PyTorch runner collects on
    the GPU; the amax values match the CPU ONNX Runtime run to FP32 kernel differences."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: calibrate uses its CUDA provider")
    import trtcal

    gpu = trtcal.calibrate(efficientnet_path, photo_batch, algorithms=("minmax", "entropy2"), device="cuda", output_dir=tmp_path / "g")
    cpu = trtcal.calibrate(efficientnet_path, photo_batch, algorithms=("minmax", "entropy2"))
    assert gpu.manifest["runner"]["kind"] == "torch" and gpu.manifest["runner"]["device"].startswith("cuda")
    trtcal.calibrate(efficientnet_path, photo_batch, algorithms=("minmax", "entropy2"), device="cuda", output_dir=tmp_path / "h")
    for name in ("calibration.minmax.cache", "ranges.json", "histograms.npy"):
        assert (tmp_path / "g" / name).read_bytes() == (tmp_path / "h" / name).read_bytes(), name  # deterministic on GPU
    for tensor, amax in cpu.amax["minmax"].items():
        assert gpu.amax["minmax"][tensor] == pytest.approx(amax, rel=1e-4, abs=1e-6), tensor
