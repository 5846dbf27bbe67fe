"""`auto`: per-tensor choice among candidate ranges by their measured effect on the outputs (pure parts).

The ONNX Runtime side (trtcal/export/auto.py) measures; this module decides. Everything here is
a pure function of numbers, so the decision is the same bytes for the same measurements:

* `candidate_amax`: the candidates' amax of one tensor from its |x| histogram (entropy2, minmax,
  percentile 99.9 / 99.99 / 99.999, mse), all from the statistics the other methods use;
* `search_slices`: the held-out rows, chosen by sample id (sha256 order), never by row position;
* `local_choice`: the candidate with the least noise on the consumers' outputs (layer-wise
  output matching), ties to the earlier candidate;
* `coordinate_descent`: bounded, deterministic refinement of the assignment with a callback that
  measures the whole model's output noise on the search slice (`rows_noise`);
* `cross_fit_folds` / `cross_fit_choice`: the guard against fitting the slice: each procedure
  (best single method, best start, start + descent) is fitted on one half of the search slice
  and judged on the other; the one whose fits generalise best is run on the whole slice;
* `descent_trusted`: the descent's result is written only when it beats its start on the slice
  by at least `AutoConfig.min_descent_gain_db`.
The verdict's per-output metrics are trtcal.core.output_metrics' (the same as `trtcal eval`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from trtcal.core.scales import compute_amax
from trtcal.errors import ConfigError

__all__ = [
    "AUTO_RULE_VERSION",
    "CANDIDATES",
    "Candidate",
    "DescentStep",
    "candidate_amax",
    "coordinate_descent",
    "cross_fit_choice",
    "cross_fit_folds",
    "descent_trusted",
    "descent_plan",
    "distinct_candidates",
    "local_choice",
    "noise_ratio",
    "noise_to_db",
    "PROCEDURES",
    "rows_noise",
    "search_slices",
    "SLICE_SALT",
]

SLICE_SALT = b"trtcal-auto-slice-v1\x00"
# The search rule's version: recorded in ranges.json and part of the store key of every calibration that
# runs auto (trtcal.orchestrator.keys), so an entry an earlier rule wrote is never served for this one.
# 1: total-only descent (sessions 3-4); 2: the cross-fit guard (session 5).
AUTO_RULE_VERSION = 2


@dataclass(frozen=True)
class Candidate:
    """One candidate range rule: a method of trtcal.core.scales with fixed parameters."""

    name: str
    method: str
    params: tuple[tuple[str, Any], ...] = ()


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("entropy2", "entropy2"),
    Candidate("minmax", "minmax"),
    Candidate("percentile_99.9", "percentile", (("percentile", 99.9),)),
    Candidate("percentile_99.99", "percentile", (("percentile", 99.99),)),
    Candidate("percentile_99.999", "percentile", (("percentile", 99.999),)),
    Candidate("mse", "mse"),
)


def candidate_amax(
    counts: npt.ArrayLike, hist_amax: float, candidates: Sequence[Candidate] = CANDIDATES
) -> dict[str, float]:
    """candidate name -> amax of one tensor, in the candidates' order."""
    return {c.name: compute_amax(counts, hist_amax, c.method, **dict(c.params)) for c in candidates}


def distinct_candidates(amax_by_candidate: Mapping[str, float]) -> list[str]:
    """The candidates whose float32 scale differs from every earlier one's (equal scales: same model)."""
    seen: set[float] = set()
    out: list[str] = []
    for name, amax in amax_by_candidate.items():
        scale = float(np.float32(np.float32(amax) / np.float32(127.0)))
        if scale not in seen:
            seen.add(scale)
            out.append(name)
    return out


