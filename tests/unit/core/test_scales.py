import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference.slow_scales import slow_entropy2, slow_entropy_kl, slow_mse, slow_percentile
from trtcal.core import compute_amax, histogram_of
from trtcal.core.scales import entropy_divergences
from trtcal.errors import ConfigError


def _hist(x, bins=2048):
    h = histogram_of(np.asarray(x, dtype=np.float32), num_bins=bins)
    return h.counts, h.hist_amax


def _suppressed(counts):
    out = np.array(counts, dtype=np.int64).copy()
    out[0] = out[1]
    return out


def _random_histograms():
    rng = np.random.default_rng(1234)
    yield _hist(np.maximum(rng.laplace(size=200_000), 0), 512)
    yield _hist(np.concatenate([rng.normal(size=100_000), rng.normal(0, 40, 50)]), 512)
    yield _hist(rng.uniform(0, 1, 50_000), 256)
    sparse = np.zeros(300, dtype=np.int64)
    sparse[rng.integers(0, 300, 40)] = rng.integers(1, 1000, 40)
    yield sparse, 3.0


@pytest.mark.parametrize("case", list(range(4)))
def test_entropy_divergences_match_slow_reference(case):
    counts, amax = list(_random_histograms())[case]
    cand, kl = entropy_divergences(counts, start_bin=128)
    for i, value in zip(cand[::7], kl[::7]):
        ref = slow_entropy_kl(counts, int(i))
        if math.isinf(ref):
            assert math.isinf(value)
        else:
            assert value == pytest.approx(ref, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", list(range(4)))
def test_entropy2_matches_slow_reference(case):
    counts, amax = list(_random_histograms())[case]
    ref_amax, ref_i, ref_kl = slow_entropy2(counts, amax)
    got = compute_amax(counts, amax, "entropy2")
    if got != pytest.approx(ref_amax, rel=1e-12):
        # Accept only a genuine near-tie between the two candidates.
        i_got = round(got / (amax / len(counts)) - 0.5)
        assert abs(slow_entropy_kl(_suppressed(counts), i_got) - ref_kl) < 1e-12
    # TensorRT's v1 calibrator runs the same search (it differs only in calibrating after fusion)
    assert compute_amax(counts, amax, "entropy") == got


def test_entropy2_on_published_relu_laplace_case():
    # docs/algorithms.md, "Measured": on 2M ReLU-Laplace samples (max 15.36) the Migacz-literal search
    # gives 11.66 and ModelOpt's variant 11.43. TensorRT 8.5's rule (bin 0 := bin 1, level
    # floor(128k/i)) lands on 11.43 too; trtcal's pre-issue-18 rule gave 11.66.
    rng = np.random.default_rng(0)
    x = np.abs(rng.laplace(size=2_000_000)).astype(np.float32)
    counts, amax = _hist(x)
    got = compute_amax(counts, amax, "entropy2")
    assert got == pytest.approx(11.43, abs=0.01)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**7), st.integers(0, 3))
def test_entropy2_ignores_bin_zero(zeros, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, 2048)
    counts[1] = 20_000
    ref = compute_amax(counts, 4.0, "entropy2")
    counts[0] = zeros
    assert compute_amax(counts, 4.0, "entropy2") == ref


def test_entropy2_counts_bin_one_as_bin_zero_too():
    # TensorRT 8.5 replaces bin 0's count by bin 1's, so a pile in bin 1 counts twice
    # (docs/algorithms.md, probes spike_b*); 512 bins keep the slow reference quick
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 50, 512)
    counts[1] = 20_000
    got = compute_amax(counts, 1.0, "entropy2")
    assert got == slow_entropy2(counts, 1.0)[0]
    counts[0] = 0
    assert got != slow_entropy2(counts, 1.0, suppress_first_bin=False)[0]


def test_entropy2_never_clips_to_a_single_bin():
    # probe sparse_k3_r1: at i = 769 everything folds into bin 768 and KL(P || Q) is exactly 0, yet
    # TensorRT 8.5 kept the full range (i = 2048), as a P of two or more bins would have allowed
    counts = np.zeros(2048, dtype=np.int64)
    counts[[768, 772, 875, 2047]] = [2788, 4036, 4858, 1]
    assert compute_amax(counts, 4.0, "entropy2") == (2048 + 0.5) * 4.0 / 2048
    assert slow_entropy2(counts, 4.0)[1] == 2048
    counts[760] = 1  # one value in another level: P has two bins, and the KL minimum i = 769 wins
    assert compute_amax(counts, 4.0, "entropy2") == (769 + 0.5) * 4.0 / 2048 == slow_entropy2(counts, 4.0)[0]


