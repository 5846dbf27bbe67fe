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