def search_slices(sample_ids: Sequence[str], size: int) -> tuple[list[int], list[int]]:
    """(search rows, verdict rows): row indices of the `size` samples whose salted sha256 of the id is
    smallest, the first half (rounded up) searched on, the rest held out for the verdict.

    Independent of row order and of how the batch was split among workers: the same ids give the same
    rows, in sha256 order. With fewer than 2 rows both slices are every row.
    """
    if size < 2:
        raise ConfigError(f"the auto slice needs at least 2 samples, got {size}")
    keyed = sorted((hashlib.sha256(SLICE_SALT + s.encode("utf-8")).digest(), s, i) for i, s in enumerate(sample_ids))
    rows = [i for _, _, i in keyed[:size]]
    if len(rows) < 2:
        return rows, rows
    half = (len(rows) + 1) // 2
    return rows[:half], rows[half:]


def noise_ratio(signal_energy: float, noise_energy: float) -> float:
    """Σ e² / Σ s² (0 for an exact match; inf when the reference is all zeros and the output is not)."""
    if noise_energy <= 0.0:
        return 0.0
    if signal_energy <= 0.0:
        return math.inf
    return float(noise_energy / signal_energy)


def noise_to_db(ratio: float) -> float:
    """SQNR in dB of a noise ratio (inf for 0)."""
    if ratio <= 0.0:
        return math.inf
    if math.isinf(ratio):
        return -math.inf
    return -10.0 * math.log10(ratio)


def local_choice(noise_by_candidate: Mapping[str, float]) -> str:
    """The candidate with the least consumer-output noise; ties go to the earlier candidate."""
    if not noise_by_candidate:
        raise ConfigError("local_choice needs at least one candidate")
    best_name, best = "", math.inf
    for name, value in noise_by_candidate.items():
        if not best_name or value < best:
            best_name, best = name, value
    return best_name


@dataclass(frozen=True)
class DescentStep:
    tensor: str
    candidate: str
    noise: float  # the objective with this one change
    accepted: bool


def coordinate_descent(
    start: Mapping[str, str],
    order: Sequence[str],
    alternatives: Mapping[str, Sequence[str]],
    objective: Callable[[Mapping[str, str]], float],
    *,
    start_noise: float,
    max_evals: int,
    min_relative_gain: float,
) -> tuple[dict[str, str], float, list[DescentStep]]:
    """One sweep over `order`: for each tensor, try its alternatives with every other choice fixed and
    keep the one with the least objective if that is below the current one by more than
    `min_relative_gain` (relative).

    Bounded by `max_evals` objective calls (the sweep stops there). Deterministic: the order, the
    alternatives' order and strict comparisons fix every decision.
    Returns (assignment, its objective, every step tried).
    """
    if max_evals < 0:
        raise ConfigError(f"max_evals must be >= 0, got {max_evals}")
    current = dict(start)
    current_noise = float(start_noise)
    steps: list[DescentStep] = []
    evals = 0
    for tensor in order:
        best_name, best_noise = current[tensor], current_noise
        for name in alternatives.get(tensor, ()):
            if name == current[tensor]:
                continue
            if evals >= max_evals:
                break
            evals += 1
            noise = float(objective({**current, tensor: name}))
            steps.append(DescentStep(tensor, name, noise, False))
            if noise < best_noise and noise < current_noise * (1.0 - min_relative_gain):
                best_name, best_noise = name, noise
        if best_name != current[tensor]:
            current[tensor] = best_name
            current_noise = best_noise
            steps = [
                DescentStep(s.tensor, s.candidate, s.noise, True) if (s.tensor == tensor and s.candidate == best_name) else s
                for s in steps
            ]
        if evals >= max_evals:
            break
    return current, current_noise, steps


