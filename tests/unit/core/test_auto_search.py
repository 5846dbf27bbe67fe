"""The pure parts of `auto`: slices by sample id, local choice, bounded coordinate descent, the cross-fit guard."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trtcal.core.auto_search import (
    CANDIDATES,
    PROCEDURES,
    candidate_amax,
    coordinate_descent,
    cross_fit_choice,
    cross_fit_folds,
    distinct_candidates,
    local_choice,
    noise_to_db,
    rows_noise,
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


def _slow_rows_noise(error: np.ndarray, signal: np.ndarray, rows: list[int]) -> float:
    """Obviously correct: exact rational sums per output, one rounding each, then the plain mean."""
    from fractions import Fraction

    ratios = []
    for k in range(error.shape[1]):
        e = float(sum((Fraction(float(error[i, k])) for i in rows), Fraction(0)))
        s = float(sum((Fraction(float(signal[i, k])) for i in rows), Fraction(0)))
        ratios.append(0.0 if e == 0.0 else (math.inf if s == 0.0 else e / s))
    return float(np.mean(ratios))


def test_rows_noise_matches_exact_sums_in_any_row_order() -> None:
    rng = np.random.default_rng(11)
    for _ in range(20):
        n, outputs = int(rng.integers(1, 12)), int(rng.integers(1, 4))
        signal = rng.lognormal(0.0, 4.0, size=(n, outputs))  # wide magnitudes: naive sums would round differently
        error = signal * rng.lognormal(-6.0, 3.0, size=(n, outputs))
        rows = sorted(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False).tolist())
        expected = _slow_rows_noise(error, signal, rows)
        assert rows_noise(error, signal, rows) == expected
        shuffled = rng.permutation(rows).tolist()
        assert rows_noise(error, signal, shuffled) == expected  # exact sums: the order of the rows is no input
    assert rows_noise(np.zeros((2, 1)), np.ones((2, 1))) == 0.0
    with pytest.raises(ConfigError, match="rows, outputs"):
        rows_noise(np.zeros((2, 1)), np.ones((3, 1)))


def test_noise_to_db() -> None:
    assert noise_to_db(0.01) == pytest.approx(20.0)
    assert noise_to_db(0.0) == math.inf and noise_to_db(math.inf) == -math.inf


def test_cross_fit_folds_are_the_two_alternate_halves() -> None:
    assert cross_fit_folds(3) == ()
    for n in (4, 5, 24, 33):
        folds = cross_fit_folds(n)
        assert len(folds) == 2
        for fit, held in folds:
            assert sorted(fit + held) == list(range(n)) and not set(fit) & set(held)
        assert folds[0] == (folds[1][1], folds[1][0])
        assert folds[0][0] == list(range(0, n, 2))


def test_cross_fit_choice_matches_a_brute_force_reference() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        held = {p: rng.choice([0.1, 0.2, 0.3], size=2).tolist() for p in PROCEDURES}  # many ties
        means = {p: math.fsum(v) / 2 for p, v in held.items()}
        expected = sorted(PROCEDURES, key=lambda p: (means[p], PROCEDURES.index(p)))[0]
        assert cross_fit_choice(held) == expected
    assert cross_fit_choice({"single": [0.5], "start": [0.5], "auto": [0.5]}) == "single"  # ties: the simpler
    with pytest.raises(ConfigError, match="held-out"):
        cross_fit_choice({"single": [], "auto": [0.1]})


def _toy_noise(per_row: dict[tuple[str, str], list[float]], a: dict[str, str], rows: list[int]) -> float:
    """A toy model whose per-row noise is the sum over tensors of a (tensor, candidate) cost; signal 1 per row."""
    n = len(next(iter(per_row.values())))
    error = np.array([[sum(per_row[(t, c)][i] for t, c in a.items())] for i in range(n)])
    return rows_noise(error, np.ones((n, 1)), rows)


def _toy_descent(per_row: dict[tuple[str, str], list[float]], rows: list[int]) -> dict[str, str]:
    start = {"t1": "base", "t2": "base"}
    final, _, _ = coordinate_descent(start, ["t1", "t2"], {"t1": ["fit"], "t2": ["good"]},
                                     lambda a: _toy_noise(per_row, dict(a), rows),
                                     start_noise=_toy_noise(per_row, start, rows), max_evals=10, min_relative_gain=0.005)
    return final


def _guarded(per_row: dict[tuple[str, str], list[float]]) -> tuple[dict[str, str], str]:
    """(the whole-slice descent, the procedure the cross-fit keeps: "single" = the start, or "auto")."""
    n = len(next(iter(per_row.values())))
    held: dict[str, list[float]] = {"single": [], "auto": []}
    for fit, test in cross_fit_folds(n):
        held["single"].append(_toy_noise(per_row, {"t1": "base", "t2": "base"}, test))
        held["auto"].append(_toy_noise(per_row, _toy_descent(per_row, fit), test))
    return _toy_descent(per_row, list(range(n))), cross_fit_choice(held)


def test_the_cross_fit_refuses_a_descent_fitted_to_a_few_rows() -> None:
    """The ocr_det failure in miniature: candidate "fit" for t1 removes most of the noise of rows 0 and 2
    (two large pages) and adds some on every other row. On the whole slice the descent takes it; fitted on
    the half with rows 0 and 2 it loses on the other half, fitted on the other half it is not taken, so the
    cross-fit keeps the single method."""
    per_row = {
        ("t1", "base"): [4.0, 1.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        ("t1", "fit"): [0.5, 1.3, 0.5, 1.3, 1.3, 1.3, 1.3, 1.3],
        ("t2", "base"): [1.0] * 8,
        ("t2", "good"): [1.0] * 8,
    }
    whole, choice = _guarded(per_row)
    assert whole["t1"] == "fit" and choice == "single"


def test_the_cross_fit_keeps_a_gain_that_holds_on_both_halves() -> None:
    """A change that helps most rows, unevenly (ocr_cls: one tensor, +4 dB held out), is kept."""
    per_row = {
        ("t1", "base"): [4.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        ("t1", "fit"): [0.5, 0.5, 0.9, 1.0, 0.9, 1.0, 0.9, 1.0],
        ("t2", "base"): [1.0] * 8,
        ("t2", "good"): [0.9] * 8,
    }
    whole, choice = _guarded(per_row)
    assert whole == {"t1": "fit", "t2": "good"} and choice == "auto"


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


def test_descent_trusted_needs_the_gain_in_db() -> None:
    from trtcal.core.auto_search import descent_trusted

    rng = np.random.default_rng(8)
    for _ in range(200):
        start, final = rng.lognormal(-4, 2, size=2)
        bar = float(rng.choice([0.0, 0.5, 1.0, 3.0]))
        expected = final < start and 10 * math.log10(start / final) >= bar - 1e-9
        assert descent_trusted(start, final, bar) == expected or abs(10 * math.log10(start / final) - bar) < 1e-9
    assert descent_trusted(0.1, 0.1 * 10 ** -0.1, 1.0)  # +1 dB exactly is enough
    assert not descent_trusted(0.1, 0.09, 1.0)  # +0.46 dB (the ocr_det case) is not
    assert not descent_trusted(0.1, 0.1, 0.0) and not descent_trusted(0.1, 0.2, 0.0)  # no gain, no trust
    assert descent_trusted(0.1, 0.0, 5.0)  # an exact match beats any bar
