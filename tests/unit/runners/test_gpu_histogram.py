"""The device kernels' CPU path (torch on CPU) against trtcal.core: identical stats and counts.

The same cases run on a GPU in tests/gpu/test_gpu_kernels.py (both kernel backends there).
These tests need torch (the `gpu` extra); without it they fail at collection on purpose, so a
CI image that lacks torch is noticed instead of passing silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    pytest.fail(
        "tests/unit/runners/test_gpu_histogram.py needs torch (the CPU wheel is enough): "
        "pip install torch, or add it to the dev extra",
        pytrace=False,
    )

from trtcal.core import fill_counts, merge_histograms, merge_stats, reduce_stats
from trtcal.core.histogram import Histogram
from trtcal.errors import ConfigError, NonFiniteError
from trtcal.runners.gpu_histogram import (
    DeviceHistogramCollector,
    DeviceStatsCollector,
    fill_counts_device,
    hist_inv_width,
    reduce_stats_device,
    resolve_backend,
)

F32 = np.float32


def edge_values(num_bins: int, hist_amax: float) -> np.ndarray:
    """Every float32 bin edge of the rule, its two float32 neighbours, 0, -0, amax, -amax, > amax."""
    _, inv = hist_inv_width(num_bins, hist_amax)
    k = np.arange(num_bins + 1, dtype=np.float64)
    edges = (k / np.float64(inv)).astype(F32)
    up = np.nextafter(edges, F32(np.inf))
    down = np.nextafter(edges, F32(0))
    amax32 = F32(hist_amax)
    special = np.array(
        [
            0.0,
            -0.0,
            amax32,
            -amax32,
            np.nextafter(amax32, F32(0)),
            np.nextafter(amax32, F32(np.inf)),
            amax32 * 4,
        ],
        dtype=F32,
    )
    values = np.concatenate([edges, up, down, -edges, special]).astype(F32)
    return values


def cases() -> Iterator[tuple[str, np.ndarray, int, float]]:
    """(label, array, num_bins, hist_amax) shared by the CPU and GPU tests."""
    rng = np.random.default_rng(7)
    for n in (1, 3, 4, 5, 1023, 4099, 100_003):
        x = rng.standard_normal(n).astype(F32)
        yield f"normal-{n}", x, 2048, float(np.abs(x).max())
    relu6 = np.clip(rng.standard_normal(300_001).astype(F32) * 3, 0, 6)  # many zeros and exact 6.0
    yield "relu6", relu6, 2048, 6.0
    for amax in (1.0, 6.0, 2048.0, 0.1, 3.0e-3, float(np.pi), 1e-30, 7.5e4):
        for bins in (2048, 128, 7, 2, 1):
            yield f"edges-{amax}-{bins}", edge_values(bins, amax), bins, amax
    x = rng.laplace(size=(4, 3, 17, 19)).astype(F32)
    yield "4d", x, 2048, float(np.abs(x).max())
    yield "zeros", np.zeros(1001, dtype=F32), 2048, 0.0
    yield "zeros-amax0-with-values", np.array([0.0, -0.0, 1.0, -2.0], dtype=F32), 2048, 0.0
    yield "subnormal", np.array([1e-45, -1e-44, 1e-39, 0.0], dtype=F32), 2048, 1e-30


CASES = list(cases())
CASE_IDS = [c[0] for c in CASES]


def assert_same_as_core(
    x: np.ndarray,
    num_bins: int,
    hist_amax: float,
    *,
    to_tensor: Callable[[np.ndarray], torch.Tensor],
    backend: str,
    nonfinite: str = "error",
) -> None:
    before = x.copy()
    t = to_tensor(x)
    want_stats = reduce_stats(x, nonfinite=nonfinite)
    got_stats = reduce_stats_device(t, nonfinite=nonfinite, backend=backend)
    assert got_stats == want_stats
    want = fill_counts(x, num_bins, hist_amax, nonfinite=nonfinite)
    got = fill_counts_device(t, num_bins, hist_amax, nonfinite=nonfinite, backend=backend)
    assert got.dtype == np.int64 and got.shape == (num_bins,)
    assert np.array_equal(got, want), f"first differing bin {np.flatnonzero(got != want)[:5]}"
    assert t.cpu().numpy().tobytes() == before.tobytes()  # the input is never mutated
    assert x.tobytes() == before.tobytes()


def cpu_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.copy())


@pytest.mark.parametrize(("label", "x", "num_bins", "hist_amax"), CASES, ids=CASE_IDS)
def test_cpu_path_equals_core(label: str, x: np.ndarray, num_bins: int, hist_amax: float) -> None:
    assert_same_as_core(x, num_bins, hist_amax, to_tensor=cpu_tensor, backend="torch")


def test_auto_backend_on_cpu_is_torch() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="cupy"):
        resolve_backend("cupy", torch.device("cpu"))
    with pytest.raises(ConfigError, match="backend"):
        resolve_backend("numba", torch.device("cpu"))  # type: ignore[arg-type]


def test_edges_land_where_the_rule_says() -> None:
    # amax 2048 with 2048 bins: inv_width 1, every integer k is the lower edge of bin k.
    x = np.arange(2048, dtype=F32)
    counts = fill_counts_device(torch.from_numpy(x), 2048, 2048.0)
    assert np.array_equal(counts, np.ones(2048, dtype=np.int64))
    counts = fill_counts_device(torch.tensor([2048.0, np.nextafter(F32(2048), F32(0)), 1e9]), 2048, 2048.0)
    assert counts[-1] == 3 and counts.sum() == 3  # == amax, just below it, and above it: last bin


@pytest.mark.parametrize("nonfinite", ["error", "ignore"])
def test_nonfinite_policy_matches_core(nonfinite: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(10_007).astype(F32)
    x[[5, 77, 4000]] = np.nan
    x[[9, 10_006]] = np.inf
    x[11] = -np.inf
    amax = float(np.abs(x[np.isfinite(x)]).max())
    if nonfinite == "ignore":
        assert_same_as_core(x, 2048, amax, to_tensor=cpu_tensor, backend="torch", nonfinite="ignore")
        stats = reduce_stats_device(torch.from_numpy(x), nonfinite="ignore")
        assert (stats.nan_count, stats.inf_count, stats.count) == (3, 3, x.size - 6)
        return
    with pytest.raises(NonFiniteError) as core_err:
        reduce_stats(x, tensor="t")
    with pytest.raises(NonFiniteError, match="'t' holds 3 NaN and 3 Inf") as ours:
        reduce_stats_device(torch.from_numpy(x), tensor="t")
    assert (ours.value.nan_count, ours.value.inf_count) == (
        core_err.value.nan_count,
        core_err.value.inf_count,
    )
    with pytest.raises(NonFiniteError, match="'t'"):
        fill_counts_device(torch.from_numpy(x), 2048, amax, tensor="t")


def test_all_nonfinite_ignored_gives_empty_stats() -> None:
    x = np.array([np.nan, np.inf, -np.inf], dtype=F32)
    assert reduce_stats_device(torch.from_numpy(x), nonfinite="ignore") == reduce_stats(x, nonfinite="ignore")
    assert fill_counts_device(torch.from_numpy(x), 16, 1.0, nonfinite="ignore").sum() == 0


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes(dtype: type) -> None:
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(5003) * 3).astype(dtype)
    amax = float(np.abs(x).max())
    assert_same_as_core(x, 2048, amax, to_tensor=cpu_tensor, backend="torch")


def test_bfloat16_is_binned_as_its_float32_value() -> None:
    t = torch.randn(4097, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x32 = t.to(torch.float32).numpy()
    amax = float(np.abs(x32).max())
    assert reduce_stats_device(t) == reduce_stats(x32)
    assert np.array_equal(fill_counts_device(t, 2048, amax), fill_counts(x32, 2048, amax))


def test_integer_tensors_stats() -> None:
    x = np.array([-7, 3, 0, 12], dtype=np.int32)
    assert reduce_stats_device(torch.from_numpy(x)) == reduce_stats(x)


def test_non_contiguous_and_offset_views() -> None:
    rng = np.random.default_rng(5)
    base = torch.from_numpy(rng.standard_normal((64, 33)).astype(F32))
    for view in (base.t(), base[:, 1:], base[1:, ::3], base.reshape(-1)[1:]):
        ref = np.ascontiguousarray(view.numpy())
        amax = float(np.abs(ref).max())
        assert reduce_stats_device(view) == reduce_stats(ref)
        assert np.array_equal(fill_counts_device(view, 2048, amax), fill_counts(ref, 2048, amax))


def test_collectors_accumulate_like_core_on_the_concatenation() -> None:
    rng = np.random.default_rng(6)
    parts = [rng.standard_normal((n, 8)).astype(F32) * (i + 1) for i, n in enumerate((5, 1, 17, 3))]
    other = [np.abs(p) for p in parts]
    whole = np.concatenate(parts)
    stats = DeviceStatsCollector(["a", "b"], device="cpu")
    for p, q in zip(parts, other):
        stats.update("a", torch.from_numpy(p))
        stats.update("b", torch.from_numpy(q))
    got = stats.results()
    assert got["a"] == reduce_stats(whole)
    assert got["b"] == reduce_stats(np.concatenate(other))
    hists = DeviceHistogramCollector({"a": got["a"].amax, "b": got["b"].amax}, num_bins=512, device="cpu")
    for p, q in zip(parts, other):
        hists.update("a", torch.from_numpy(p))
        hists.update("b", torch.from_numpy(q))
    result = hists.results(stats=got)
    assert np.array_equal(result["a"].counts, fill_counts(whole, 512, got["a"].amax))
    assert result["a"] == Histogram(
        counts=fill_counts(whole, 512, got["a"].amax), hist_amax=got["a"].amax, stats=got["a"]
    )
    # Shards merge exactly through trtcal.core.
    first = DeviceHistogramCollector({"a": got["a"].amax}, num_bins=512, device="cpu")
    second = DeviceHistogramCollector({"a": got["a"].amax}, num_bins=512, device="cpu")
    first.update("a", torch.from_numpy(np.concatenate(parts[:2])))
    second.update("a", torch.from_numpy(np.concatenate(parts[2:])))
    merged = merge_histograms([first.results()["a"], second.results()["a"]])
    assert np.array_equal(merged.counts, result["a"].counts)
    s1 = reduce_stats_device(torch.from_numpy(np.concatenate(parts[:2])))
    s2 = reduce_stats_device(torch.from_numpy(np.concatenate(parts[2:])))
    assert merge_stats([s1, s2]) == got["a"]


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="num_bins"):
        DeviceHistogramCollector({"a": 1.0}, num_bins=0, device="cpu")
    with pytest.raises(ConfigError, match="hist_amax"):
        DeviceHistogramCollector({"a": float("nan")}, device="cpu")
    with pytest.raises(ConfigError, match="hist_amax"):
        DeviceHistogramCollector({"a": -1.0}, device="cpu")
    with pytest.raises(ConfigError, match="unique"):
        DeviceStatsCollector(["a", "a"], device="cpu")
    collector = DeviceStatsCollector(["a"], device="cpu")
    with pytest.raises(ConfigError, match="'b' was not registered"):
        collector.update("b", torch.zeros(3))
    with pytest.raises(ConfigError, match="nonfinite"):
        collector.results(nonfinite="skip")  # type: ignore[arg-type]


def test_amax_above_float32_range_bins_like_core() -> None:
    x = np.array([0.0, 1.0, 3e38], dtype=F32)
    assert np.array_equal(fill_counts_device(torch.from_numpy(x), 64, 1e39), fill_counts(x, 64, 1e39))


finite_f32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
any_f32 = st.floats(width=32)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=hnp.arrays(np.float32, st.integers(0, 300), elements=any_f32),
    num_bins=st.sampled_from([1, 2, 3, 64, 2048]),
    amax_scale=st.sampled_from([None, 0.5, 1.0, 2.0]),
)
def test_property_cpu_path_equals_core(x: np.ndarray, num_bins: int, amax_scale: float | None) -> None:
    stats = reduce_stats(x, nonfinite="ignore")
    hist_amax = stats.amax if amax_scale is None else stats.amax * amax_scale
    with np.errstate(over="ignore", divide="ignore"):
        assume(hist_amax == 0.0 or np.isfinite(F32(num_bins) / F32(hist_amax)))
    assert_same_as_core(x, num_bins, hist_amax, to_tensor=cpu_tensor, backend="torch", nonfinite="ignore")


def test_degenerate_tiny_range_matches_core() -> None:
    # float32(2048) / float32(1e-37) overflows: degenerate range, every value in bin 0, as trtcal.core does.
    x = np.array([1e-37, 0.0, 5e-38], dtype=np.float32)
    collector = DeviceHistogramCollector({"a": 1e-37}, device="cpu")
    collector.update("a", torch.from_numpy(x))
    got = collector.results()["a"].counts
    assert np.array_equal(got, fill_counts(x, 2048, 1e-37))