def rows_noise(error: npt.ArrayLike, signal: npt.ArrayLike, rows: Sequence[int] | None = None) -> float:
    """The search objective on some rows: mean over outputs of Σ_rows e / Σ_rows s.

    error, signal: [rows, outputs] per-row energies Σ(fp32 − q)² and Σ fp32² (float64). The sums are
    `math.fsum` (exactly rounded), so the value does not depend on the rows' order.
    """
    e, s = np.asarray(error, dtype=np.float64), np.asarray(signal, dtype=np.float64)
    if e.shape != s.shape or e.ndim != 2 or e.shape[1] == 0:
        raise ConfigError(f"rows_noise needs two [rows, outputs] arrays of one shape, got {e.shape} and {s.shape}")
    index = np.arange(e.shape[0]) if rows is None else np.asarray(rows, dtype=np.intp)
    ratios = [noise_ratio(math.fsum(s[index, k].tolist()), math.fsum(e[index, k].tolist())) for k in range(e.shape[1])]
    return float(np.mean(ratios))


def cross_fit_folds(num_rows: int) -> tuple[tuple[list[int], list[int]], ...]:
    """The two (fit rows, held-out rows) folds of the search slice: alternate rows (the slice is in
    sample-id hash order, so the halves are chosen by sample id), each half fitted once and judged on
    the other. Fewer than 4 rows: no folds (nothing to judge a fit on)."""
    if num_rows < 4:
        return ()
    even, odd = list(range(0, num_rows, 2)), list(range(1, num_rows, 2))
    return ((even, odd), (odd, even))


def descent_trusted(start_noise: float, final_noise: float, min_gain_db: float) -> bool:
    """Whether the descent's gain over its start on the search slice, in dB, is at least `min_gain_db`.

    Each step takes the best of a few tries measured on a few dozen rows, so the slice overstates
    the gain; a small total gain (ocr_det: +0.54 dB on its 24 search pages) did not carry to other
    data (−0.50 dB held out) while large ones did (+2.15 and +9.1 dB on the slice: +2.2 and +4.1 dB
    held out). Below the bar the start is written."""
    if not final_noise < start_noise:
        return False
    if final_noise <= 0.0:
        return True
    return noise_to_db(final_noise) - noise_to_db(start_noise) >= min_gain_db


PROCEDURES = ("single", "start", "auto")  # the simpler first: a tie keeps the simpler procedure


def cross_fit_choice(held_out_noise: Mapping[str, Sequence[float]], order: Sequence[str] = PROCEDURES) -> str:
    """The procedure whose fits generalise best: the least mean noise on the held-out rows of the folds
    (each fold's value is the noise of the assignment the procedure fitted on the other rows);
    ties go to the earlier (simpler) procedure."""
    labels = [p for p in order if p in held_out_noise]
    if not labels or any(len(held_out_noise[p]) == 0 for p in labels):
        raise ConfigError("cross_fit_choice needs every procedure's held-out noise on at least one fold")
    best, best_mean = labels[0], math.fsum(held_out_noise[labels[0]]) / len(held_out_noise[labels[0]])
    for p in labels[1:]:
        mean = math.fsum(held_out_noise[p]) / len(held_out_noise[p])
        if mean < best_mean:
            best, best_mean = p, mean
    return best


def descent_plan(
    local: Mapping[str, Mapping[str, float]],
    distinct: Mapping[str, Sequence[str]],
    current: Mapping[str, str],
    *,
    local_margin: float,
    max_alternatives: int,
) -> tuple[list[str], dict[str, list[str]]]:
    """(order, alternatives) for `coordinate_descent` from the local noise of every candidate.

    Order: the tensors whose current candidate has the most consumer-output noise first (ties in
    the given order). Alternatives: per tensor, at most `max_alternatives` other distinct candidates
    whose local noise is within `local_margin` times the tensor's best, least noisy first.
    """
    tensors = list(local)
    order = sorted(tensors, key=lambda t: (-local[t][current[t]], tensors.index(t)))
    alternatives: dict[str, list[str]] = {}
    for t in tensors:
        floor = min(local[t][d] for d in distinct[t])
        near = [c for c in distinct[t] if c != current[t] and local[t][c] <= local_margin * floor]
        near.sort(key=lambda c: (local[t][c], list(distinct[t]).index(c)))
        alternatives[t] = near[:max_alternatives]
    return order, alternatives
