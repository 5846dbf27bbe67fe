"""Evaluation metrics against hand computations; exact simulation vs the fused-kernel path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.unit.export.graphs import mlp, run
from trtcal.errors import ConfigError, DataError
from trtcal.export.evaluate import (
    FUSED_SUFFIX,
    EvalConfig,
    EvaluationResult,
    compare_logits,
    evaluate,
)
from trtcal.export.qdq import export_qdq
from trtcal.progress import RecordingProgress


def test_identical_logits() -> None:
    x = np.random.default_rng(0).standard_normal((5, 10))
    m = compare_logits(x, x.copy(), labels=np.argmax(x, axis=1))
    assert m.top1_agreement == 1.0 and m.top5_overlap == 1.0 and math.isinf(m.sqnr_db) and m.mean_kl == 0.0
    assert m.accuracy == 1.0 and m.num_inputs == 5


def test_metrics_by_hand() -> None:
    ref = np.array([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    q = np.array([[2.0, 3.0, 1.0, 0.0, -1.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    m = compare_logits(ref, q, labels=[1, 0], top_k=5)
    assert m.top1_agreement == 0.5  # first row's top-1 moved from class 0 to 1
    assert m.top5_overlap == 1.0  # the same five classes in both rows
    signal = float(np.sum(ref**2))
    assert m.sqnr_db == pytest.approx(10 * math.log10(signal / 2.0))  # two logits off by 1
    p = np.exp(ref[0]) / np.exp(ref[0]).sum()
    r = np.exp(q[0]) / np.exp(q[0]).sum()
    assert m.mean_kl == pytest.approx(float(np.sum(p * np.log(p / r))) / 2)
    assert m.accuracy == 0.5  # row 0 predicts 1 (label 1), row 1 predicts 5 (label 0)
    swapped = q.copy()
    swapped[1] = [5.0, 1.0, 2.0, 3.0, 4.0, 0.0]  # top-5 of row 1 loses class 5, gains class 0
    assert compare_logits(ref, swapped, top_k=5).top5_overlap == pytest.approx((1.0 + 0.8) / 2)


def test_compare_logits_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="shape"):
        compare_logits(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(DataError, match="NaN"):
        compare_logits(np.zeros((2, 3)), np.full((2, 3), np.nan))
    with pytest.raises(DataError, match="labels"):
        compare_logits(np.zeros((2, 3)), np.zeros((2, 3)), labels=[1])


def test_evaluate_simulates_exactly_and_labels_the_fused_path_apart() -> None:
    model = mlp()
    x = np.random.default_rng(1).uniform(-2, 2, size=(40, 8)).astype(np.float32)
    coarse = export_qdq(model, {"x": 2.0, "h": 0.5}, keep_last_smoothing_float=False)  # clips h hard
    fine = export_qdq(model, {"x": 2.0, "h": 6.0}, keep_last_smoothing_float=False)
    progress = RecordingProgress()
    result = evaluate(
        model,
        {"coarse": coarse, "fine": fine},
        x,
        labels=np.zeros(40, dtype=np.int64),
        config=EvalConfig(batch_size=16, fused_int8=True),
        progress=progress,
    )
    assert [r.label for r in result.rows] == [
        "coarse",
        "fine",
        "coarse" + FUSED_SUFFIX,
        "fine" + FUSED_SUFFIX,
    ]
    assert [r.simulated for r in result.rows] == [True, True, False, False]
    # The simulated row is exactly the Q/DQ model run with optimisations off, against FP32.
    expected = compare_logits(run(model, {"x": x}), run(fine, {"x": x}), np.zeros(40, dtype=np.int64))
    assert result.row("fine").metrics == expected
    assert result.best().label == "fine"
    assert result.num_inputs == 40 and result.fp32_accuracy is not None
    assert ("start", "fp32", 40) in progress.events
    again = EvaluationResult.from_dict(result.to_dict())
    assert again == result
    assert "| fine |" in result.to_markdown()


def test_evaluate_inputs_by_name_and_errors() -> None:
    model = mlp()
    x = np.ones((3, 8), np.float32)
    q = export_qdq(model, {"x": 1.0})
    result = evaluate(model, {"q": q}, {"x": x})
    assert result.num_inputs == 3
    with pytest.raises(DataError, match="lack"):
        evaluate(model, {"q": q}, {"wrong": x})
    with pytest.raises(ConfigError, match="empty"):
        evaluate(model, {}, x)
    with pytest.raises(ConfigError, match="output_name"):
        evaluate(model, {"q": q}, x, config=EvalConfig(output_name="nope"))
    with pytest.raises(ConfigError, match="batch_size"):
        EvalConfig(batch_size=0)


def two_heads():
    """x[N,8] -> MatMul -> Relu (h) -> MatMul(wc) -> logits -> Softmax -> probs [N,6]; h -> MatMul(wb) -> boxes [N,4]."""
    from onnx import helper

    from tests.unit.export.graphs import make_model, rng_weights, vi

    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["m"], name="matmul"),
        helper.make_node("Relu", ["m"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "wc"], ["logits"], name="cls"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["h", "wb"], ["boxes"], name="box"),
    ]
    inits = [("wa", rng_weights(1, 8, 16)), ("wc", rng_weights(2, 16, 6)), ("wb", rng_weights(3, 16, 4))]
    return make_model(nodes, [vi("x", ["N", 8])], [vi("probs", ["N", 6]), vi("boxes", ["N", 4])], inits)


def test_every_output_with_its_own_metrics_and_the_softmax_input() -> None:
    model = two_heads()
    x = np.random.default_rng(4).uniform(-2, 2, size=(30, 8)).astype(np.float32)
    q = export_qdq(model, {"x": 2.0, "h": 1.0}, keep_last_smoothing_float=False)
    config = EvalConfig(output_kinds={"boxes": "values"})
    result = evaluate(model, {"q": q}, x, config=config)
    row = result.row("q")
    probs, boxes = row.outputs
    assert (probs.name, probs.activation, probs.metrics.kind) == ("probs", "Softmax", "classes")
    assert (boxes.name, boxes.activation, boxes.metrics.kind) == ("boxes", None, "values")
    assert boxes.metrics.top1_agreement is None and boxes.pre_activation_sqnr_db is None
    assert row.metrics == probs.metrics and result.primary_output == "probs"
    # The pre-activation SQNR is the logits' SQNR, measured on the exposed Softmax input.
    import onnx

    from tests.unit.export.graphs import vi

    def logits_of(m: onnx.ModelProto) -> np.ndarray:
        only = onnx.ModelProto()
        only.CopyFrom(m)
        del only.graph.output[:]
        only.graph.output.append(vi("logits", ["N", 6]))
        return run(only, {"x": x})

    ref, out = logits_of(model), logits_of(q)
    assert probs.pre_activation_sqnr_db == pytest.approx(compare_logits(ref, out).sqnr_db)
    assert probs.metrics.sqnr_db != pytest.approx(probs.pre_activation_sqnr_db)
    text = result.to_markdown()
    assert "SQNR of the Softmax output (dB)" in text and "Softmax input SQNR (dB)" in text
    assert "logit SQNR" not in text and "top-5 overlap" in text.split("Output `boxes`")[0]  # 6 classes > 5
    boxes_table = text.split("Output `boxes`")[1]
    assert "agreement" not in boxes_table and "KL" not in boxes_table
    assert EvaluationResult.from_dict(result.to_dict()) == result


def test_labels_out_of_range_are_a_clear_error() -> None:
    model = mlp()
    x = np.ones((3, 8), np.float32)
    q = export_qdq(model, {"x": 1.0})
    with pytest.raises(DataError, match="label 4 at index 1 is outside the output's 4 classes"):
        evaluate(model, {"q": q}, x, labels=np.array([0, 4, 1]))
    with pytest.raises(DataError, match="class axis"):
        evaluate(model, {"q": q}, x, labels=np.array([0, 1, 1]), config=EvalConfig(output_kinds={"y": "values"}))
    with pytest.raises(ConfigError, match="output_kinds"):
        EvalConfig(output_kinds={"y": "boxes"})
