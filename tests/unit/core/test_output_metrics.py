"""Output metrics by kind, against slow obviously-correct references (plain Python loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trtcal.core.output_metrics import compare_output, resolve_kind
from trtcal.errors import ConfigError, DataError


def slow_sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    signal = sum(float(a) ** 2 for a in ref.ravel())
    noise = sum((float(a) - float(b)) ** 2 for a, b in zip(ref.ravel(), out.ravel()))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def slow_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    total = 0.0
    for a, b in zip(ref.reshape(len(ref), -1), out.reshape(len(out), -1)):
        dot = sum(float(x) * float(y) for x, y in zip(a, b))
        na = math.sqrt(sum(float(x) ** 2 for x in a))
        nb = math.sqrt(sum(float(y) ** 2 for y in b))
        total += dot / (na * nb)
    return total / len(ref)


def slow_argmax(row) -> int:
    best = 0
    for k, v in enumerate(row):
        if v > row[best]:
            best = k
    return best


def slow_top5(row) -> set[int]:
    order = sorted(range(len(row)), key=lambda k: (-row[k], k))
    return set(order[:5])


def slow_kl_softmax(ref_rows, out_rows) -> float:
    total = 0.0
    for a, b in zip(ref_rows, out_rows):
        ea = [math.exp(float(x) - max(a)) for x in a]
        eb = [math.exp(float(x) - max(b)) for x in b]
        p = [x / sum(ea) for x in ea]
        q = [x / sum(eb) for x in eb]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(ref_rows)


def noisy(x: np.ndarray, seed: int, level: float) -> np.ndarray:
    return x + np.random.default_rng(seed).normal(0, level, size=x.shape)


def test_classes_n_c() -> None:
    ref = np.random.default_rng(0).standard_normal((30, 12))
    out = noisy(ref, 1, 0.4)
    m = compare_output(ref, out)
    assert m.kind == "classes"
    assert m.sqnr_db == pytest.approx(slow_sqnr(ref, out))
    assert m.cosine == pytest.approx(slow_cosine(ref, out))
    assert m.max_abs_error == pytest.approx(max(abs(float(a) - float(b)) for a, b in zip(ref.ravel(), out.ravel())))
    agree = sum(slow_argmax(list(a)) == slow_argmax(list(b)) for a, b in zip(ref, out)) / 30
    assert m.top1_agreement == pytest.approx(agree)
    overlap = sum(len(slow_top5(list(a)) & slow_top5(list(b))) / 5 for a, b in zip(ref, out)) / 30
    assert m.top5_overlap == pytest.approx(overlap)
    assert m.mean_kl == pytest.approx(slow_kl_softmax(ref, out))
    labels = np.array([slow_argmax(list(a)) for a in ref])
    acc = compare_output(ref, out, labels=labels).accuracy
    assert acc == pytest.approx(sum(slow_argmax(list(b)) == lab for b, lab in zip(out, labels)) / 30)


def test_softmax_output_is_a_distribution_not_logits() -> None:
    logits = np.random.default_rng(2).standard_normal((20, 8)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    q_logits = noisy(logits, 3, 0.3)
    q_probs = np.exp(q_logits) / np.exp(q_logits).sum(axis=1, keepdims=True)
    m = compare_output(probs, q_probs, activation="Softmax")
    # KL over the probabilities themselves equals KL of softmax(logits): not the ~0 of softmax(probs).
    assert m.mean_kl == pytest.approx(slow_kl_softmax(logits, q_logits), rel=1e-6)
    wrong = compare_output(probs, q_probs)  # as if they were logits
    assert wrong.mean_kl < m.mean_kl / 5


def test_sequence_n_t_c_argmax_per_position() -> None:
    ref = np.random.default_rng(4).standard_normal((6, 9, 7))
    out = noisy(ref, 5, 0.5)
    m = compare_output(ref, out)
    assert m.kind == "sequence"
    hits = [[slow_argmax(list(ref[i, t])) == slow_argmax(list(out[i, t])) for t in range(9)] for i in range(6)]
    assert m.top1_agreement == pytest.approx(sum(map(sum, hits)) / 54)
    assert m.sequence_match == pytest.approx(sum(all(h) for h in hits) / 6)
    overlap = sum(len(slow_top5(list(ref[i, t])) & slow_top5(list(out[i, t]))) / 5 for i in range(6) for t in range(9))
    assert m.top5_overlap == pytest.approx(overlap / 54)
    assert m.mean_kl == pytest.approx(slow_kl_softmax(ref.reshape(-1, 7), out.reshape(-1, 7)))
    # One flattened argmax over T*C (the former behaviour) is a different, meaningless number.
    flat = np.mean(np.argmax(ref.reshape(6, -1), 1) == np.argmax(out.reshape(6, -1), 1))
    assert m.sqnr_db == pytest.approx(slow_sqnr(ref, out)) and flat != m.top1_agreement


def test_boxes_have_no_class_metrics() -> None:
    ref = np.random.default_rng(6).uniform(0, 300, size=(25, 4))
    out = noisy(ref, 7, 2.0)
    m = compare_output(ref, out, kind="values")
    assert (m.kind, m.top1_agreement, m.top5_overlap, m.mean_kl, m.accuracy) == ("values", None, None, None, None)
    assert m.sqnr_db == pytest.approx(slow_sqnr(ref, out))
    assert m.cosine == pytest.approx(slow_cosine(ref, out))
    with pytest.raises(DataError, match="class axis"):
        compare_output(ref, out, kind="values", labels=np.zeros(25, np.int64))


def test_unit_norm_embeddings_are_values_by_default() -> None:
    ref = np.random.default_rng(8).standard_normal((10, 64))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    out = noisy(ref, 9, 0.01)
    m = compare_output(ref, out)
    assert m.kind == "values" and m.top1_agreement is None
    assert m.cosine == pytest.approx(slow_cosine(ref, out))


def test_two_classes_no_top5() -> None:
    ref = np.random.default_rng(10).standard_normal((40, 2))
    out = noisy(ref, 11, 0.3)
    m = compare_output(ref, out)
    assert m.kind == "classes" and m.top5_overlap is None
    assert m.top1_agreement == pytest.approx(sum(slow_argmax(list(a)) == slow_argmax(list(b)) for a, b in zip(ref, out)) / 40)
    assert m.mean_kl == pytest.approx(slow_kl_softmax(ref, out))


def test_sigmoid_and_maps_are_values() -> None:
    ref = np.random.default_rng(12).uniform(size=(3, 5))
    assert compare_output(ref, ref, activation="Sigmoid").kind == "values"
    assert resolve_kind("auto", np.zeros((2, 1, 8, 8))) == "values"
    assert resolve_kind("auto", np.zeros((2, 1))) == "values"
    assert compare_output(ref, ref).sqnr_db == math.inf


def test_labels_checked() -> None:
    ref = np.random.default_rng(13).standard_normal((4, 3))
    with pytest.raises(DataError, match=r"label 3 at index 2 is outside the output's 3 classes \(0..2\)"):
        compare_output(ref, ref, labels=np.array([0, 1, 3, 2]))
    with pytest.raises(DataError, match="outside"):
        compare_output(ref, ref, labels=np.array([0, -1, 1, 2]))
    with pytest.raises(DataError, match="integer"):
        compare_output(ref, ref, labels=np.array([0.0, 1.0, 1.0, 2.0]))
    with pytest.raises(DataError, match="for 4 inputs"):
        compare_output(ref, ref, labels=np.array([0, 1]))


def test_kind_errors() -> None:
    with pytest.raises(ConfigError, match="unknown output kind"):
        compare_output(np.zeros((2, 3)), np.zeros((2, 3)), kind="boxes")
    with pytest.raises(DataError, match=r"\[N, T, C\]"):
        compare_output(np.zeros((2, 3)), np.zeros((2, 3)), kind="sequence")
    with pytest.raises(DataError, match="shape"):
        compare_output(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(DataError, match="NaN"):
        compare_output(np.zeros((2, 3)), np.full((2, 3), np.nan))


@pytest.mark.parametrize("activation", [None, "Softmax", "LogSoftmax", "Sigmoid"])
def test_class_metrics_in_blocks_of_rows_are_the_all_rows_values(monkeypatch, activation) -> None:
    """Top-1, top-5 overlap and KL are computed a block of rows at a time (memory): the same floats as all
    rows in one block, bit for bit, whatever the block size."""
    import dataclasses

    from trtcal.core import output_metrics

    rng = np.random.default_rng(3)
    ref = rng.standard_normal((9, 13, 40)).astype(np.float32) * 4
    if activation == "Softmax":
        ref = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    out = ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.1
    monkeypatch.setattr(output_metrics, "_CHUNK_VALUES", 1 << 40)
    whole = dataclasses.astuple(compare_output(ref, out, activation=activation))
    for values in (1, 40, 41, 777):
        monkeypatch.setattr(output_metrics, "_CHUNK_VALUES", values)
        assert dataclasses.astuple(compare_output(ref, out, activation=activation)) == whole
