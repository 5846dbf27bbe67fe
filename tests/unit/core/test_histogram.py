import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference.slow_scales import slow_histogram
from trtcal.core import (
    GrowingHistogram,
    Histogram,
    fill_counts,
    histogram_of,
    merge_histograms,
    merge_stats,
    reduce_stats,
)
from trtcal.core.histogram import bin_indices
from trtcal.errors import ConfigError, NonFiniteError


def test_fill_matches_slow_reference_bin_rule():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(5000).astype(np.float32)
    amax = float(np.abs(x).max())
    assert np.array_equal(fill_counts(x, 64, amax), slow_histogram(x, 64, amax))
    # the max lands in the last bin; zero in the first
    counts = fill_counts(np.array([0.0, amax], dtype=np.float32), 64, amax)
    assert counts[0] == 1 and counts[-1] == 1


def test_fill_close_to_numpy_histogram():
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal(200_000)).astype(np.float32)
    amax = float(x.max())
    ours = fill_counts(x, 2048, amax)
    ref, _ = np.histogram(x.astype(np.float64), bins=2048, range=(0.0, amax))
    assert ours.sum() == ref.sum() == x.size
    # float32 vs float64 bin arithmetic may move a value sitting on an edge to the neighbour bin
    assert np.abs(ours - ref).sum() <= 10


def test_two_pass_stats():
    x = np.array([[-3.0, 1.0], [2.5, 0.0]], dtype=np.float32)
    s = reduce_stats(x)
    assert (s.amax, s.min, s.max, s.count) == (3.0, -3.0, 2.5, 4)


def test_nonfinite_is_an_error_naming_the_tensor():
    x = np.array([1.0, np.nan, np.inf, -2.0], dtype=np.float32)
    with pytest.raises(NonFiniteError, match="conv1_out") as info:
        reduce_stats(x, tensor="conv1_out")
    assert info.value.nan_count == 1 and info.value.inf_count == 1
    with pytest.raises(NonFiniteError, match="conv1_out"):
        fill_counts(x, 16, 2.0, tensor="conv1_out")


def test_nonfinite_ignore_policy_counts_and_skips():
    x = np.array([1.0, np.nan, np.inf, -2.0], dtype=np.float32)
    s = reduce_stats(x, nonfinite="ignore")
    assert (s.amax, s.count, s.nan_count, s.inf_count) == (2.0, 2, 1, 1)
    counts = fill_counts(x, 4, 2.0, nonfinite="ignore")
    assert counts.sum() == 2


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.randoms(use_true_random=False))
def test_merge_is_exact_in_any_order_and_grouping(num_shards, rnd):
    rng = np.random.default_rng(rnd.randint(0, 10_000))
    data = rng.standard_normal(4000).astype(np.float32) * rng.uniform(0.1, 10)
    shards = np.array_split(data, num_shards)
    amax = merge_stats(reduce_stats(s) for s in shards).amax
    hists = [Histogram(fill_counts(s, 128, amax), amax, reduce_stats(s)) for s in shards]
    whole = histogram_of(data, num_bins=128)
    order = list(range(num_shards))
    rnd.shuffle(order)
    merged = merge_histograms([hists[i] for i in order])
    assert merged == whole
    # grouping: ((a+b)+c) == (a+(b+c))
    if num_shards >= 3:
        left = merge_histograms([merge_histograms(hists[:2]), *hists[2:]])
        right = merge_histograms([hists[0], merge_histograms(hists[1:])])
        assert left == right == whole
        assert left.counts.tobytes() == whole.counts.tobytes()


def test_merge_refuses_different_ranges():
    a = histogram_of(np.array([1.0, 2.0], dtype=np.float32), num_bins=8)
    b = histogram_of(np.array([1.0, 3.0], dtype=np.float32), num_bins=8)
    with pytest.raises(ConfigError, match="pass-1 amax"):
        merge_histograms([a, b])


def test_inputs_are_not_mutated():
    x = np.array([-1.0, 2.0, -3.0], dtype=np.float32)
    before = x.copy()
    histogram_of(x, num_bins=8)
    assert np.array_equal(x, before)


def test_growing_histogram_doubles_range_and_depends_on_order():
    small = np.full(1000, 0.5, dtype=np.float32)
    small[0] = 1.0
    big = np.array([3.0], dtype=np.float32)
    g = GrowingHistogram(num_bins=8)
    g.update(small)
    g.update(big)
    r = g.result()
    assert r.hist_amax == 4.0  # 1 -> 2 -> 4: two doublings
    assert r.counts.sum() == 1001
    assert r.counts[6] == 1 and r.counts[4:].sum() == 1  # upper half empty but the new max, as TensorRT warns
    g2 = GrowingHistogram(num_bins=8)
    g2.update(big)
    g2.update(small)
    assert g2.result().hist_amax == 3.0
    assert not np.array_equal(g2.result().counts, r.counts)  # batch order changes the histogram


def test_growing_rebinning_is_lossless_pairwise():
    g = GrowingHistogram(num_bins=4)
    g.update(np.array([0.1, 0.3, 0.6, 0.9, 1.0], dtype=np.float32))
    before = g.result().counts.copy()
    g.update(np.array([1.5], dtype=np.float32))
    after = g.result().counts
    assert after[0] == before[0] + before[1]
    assert after[1] == before[2] + before[3] + 0
    assert after.sum() == 6


def test_tiny_range_is_degenerate_not_a_crash():
    x = np.array([1e-38, 0.0], dtype=np.float32)
    counts = fill_counts(x, 2048, 1e-38)
    assert counts[0] == 2 and counts.sum() == 2
    h = histogram_of(x)
    assert h.counts.sum() == 2


