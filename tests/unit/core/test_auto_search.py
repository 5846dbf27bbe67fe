"""The pure parts of `auto`: slices by sample id, local choice, bounded coordinate descent split by halves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trtcal.core.auto_search import (
    CANDIDATES,
    SplitNoise,
    candidate_amax,
    coordinate_descent,
    distinct_candidates,
    improves,
    local_choice,
    noise_to_db,
    search_slices,
)
from trtcal.core.histogram import histogram_of
from trtcal.errors import ConfigError


def test_slices_follow_sample_ids_not_row_order() -> None:
    ids = [f"img/{i:04d}" for i in range(100)]
    search, held = search_slices(ids, 20)
    assert len(search) == 10 and len(held) == 10 and not set(search) & set(held)
    shuffled = list(reversed(ids))
    s2, h2 = search_slices(shuffled, 20)
    assert [shuffled[i] for i in s2] == [ids[i] for i in search]
    assert [shuffled[i] for i in h2] == [ids[i] for i in held]


def test_slices_small_batches() -> None:
    assert search_slices(["a"], 8) == ([0], [0])
    s, h = search_slices(["a", "b", "c"], 8)
    assert sorted(s + h) == [0, 1, 2] and len(s) == 2
    with pytest.raises(ConfigError):
        search_slices(["a", "b"], 1)


def test_candidates_come_from_one_histogram() -> None:
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    x[0] = 40.0  # an outlier: minmax keeps it, the percentiles do not
    h = histogram_of(x)
    amax = candidate_amax(h.counts, h.hist_amax)
    assert list(amax) == [c.name for c in CANDIDATES]
    assert amax["minmax"] == pytest.approx(40.0)
    assert amax["percentile_99.9"] < amax["percentile_99.99"] < amax["percentile_99.999"] < 40.0


def test_distinct_candidates_keep_the_first_of_equal_scales() -> None:
    assert distinct_candidates({"a": 1.0, "b": 2.0, "c": 1.0, "d": 2.001, "e": 2.0000001}) == ["a", "b", "d"]


def test_local_choice_least_noise_ties_to_earlier() -> None:
    assert local_choice({"a": 0.3, "b": 0.1, "c": 0.1}) == "b"
    assert local_choice({"a": math.inf, "b": math.inf}) == "a"


def test_descent_keeps_improvements_and_stops_at_the_bound() -> None:
    # objective: sum of per-tensor costs; tensor t prefers candidate "y".
    cost = {"x": 1.0, "y": 0.5, "z": 0.9}

    def objective(a: dict[str, str]) -> float:
        return sum(cost[c] for c in a.values())

    start = {"t1": "x", "t2": "x", "t3": "x"}
    alts = {t: ["z", "y"] for t in start}
    final, noise, steps = coordinate_descent(
        start, ["t1", "t2", "t3"], alts, objective, start_noise=3.0, max_evals=10, min_relative_gain=0.0
    )
    assert final == {"t1": "y", "t2": "y", "t3": "y"} and noise == pytest.approx(1.5)
    assert [s.accepted for s in steps] == [False, True] * 3
    bounded, _, steps = coordinate_descent(
        start, ["t1", "t2", "t3"], alts, objective, start_noise=3.0, max_evals=3, min_relative_gain=0.0
    )
    assert len(steps) == 3 and bounded == {"t1": "y", "t2": "z", "t3": "x"}  # t2 saw only "z"
    unchanged, _, _ = coordinate_descent(
        start, ["t1"], alts, objective, start_noise=3.0, max_evals=10, min_relative_gain=0.5
    )
    assert unchanged == start  # 3.0 -> 2.5 is not a 50 % gain


def test_a_gain_fitted_to_one_half_of_the_slice_is_not_taken() -> None:
    """The ocr_det failure in miniature: on the search slice, candidate "fit" for t1 lowers the total noise
    a lot, but only because it suits half A (a few pages); on half B it is worse. A total-only search
    takes it; the split rule keeps the current choice and takes t2's change, which helps both halves."""
    # noise per (tensor, candidate) on half A and half B; the objective sums over tensors.
    half_a = {("t1", "base"): 1.0, ("t1", "fit"): 0.1, ("t2", "base"): 1.0, ("t2", "good"): 0.8}
    half_b = {("t1", "base"): 1.0, ("t1", "fit"): 1.3, ("t2", "base"): 1.0, ("t2", "good"): 0.9}

    def split(a: dict[str, str]) -> SplitNoise:
        na, nb = sum(half_a[(t, c)] for t, c in a.items()), sum(half_b[(t, c)] for t, c in a.items())
        return SplitNoise((na + nb) / 2, (na, nb))

    start = {"t1": "base", "t2": "base"}
    alts = {"t1": ["fit"], "t2": ["good"]}
    total_only, _, _ = coordinate_descent(start, ["t1", "t2"], alts, lambda a: split(a).total,
                                          start_noise=split(start).total, max_evals=10, min_relative_gain=0.005)
    assert total_only == {"t1": "fit", "t2": "good"}  # the greedy slice fit: 2.0 -> 1.7 -> 1.55 in total
    final, noise, steps = coordinate_descent(start, ["t1", "t2"], alts, split, start_noise=split(start), max_evals=10,
                                             min_relative_gain=0.005)
    assert final == {"t1": "base", "t2": "good"} and noise == pytest.approx(1.85)
    assert [(s.tensor, s.accepted, s.halves) for s in steps] == [("t1", False, (1.1, 2.3)), ("t2", True, (1.8, 1.9))]


def test_improves_needs_the_total_margin_and_every_half() -> None:
    old = SplitNoise(1.0, (1.0, 1.0))
    assert improves(SplitNoise(0.9, (0.85, 0.95)), old, 0.05)
    assert not improves(SplitNoise(0.9, (0.7, 1.1)), old, 0.05)  # one half worse
    assert not improves(SplitNoise(0.98, (0.97, 0.99)), old, 0.05)  # below the margin
    assert not improves(SplitNoise(1.0, (1.0, 1.0)), old, 0.0)  # equal is no gain
    assert improves(SplitNoise(0.5), SplitNoise(1.0), 0.1)  # no halves: the total decides
    assert noise_to_db(0.01) == pytest.approx(20.0)


def test_descent_plan_orders_by_local_noise_and_keeps_near_alternatives() -> None:
    from trtcal.core.auto_search import descent_plan

    local = {
        "a": {"x": 0.01, "y": 0.015, "z": 0.5},  # z is far worse locally: never tried
        "b": {"x": 0.2, "y": 0.1, "z": 0.19},
        "c": {"x": 0.05, "y": 0.05, "z": 0.05},  # one distinct candidate only
    }
    distinct = {"a": ["x", "y", "z"], "b": ["x", "y", "z"], "c": ["x"]}
    current = {"a": "x", "b": "x", "c": "x"}
    order, alts = descent_plan(local, distinct, current, local_margin=2.0, max_alternatives=2)
    assert order == ["b", "c", "a"]
    assert alts == {"a": ["y"], "b": ["y", "z"], "c": []}
    _, one = descent_plan(local, distinct, current, local_margin=2.0, max_alternatives=1)
    assert one["b"] == ["y"]
