"""Exploratory: acceptance rules of the `auto` search compared on the zoo models, judged on held-out data.

For each model: one statistics collection (trtcal.calibrate, as bench_zoo does), then the auto
search's own simulator and search slice (captured from the calibration), the local phase and the
starts once, and the coordinate descent once per rule, every whole-model run memoized by assignment
with its per-sample noise contributions; then the shipped search (`search_auto`, with its cross-fit
guard) on the same simulator. Each rule's final assignment, each start and the shipped result are
judged on bench_zoo's held-out evaluation set with bench_zoo's metric (output SQNR over all outputs).
The table in docs/algorithms.md (auto, "Rules measured") comes from this script.

Run:
    PYTHONPATH=. nice -n 10 .venv/bin/python bench/bench_auto_rules.py --models orientation,ocr_cls --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_zoo as bz  # noqa: E402

Rule = Callable[[np.ndarray, np.ndarray], bool]
GAIN = 0.005
START_RULES = ["min", "guarded"]


def _total(new: np.ndarray, old: np.ndarray) -> bool:
    return bool(new.sum() < old.sum() * (1.0 - GAIN))


def _halves(new: np.ndarray, old: np.ndarray) -> bool:
    return _total(new, old) and all(new[k::2].sum() < old[k::2].sum() for k in (0, 1))


def _paired(k: float) -> Rule:
    def rule(new: np.ndarray, old: np.ndarray) -> bool:
        d = old - new
        se = float(np.std(d, ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else 0.0
        return _total(new, old) and float(np.mean(d)) > k * se
    return rule


def _sign(new: np.ndarray, old: np.ndarray) -> bool:
    d = old - new
    return _total(new, old) and int((d > 0).sum()) > int((d < 0).sum())


def _trim(fraction: float) -> Rule:
    """The gain must survive dropping the ceil(fraction * n) samples that gained most."""
    def rule(new: np.ndarray, old: np.ndarray) -> bool:
        d = np.sort(old - new)
        m = max(1, math.ceil(fraction * len(d)))
        return _total(new, old) and float(d[:-m].sum()) > GAIN * float(old.sum())
    return rule


def _halves_tol(tol: float) -> Rule:
    def rule(new: np.ndarray, old: np.ndarray) -> bool:
        return _total(new, old) and all(new[k::2].sum() < old[k::2].sum() * (1.0 + tol) for k in (0, 1))
    return rule


RULES: dict[str, Rule] = {
    "total": _total,
    "halves": _halves,
    "paired_k1": _paired(1.0),
    "paired_k2": _paired(2.0),
    "sign": _sign,
    "loo": _trim(1e-9),  # drop the single best-gaining sample
    "trim_1/8": _trim(1 / 8),
    "halves_tol2%": _halves_tol(0.02),
}


def descent(start: Mapping[str, str], order: Sequence[str], alternatives: Mapping[str, Sequence[str]],
            noise: Callable[[Mapping[str, str]], np.ndarray], rule: Rule, max_evals: int) -> tuple[dict[str, str], int]:
    """coordinate_descent with a per-sample acceptance rule (least total among accepted)."""
    current = dict(start)
    cur = noise(current)
    evals = 0
    for t in order:
        best_name, best = current[t], cur
        for name in alternatives.get(t, ()):
            if name == current[t] or evals >= max_evals:
                continue
            evals += 1
            v = noise({**current, t: name})
            if v.sum() < best.sum() and rule(v, cur):
                best_name, best = name, v
        if best_name != current[t]:
            current[t], cur = best_name, best
        if evals >= max_evals:
            break
    return current, evals


class Stop(Exception):
    pass


def capture(spec: bz.ModelSpec, calib: np.ndarray, input_name: str, path: Path) -> dict[str, Any]:
    import trtcal
    import trtcal.export.auto_calibration as ac

    got: dict[str, Any] = {}

    def spy(model, candidates, search_inputs, *, config=None, simulator=None, **_: Any):  # type: ignore[no-untyped-def]
        got.update(model=model, candidates=candidates, inputs=search_inputs, sim=simulator, config=config)
        raise Stop

    real = ac.search_auto
    ac.search_auto = spy  # type: ignore[assignment]
    try:
        trtcal.calibrate(str(path), {input_name: calib}, algorithms=("auto",), tensors="quantizable", micro_batch=spec.batch_size)
    except Stop:
        pass
    finally:
        ac.search_auto = real  # type: ignore[assignment]
    if not got:
        raise SystemExit("the auto search was not reached in this process")
    return got


def run_model(spec: bz.ModelSpec) -> dict[str, Any]:
    import onnx

    from trtcal.core.auto_search import descent_plan, distinct_candidates, local_choice
    from trtcal.export.auto import search_auto
    from trtcal.export.qdq import activation_scales, build_qdq

    path, _ = bz.fetch(spec)
    fp32 = onnx.load(str(path))
    input_name = fp32.graph.input[0].name
    calib, evalset = bz.data_for(spec, "calib", spec.calib), bz.data_for(spec, "eval", spec.eval)
    t0 = time.perf_counter()
    got = capture(spec, calib, input_name, path)
    sim, cands, inputs, config = got["sim"], got["candidates"], got["inputs"], got["config"]
    timings = {"statistics": time.perf_counter() - t0}
    names, searched = list(cands), list(sim.searched)
    t0 = time.perf_counter()
    reference = [np.asarray(r, dtype=np.float64) for r in sim.reference(inputs)]
    n = reference[0].shape[0]
    local: dict[str, dict[str, float]] = {t: {} for t in searched}
    for c in names:
        for t, v in sim.local_noise(inputs, cands[c]).items():
            local[t][c] = v
    distinct = {t: distinct_candidates({c: cands[c][t] for c in names}) for t in searched}
    local_pick = {t: local_choice({c: local[t][c] for c in distinct[t]}) for t in searched}
    timings["local"] = time.perf_counter() - t0
    memo: dict[tuple[str, ...], np.ndarray] = {}
    signal = np.stack([(r.reshape(n, -1) ** 2).sum(1) for r in reference], axis=1)  # [n, outputs]

    def errors(assign: Mapping[str, str]) -> np.ndarray:
        key = tuple(assign[t] for t in searched)
        if key not in memo:
            outs = sim.quantized(inputs, {t: cands[assign[t]][t] for t in searched})
            memo[key] = np.stack([((r.reshape(n, -1) - np.asarray(o, dtype=np.float64).reshape(n, -1)) ** 2).sum(1)
                                  for r, o in zip(reference, outs)], axis=1)
        return memo[key]

    def noise(assign: Mapping[str, str]) -> np.ndarray:
        return (errors(assign) / signal.sum(0)).mean(1)

    t0 = time.perf_counter()
    starts = {"local": local_pick, **{c: {t: c for t in searched} for c in names}}
    start_noise = {k: noise(a) for k, a in starts.items()}
    timings["starts"] = time.perf_counter() - t0
    best_single = min(names, key=lambda c: (start_noise[c].sum(), names.index(c)))
    start_total = min(start_noise, key=lambda k: (start_noise[k].sum(), list(starts).index(k)))
    finals: dict[str, dict[str, str]] = {f"start:{k}": a for k, a in starts.items()}
    evals: dict[str, int] = {}
    for start_rule in START_RULES:
        for rname, rule in RULES.items():
            if start_rule == "min":
                start = start_total
            else:  # the local start only when it beats the best single method by the rule
                start = "local" if rule(start_noise["local"], start_noise[best_single]) else best_single
                if start_total != "local":
                    start = start_total
            order, alts = descent_plan(local, distinct, starts[start], local_margin=config.local_margin,
                                       max_alternatives=config.max_alternatives)
            t0 = time.perf_counter()
            final, k = descent(starts[start], order, alts, noise, rule, config.max_global_evals)
            label = f"{rname}" if start_rule == "min" else f"{rname}+guarded_start"
            timings[f"descent {label}"] = time.perf_counter() - t0
            finals[label], evals[label] = final, k
            print(f"  {spec.key} {label}: start {start}, search {-10 * math.log10(noise(final).sum()):.2f} dB", flush=True)
    for proc in ("single", "start", "auto"):
        finals[f"full:{proc}"] = {"single": starts[best_single], "start": starts[start_total],
                                  "auto": finals["total"]}[proc]
    t0 = time.perf_counter()
    shipped = search_auto(got["model"], cands, inputs, config=config, simulator=sim)
    timings["shipped search"] = time.perf_counter() - t0
    finals["shipped"] = {t: shipped.chosen[t] for t in searched}
    print(f"  shipped: procedure {shipped.search['procedure']}, cross-fit {shipped.search['cross_fit']}", flush=True)
    t0 = time.perf_counter()
    judge = bz.Judge(spec, fp32, evalset, input_name)
    held: dict[tuple[str, ...], float] = {}
    rows: dict[str, Any] = {}
    for label, final in finals.items():
        key = tuple(final[t] for t in searched)
        if key not in held:
            table = {t: cands[final.get(t, best_single)][t] for t in next(iter(cands.values()))}
            held[key] = float(bz.Judge.judge(judge, build_qdq(fp32, activation_scales(table)).model)["sqnr_db"])
        rows[label] = {"search_db": -10 * math.log10(float(noise(final).sum())), "heldout_db": held[key],
                       "changed": sum(final[t] != starts[start_total][t] for t in searched), "evals": evals.get(label)}
        print(f"  {spec.key} {label}: {rows[label]}", flush=True)
    timings["judging"] = time.perf_counter() - t0
    single = {c: rows[f"start:{c}"]["heldout_db"] for c in names}
    return {"key": spec.key, "search_rows": n, "shipped": shipped.search, "best_single_search": best_single, "start": start_total,
            "best_single_heldout": max(single.values()), "rows": rows, "timings": timings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="orientation,ocr_cls")
    parser.add_argument("--json", default="")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--no-guarded", action="store_true")
    args = parser.parse_args()
    for name in [r for r in RULES if r not in args.rules.split(",")]:
        del RULES[name]
    if args.no_guarded:
        START_RULES[:] = ["min"]
    out = []
    for key in args.models.split(","):
        print(f"== {key}", flush=True)
        out.append(run_model(bz.MODELS[key]))
        r = out[-1]
        for label, row in r["rows"].items():
            print(f"{key:12s} {label:32s} search {row['search_db']:7.2f}  held-out {row['heldout_db']:7.2f}  "
                  f"vs best single {row['heldout_db'] - r['best_single_heldout']:+.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