# -- the fast fill path against the bin rule applied step by step --------------------------------


def _stepwise_counts(x, num_bins, hist_amax):
    """The documented bin rule, vectorised the obvious way: |float32(x)|, drop NaN/Inf, bin_indices, bincount."""
    a = np.abs(np.asarray(x).astype(np.float32).reshape(-1))
    a = a[np.isfinite(a)]
    return np.bincount(bin_indices(a, num_bins, hist_amax), minlength=num_bins).astype(np.int64)


def _edge_values(num_bins, hist_amax):
    """Every bin edge k / inv_width in float32 and its float32 neighbours, both signs, plus the range ends."""
    amax32 = np.float32(hist_amax)
    with np.errstate(over="ignore"):
        inv = np.float32(num_bins) / amax32
    if not np.isfinite(inv):  # a degenerate range: everything lands in bin 0
        inv = np.float32(1.0) / amax32
    edges = (np.arange(num_bins + 1, dtype=np.float32) / inv).astype(np.float32)
    near = np.concatenate(
        [edges, np.nextafter(edges, np.float32(0)), np.nextafter(edges, np.float32(np.inf)), [0.0, amax32]]
    ).astype(np.float32)
    near = near[near <= amax32]
    return np.concatenate([near, -near, [np.float32(-0.0)]]).astype(np.float32)


@pytest.mark.parametrize("num_bins", [1, 2, 7, 64, 2048])
@pytest.mark.parametrize("hist_amax", [1.0, 6.0, 0.1, 3.7e-3, 2.5e-30, 1.0e38, 123.456789, 5.877472e-39])
def test_fill_is_exact_at_every_bin_edge(num_bins, hist_amax):
    x = _edge_values(num_bins, hist_amax)
    want = _stepwise_counts(x, num_bins, hist_amax)
    got = fill_counts(x, num_bins, hist_amax)
    assert got.dtype == np.int64 and np.array_equal(got, want)
    if num_bins <= 64 and hist_amax > 1e-35:  # slow_histogram has no degenerate-range rule
        assert np.array_equal(got, slow_histogram(x, num_bins, hist_amax))
    # every edge value again, spread over several chunks (one chunk per call path)
    many = np.tile(x, 1 + (3 << 16) // x.size)
    assert np.array_equal(fill_counts(many, num_bins, hist_amax), _stepwise_counts(many, num_bins, hist_amax))


def test_fill_is_exact_on_activation_like_data_over_many_chunks():
    rng = np.random.default_rng(7)
    x = rng.standard_normal(5 * ((1 << 16) + 123)).astype(np.float32) * np.float32(3.3)
    relu6 = np.clip(x, 0, 6).astype(np.float32)  # many exact zeros, a saturated top
    for arr in (x, relu6, x.reshape(5, -1)[:, ::3]):  # non-contiguous too
        amax = float(np.abs(arr).max())
        for num_bins in (2048, 128, 3):
            assert np.array_equal(fill_counts(arr, num_bins, amax), _stepwise_counts(arr, num_bins, amax))


def test_fill_chunks_with_values_above_the_range_or_nonfinite_take_the_clamped_path():
    rng = np.random.default_rng(8)
    x = rng.uniform(-1.0, 1.0, 4 * (1 << 16)).astype(np.float32)
    x[5] = 1.5  # above hist_amax (alone in its chunk): clamped into the last bin
    x[(1 << 16) + 6] = -3.0e38  # would overflow the multiply
    x[2 * (1 << 16) + 9] = np.nan
    x[3 * (1 << 16)] = -np.inf
    counts = fill_counts(x, 256, 1.0, nonfinite="ignore")
    assert np.array_equal(counts, _stepwise_counts(x, 256, 1.0))
    assert counts.sum() == x.size - 2 and counts[-1] >= 2
    with pytest.raises(NonFiniteError, match="deep_tensor") as info:
        fill_counts(x, 256, 1.0, tensor="deep_tensor")
    assert (info.value.nan_count, info.value.inf_count) == (1, 0)  # the first chunk holding a non-finite value


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.int64])
def test_fill_converts_other_dtypes_to_float32_first(dtype):
    rng = np.random.default_rng(9)
    x = (rng.standard_normal(70_000) * 1000).astype(dtype)
    amax = float(np.abs(x.astype(np.float32)).max())
    assert np.array_equal(fill_counts(x, 2048, amax), _stepwise_counts(x, 2048, amax))
    # a range below the data: clamped into the last bin, the same as the bin rule
    assert np.array_equal(fill_counts(x, 2048, amax / 3), _stepwise_counts(x, 2048, amax / 3))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4096),
    st.floats(1e-30, 1e30),
    st.floats(0.25, 4.0),
    st.integers(0, 2**32 - 1),
)
def test_fill_matches_the_stepwise_rule_for_any_range(num_bins, scale, range_ratio, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(rng.integers(1, 3 * (1 << 16))) * scale).astype(np.float32)
    hist_amax = float(np.abs(x).max()) * range_ratio  # above or below the data's own max
    assert np.array_equal(fill_counts(x, num_bins, hist_amax), _stepwise_counts(x, num_bins, hist_amax))


def test_fill_with_a_range_beyond_float32_bins_like_the_rule():
    # float32(1e39) is inf, so inv_width is 0: every finite value lands in bin 0 (the clamped path)
    x = np.array([0.0, 1.0, -3e38, 3e38, np.inf], dtype=np.float32)
    with np.errstate(over="ignore"):  # float32(1e39) overflows, in trtcal.core as in the reference
        counts = fill_counts(x, 64, 1e39, nonfinite="ignore")
        assert np.array_equal(counts, _stepwise_counts(x, 64, 1e39)) and counts[0] == 4
