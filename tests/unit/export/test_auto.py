"""`auto` on tiny real ONNX graphs (onnx.helper) whose right answer is known, simulated by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.export.graphs import make_model, vi
from trtcal.core.auto_search import candidate_amax, search_slices
from trtcal.core.histogram import histogram_of
from trtcal.export.auto import AutoConfig, AutoSimulator, search_auto, verdict
from trtcal.export.evaluate import simulation_session
from trtcal.export.qdq import QdqConfig, activation_scales, build_qdq

N = 96
NO_SMOOTHING_RULE = QdqConfig(keep_last_smoothing_float=False)


def two_branch_model():
    """y1 = x1 @ w1, y2 = x2 @ w2: two independent quantized activations, two outputs."""
    from onnx import helper

    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((64, 4)).astype(np.float32)
    w2 = rng.standard_normal((1000, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x1", "w1"], ["y1"], name="mm1"), helper.make_node("MatMul", ["x2", "w2"], ["y2"], name="mm2")]
    return make_model(nodes, [vi("x1", ["N", 64]), vi("x2", ["N", 1000])], [vi("y1", ["N", 4]), vi("y2", ["N", 4])],
                      [("w1", w1), ("w2", w2)])


def two_branch_data():
    """x1: N(0, 1) plus one huge outlier in a row outside the auto slices (minmax wastes the range);
    x2: tiny noise plus one large value per row that carries the output (clipping it hurts)."""
    rng = np.random.default_rng(3)
    ids = [f"s{i:03d}" for i in range(N)]
    x1 = rng.standard_normal((N, 64)).astype(np.float32)
    x2 = (0.1 * rng.standard_normal((N, 1000))).astype(np.float32)
    x2[np.arange(N), rng.integers(0, 1000, N)] = rng.uniform(50, 100, N).astype(np.float32)
    search, held = search_slices(ids, 32)
    outside = next(i for i in range(N) if i not in set(search) | set(held))
    x1[outside, 5] = 1000.0
    return {"x1": x1, "x2": x2}, ids, search, held


def candidates_of(inputs):
    table: dict[str, dict[str, float]] = {}
    for name, x in inputs.items():
        h = histogram_of(x)
        for c, amax in candidate_amax(h.counts, h.hist_amax).items():
            table.setdefault(c, {})[name] = amax
    return table


@pytest.fixture(scope="module")
def searched():
    model = two_branch_model()
    inputs, ids, search, held = two_branch_data()
    cands = candidates_of(inputs)
    sim = AutoSimulator(model, list(cands["minmax"]), NO_SMOOTHING_RULE)
    result = search_auto(model, cands, {k: v[search] for k, v in inputs.items()}, simulator=sim,
                         search_ids=[ids[i] for i in search])
    return model, inputs, held, cands, sim, result


def test_auto_avoids_minmax_on_the_outlier_and_clipping_on_the_carrier(searched) -> None:
    _, inputs, _, cands, _, result = searched
    assert cands["minmax"]["x1"] == pytest.approx(1000.0)
    # x1: only percentile 99.9 clips the one outlier (1 value in 6144); the others leave N(0, 1) ~0 levels.
    assert [c for c in cands if cands[c]["x1"] < 20.0] == ["percentile_99.9"]
    assert result.chosen["x1"] == "percentile_99.9"
    # x2: percentile 99.9 (and whatever else lands below 60) clips the carriers (50-100); auto must not.
    clipping = [c for c in cands if cands[c]["x2"] < 60.0]
    assert "percentile_99.9" in clipping and result.chosen["x2"] not in clipping
    assert result.amax["x2"] >= 0.9 * float(np.abs(inputs["x2"]).max())
    assert result.tensors["x1"]["searched"] and set(result.tensors["x1"]["local_noise_db"]) == set(cands)
    s = result.search
    singles = {c: v for c, v in s["starts_sqnr_db"].items() if c != "local"}
    assert s["final_sqnr_db"] >= max(singles.values())  # never worse than any single method
    assert s["start"] in ("local", s["best_single"])
    # the cross-fit: two folds, each procedure judged on the half it was not fitted on, the best one written
    cross = s["cross_fit"]
    assert len(cross["folds"]) == 2
    assert s["procedure"] == (cross["choice"] if cross["choice"] != "auto" or s["descent_trusted"] else "start")
    assert s["descent_trusted"] == (s["descent_gain_db"] >= AutoConfig().min_descent_gain_db)
    assert max(cross["mean_held_out_sqnr_db"].values()) == cross["mean_held_out_sqnr_db"][cross["choice"]]
    # bound: the starts, one descent on the slice and one per fold, one held-out run per fold
    assert s["global_evals"] <= 1 + len(cands) + 3 * AutoConfig().max_global_evals + 2


def test_auto_is_deterministic_as_bytes_for_shuffled_rows(searched) -> None:
    """Rows in another order (a fresh simulator, fresh sessions): the slices follow the sample ids, so the
    search sees the same rows and writes the same bytes. (The micro-batch is fixed by AutoConfig: ONNX
    Runtime's GEMM may round differently for another batch size.)"""
    import json

    model, inputs, _, cands, _, result = searched
    _, ids, _, _ = two_branch_data()
    perm = np.random.default_rng(11).permutation(N)
    shuffled_ids = [ids[i] for i in perm]
    shuffled = {k: v[perm] for k, v in inputs.items()}
    search, _ = search_slices(shuffled_ids, 32)
    again = search_auto(model, cands, {k: v[search] for k, v in shuffled.items()}, qdq_config=NO_SMOOTHING_RULE,
                        search_ids=[shuffled_ids[i] for i in search])
    dump = lambda r: json.dumps([r.amax, r.chosen, r.tensors, r.search], sort_keys=True).encode()  # noqa: E731
    assert dump(again) == dump(result)


def test_scale_inputs_run_exactly_the_exported_model(searched) -> None:
    model, inputs, held, cands, sim, _ = searched
    rows = {k: v[held] for k, v in inputs.items()}
    exported = build_qdq(model, activation_scales(cands["mse"]), NO_SMOOTHING_RULE).model
    expected = simulation_session(exported).run(None, rows)
    got = sim.quantized(rows, cands["mse"])
    for e, g in zip(expected, got):
        assert np.array_equal(e, g)


def test_verdict_ranks_and_warns_on_the_held_out_slice(searched) -> None:
    _, inputs, held, cands, sim, result = searched
    rows = {k: v[held] for k, v in inputs.items()}
    tables = {"minmax": cands["minmax"], "auto": result.amax}
    v = verdict(sim, tables, rows, default="minmax")
    assert v["best"] == "auto" and v["default_below_best_db"] > 1.0
    assert v["warning"].startswith("the written default 'minmax' is") and "\n" not in v["warning"]
    assert set(v["rows"]["auto"]["outputs"]) == {"y1", "y2"}
    assert v["rows"]["auto"]["outputs"]["y1"]["argmax_agreement"] is not None
    quiet = verdict(sim, tables, rows, default="auto")
    assert quiet["warning"] is None and quiet["default_below_best_db"] == 0.0


def test_output_energies_are_summed_in_chunks_to_the_same_exact_float(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_squares` feeds math.fsum 1 M values at a time (bounded memory): the sums are those of one list."""
    import math

    from trtcal.export import auto as auto_module

    monkeypatch.setattr(auto_module, "_SUM_CHUNK", 1000)
    rng = np.random.default_rng(5)
    for shape in [(3, 7, 500), (1,), (2, 3001)]:
        ref = rng.standard_normal(shape).astype(np.float32)
        out = (ref + 1e-3 * rng.standard_normal(shape)).astype(np.float32)
        r, o = ref.astype(np.float64), out.astype(np.float64)
        assert math.fsum(auto_module._squares(ref)) == math.fsum((r * r).ravel().tolist())
        assert math.fsum(auto_module._squares(ref, out)) == math.fsum(((r - o) ** 2).ravel().tolist())
