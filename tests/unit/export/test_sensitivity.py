"""Sensitivity ranking (one layer at a time) and the automatic float fallback."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.unit.export.graphs import make_model, rng_weights, vi
from trtcal.errors import ConfigError
from trtcal.export.qdq import QdqConfig, activation_scales
from trtcal.export.sensitivity import (
    SensitivityConfig,
    SensitivityResult,
    fallback_auto,
    layer_macs,
    rank_sensitivity,
)


def chain() -> onnx.ModelProto:
    """x -> conv0 -> relu -> conv1 -> relu -> conv2 -> relu -> head(conv) -> y (3x3 kernels, 4 channels)."""
    nodes, inits, prev = [], [], "x"
    for k in range(3):
        nodes.append(helper.make_node("Conv", [prev, f"w{k}"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}"))
        inits.append((f"w{k}", rng_weights(10 + k, 4, 4 if k else 2, 3, 3, scale=0.3)))
        prev = f"r{k}"
    nodes.append(helper.make_node("Conv", [prev, "wh"], ["hy"], name="head"))
    nodes.append(helper.make_node("GlobalAveragePool", ["hy"], ["gp"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["gp"], ["y"], name="flatten"))  # [N, 10] class scores
    inits.append(("wh", rng_weights(20, 10, 4, 1, 1)))
    return make_model(nodes, [vi("x", ["N", 2, 5, 5])], [vi("y", ["N", 10])], inits)


def inputs(n: int = 48) -> np.ndarray:
    return np.random.default_rng(5).uniform(0, 1, size=(n, 2, 5, 5)).astype(np.float32)


def ranges(broken: str | None = None) -> dict[str, float]:
    """Exact max |x| of the activations on `inputs()`; `broken` gets an amax 40x too small."""
    import onnxruntime as ort

    augmented = onnx.ModelProto()
    augmented.CopyFrom(chain())
    for name in ("r0", "r1"):
        augmented.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
    r0, r1 = session.run(["r0", "r1"], {"x": inputs()})
    values = {"x": 1.0, "r0": float(np.abs(r0).max()), "r1": float(np.abs(r1).max())}
    if broken:
        values[broken] /= 40.0  # clips almost everything: the layer reading it is ruined
    return values


def test_one_at_a_time_ranks_the_broken_layer_first() -> None:
    result = rank_sensitivity(
        chain(), activation_scales(ranges("r0")), inputs(), config=SensitivityConfig(max_inputs=16)
    )
    assert result.num_inputs == 16
    assert result.ranking[0].node == "conv1"  # reads r0
    assert {r.node for r in result.ranking} == {"conv0", "conv1", "conv2"}  # head: noise reduction
    noises = [r.noise_ratio for r in result.ranking]
    assert noises == sorted(noises, reverse=True)
    assert result.ranking[0].sqnr_db == pytest.approx(-10 * np.log10(result.ranking[0].noise_ratio))
    assert result.ranking[0].tensors == ("r0", "w1")
    assert SensitivityResult.from_dict(result.to_dict()) == result


def test_fallback_keeps_the_harmful_block_float_until_the_sqnr_target_holds() -> None:
    scales = activation_scales(ranges("r0"))
    config = SensitivityConfig(max_inputs=16, target_sqnr=15.0, max_float_fraction=1.0)
    fb = fallback_auto(chain(), scales, inputs(), config=config)
    assert fb.before.sqnr_db < 15.0
    assert fb.met and fb.after.sqnr_db >= 15.0 and fb.reason == ""
    assert fb.float_nodes[0] == "conv1" and fb.target == "SQNR >= 15 dB" and fb.target_agreement is None
    assert fb.steps[0].num_float == 0 and fb.steps[0].sqnr_db == fb.before.sqnr_db
    # Cost: conv MACs are 25 positions x Cin x 9 x Cout; conv0 has Cin = 2, conv1 and conv2 Cin = 4.
    macs = {"conv0": 25 * 2 * 9 * 4, "conv1": 25 * 4 * 9 * 4, "conv2": 25 * 4 * 9 * 4}
    assert fb.float_mac_fraction == pytest.approx(sum(macs[n] for n in fb.float_nodes) / sum(macs.values()))
    assert fb.model is not None
    assert not any(n.name.startswith("r0_") for n in fb.model.graph.node), "conv1's input is float now"
    assert fb.to_dict()["float_nodes"][0] == "conv1"


def test_unreachable_target_stops_after_two_evaluations_and_says_why() -> None:
    scales = activation_scales(ranges("r0"))
    config = SensitivityConfig(max_inputs=16, target_sqnr=200.0, max_float_fraction=0.3)
    fb = fallback_auto(chain(), scales, inputs(), config=config)
    assert not fb.met and fb.max_float_blocks == 1 and fb.float_blocks == 1
    assert [s.num_float for s in fb.steps] == [0, 1]
    assert "unreachable" in fb.reason and "1 most harmful of 3 blocks" in fb.reason and "200 dB" in fb.reason


def test_agreement_target_needs_a_class_axis() -> None:
    config = SensitivityConfig(target_agreement=0.9, output_kind="values")
    with pytest.raises(ConfigError, match="no class axis.*target_sqnr"):
        fallback_auto(chain(), activation_scales(ranges("r0")), inputs(16), config=config)


def test_a_conv_and_its_residual_add_are_one_block() -> None:
    from tests.unit.export.graphs import residual_cnn, residual_cnn_amax

    x = np.random.default_rng(3).uniform(-1, 1, size=(8, 3, 6, 6)).astype(np.float32)
    result = rank_sensitivity(residual_cnn(), activation_scales(residual_cnn_amax()), x)
    assert sorted(r.layers for r in result.ranking) == [("conv1",), ("conv2", "add")]
    assert SensitivityResult.from_dict(result.to_dict()) == result


def test_fallback_with_a_good_calibration_keeps_everything_quantized() -> None:
    fb = fallback_auto(
        chain(), activation_scales(ranges()), inputs(), config=SensitivityConfig(target_agreement=0.5)
    )
    assert fb.met and fb.float_nodes == () and fb.float_mac_fraction == 0.0
    assert len(fb.steps) == 1


def test_layer_macs_with_symbolic_batch() -> None:
    assert layer_macs(chain()) == {
        "conv0": 25 * 2 * 9 * 4,
        "conv1": 25 * 4 * 9 * 4,
        "conv2": 25 * 4 * 9 * 4,
        "head": 25 * 4 * 10,
    }


def test_config_validation_and_respecting_excludes() -> None:
    with pytest.raises(ConfigError, match="target_agreement"):
        SensitivityConfig(target_agreement=1.5)
    with pytest.raises(ConfigError, match="target_sqnr"):
        SensitivityConfig(target_sqnr=float("inf"))
    with pytest.raises(ConfigError, match="max_float_fraction"):
        SensitivityConfig(max_float_fraction=0.0)
    with pytest.raises(ConfigError, match="max_inputs"):
        SensitivityConfig(max_inputs=0)
    result = rank_sensitivity(
        chain(), activation_scales(ranges()), inputs(8), qdq_config=QdqConfig(exclude_nodes=("conv0",))
    )
    assert {r.node for r in result.ranking} == {"conv1", "conv2"}
