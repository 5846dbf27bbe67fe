"""Additive attention masks in statistics: the fill (-1e4, -inf) is never an error and never data;
with a declared mask input, padded positions are left out, so padding does not move any scale."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.runners.tiny_bert import tiny_bert, token_batch
from trtcal.batch import batch_from_arrays
from trtcal.config import input_specs_to_dict, parse_input_specs
from trtcal.errors import NonFiniteError
from trtcal.model import mask_tensors, select_tensors
from trtcal.runners.factory import make_runner

MASK_SPEC = {"inputs": input_specs_to_dict(parse_input_specs({"attention_mask": {"mask": True}}))}


@pytest.mark.parametrize("fill", ["-1e4", "-inf"])
def test_mask_tensors_are_not_calibrated_and_the_fill_is_not_data(fill):
    model = tiny_bert(fill)
    masks, masked = mask_tensors(model)
    assert "ext_mask" in masks and "masked_scores" in masked
    assert "ext_mask" not in select_tensors(model, "all") and "scores" in select_tensors(model, "all")
    runner = make_runner(model, kind="onnxruntime")
    stats = runner.collect_stats(batch_from_arrays(token_batch(16)))  # no mask declared: no padding rule
    scores = stats["masked_scores"]
    assert scores.inf_count == 0 and scores.min > -5000.0  # -inf / -1e4 + s left out, not an error
    assert scores.amax == pytest.approx(max(abs(scores.min), abs(scores.max)))


def test_inf_outside_a_mask_is_still_an_error_naming_the_tensor():
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["log_x"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("log_x", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    runner = make_runner(model, kind="onnxruntime")
    batch = batch_from_arrays({"x": np.array([[1.0, 0.0, 2.0]], dtype=np.float32)})
    with pytest.raises(NonFiniteError, match="log_x"):
        runner.collect_stats(batch)
    assert onnx  # imported for the model build


@pytest.mark.parametrize("fill", ["-1e4", "-inf"])
def test_padding_to_16_or_32_gives_bytes_identical_scales(fill, tmp_path):
    from trtcal.orchestrator.calibrate import calibrate

    model = tiny_bert(fill)
    scales = {}
    for length in (16, 32):
        batch = batch_from_arrays(token_batch(length), spec=MASK_SPEC)
        out = tmp_path / f"s{length}"
        result = calibrate(model, batch, output_dir=out, algorithms=("entropy2", "minmax", "percentile"), tensors="all")
        scales[length] = {name: (out / name).read_bytes() for name in result.files if "cache" in name or "ranges" in name}
        assert len(result.tensor_names) > 10
    assert scales[16].keys() and scales[16] == scales[32]


def test_without_the_declared_mask_padding_moves_scales(tmp_path):
    runner = make_runner(tiny_bert(), kind="onnxruntime")
    a = runner.collect_stats(batch_from_arrays(token_batch(16)))
    b = runner.collect_stats(batch_from_arrays(token_batch(32)))
    assert any(a[n].amax != b[n].amax for n in a)  # what the rule is for