def test_entropy2_on_saturated_outputs_keeps_full_range():
    # a softmax-like tensor concentrated at the top of its range: the public `prob` line is i = 2048
    counts = np.zeros(2048, dtype=np.int64)
    counts[-1] = 10_000
    counts[:10] = 5
    assert compute_amax(counts, 1.0, "entropy2") == pytest.approx((2048 + 0.5) / 2048)


@pytest.mark.parametrize("p", [50.0, 99.0, 99.9, 99.99, 99.999, 100.0])
def test_percentile_matches_reference_and_numpy(p):
    rng = np.random.default_rng(7)
    x = np.abs(rng.standard_normal(300_000)).astype(np.float32)
    counts, amax = _hist(x)
    got = compute_amax(counts, amax, "percentile", percentile=p)
    assert got == pytest.approx(slow_percentile(counts, amax, p), rel=1e-12)
    width = amax / len(counts)
    assert abs(got - np.percentile(x, p)) <= width + 1e-6


def test_minmax_is_the_exact_max():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(10_000).astype(np.float32) * 5
    counts, amax = _hist(x)
    assert compute_amax(counts, amax, "minmax") == float(np.abs(x).max())


def test_mse_matches_reference():
    rng = np.random.default_rng(11)
    counts, amax = _hist(np.abs(rng.laplace(size=50_000)), 512)
    assert compute_amax(counts, amax, "mse") == pytest.approx(slow_mse(counts, amax), rel=1e-12)


def test_legacy_is_quantile_capped_by_cutoff():
    rng = np.random.default_rng(5)
    counts, amax = _hist(np.abs(rng.standard_normal(100_000)))
    assert compute_amax(counts, amax, "legacy", quantile=0.9999, regression_cutoff=1.0) == compute_amax(
        counts, amax, "percentile", percentile=99.99
    )
    assert compute_amax(counts, amax, "legacy", quantile=1.0, regression_cutoff=0.5) == pytest.approx(0.5 * amax)


def test_methods_do_not_mutate_inputs():
    rng = np.random.default_rng(9)
    counts, amax = _hist(np.abs(rng.laplace(size=20_000)))
    before = counts.copy()
    for method in ["entropy2", "entropy", "minmax", "percentile", "mse", "legacy"]:
        compute_amax(counts, amax, method)
        assert np.array_equal(counts, before)


def test_empty_and_zero_histograms():
    zeros = np.zeros(2048, dtype=np.int64)
    for method in ["entropy2", "entropy", "minmax", "percentile", "mse", "legacy"]:
        assert compute_amax(zeros, 0.0, method) == 0.0
        assert compute_amax(zeros, 2.0, method) == 2.0


def test_bad_arguments_raise_config_error():
    counts = np.ones(2048, dtype=np.int64)
    with pytest.raises(ConfigError, match="unknown calibration method"):
        compute_amax(counts, 1.0, "kl")
    with pytest.raises(ConfigError, match="percentile"):
        compute_amax(counts, 1.0, "percentile", percentile=0)
    with pytest.raises(ConfigError, match="invalid parameters"):
        compute_amax(counts, 1.0, "minmax", percentile=3)
    with pytest.raises(ConfigError):
        compute_amax(-counts, 1.0, "entropy2")
    with pytest.raises(ConfigError):
        compute_amax(counts, float("nan"), "entropy2")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=130, max_size=200), st.floats(0.01, 100.0))
def test_entropy2_property_against_reference(raw, amax):
    counts = np.array(raw, dtype=np.int64)
    got = compute_amax(counts, amax, "entropy2")
    ref_amax, ref_i, ref_kl = slow_entropy2(counts, amax)
    if ref_i is None:
        assert got == amax
        return
    i_got = round(got / (amax / len(counts)) - 0.5)
    assert slow_entropy_kl(_suppressed(counts), i_got) <= ref_kl + 1e-9


def test_entropy2_keeps_relu6_range_despite_the_zero_spike():
    # ReLU6 output: 40 % exact zeros, the rest spread over (0, 6] with a saturated spike at 6.
    rng = np.random.default_rng(2)
    x = np.concatenate([np.zeros(400_000), rng.uniform(0, 6, 500_000), np.full(100_000, 6.0)]).astype(np.float32)
    counts, amax = _hist(x)
    assert compute_amax(counts, amax, "entropy2") > 5.5
