import numpy as np
import pytest

from trtcal.core import apply_manual_ranges, per_channel_scales, validate_int8_input, weight_axis
from trtcal.errors import ConfigError, DataError


@pytest.mark.parametrize(
    "op,trans_b,axis", [("Conv", False, 0), ("ConvTranspose", False, 1), ("MatMul", False, 1), ("Gemm", True, 0), ("Gemm", False, 1)]
)
def test_axis_rules(op, trans_b, axis):
    assert weight_axis(op, trans_b=trans_b) == axis


def test_per_channel_scales_reference_and_zero_channel():
    w = np.zeros((3, 2, 3, 3), dtype=np.float32)
    w[0] = 2.54
    w[1, 0, 0, 0] = -1.27
    scales = per_channel_scales(w, 0)
    for k in range(3):
        ref = np.abs(w[k]).max() / np.float32(127)
        assert scales[k] == (np.float32(ref) if ref > 0 else np.float32(1.0))
    assert scales.dtype == np.float32 and np.all(scales > 0)


def test_matmul_axis_is_columns():
    w = np.array([[1.0, -4.0], [2.0, 0.5]], dtype=np.float32)
    assert np.allclose(per_channel_scales(w, weight_axis("MatMul")), [2 / 127, 4 / 127])


def test_unknown_op_and_bad_axis():
    with pytest.raises(ConfigError):
        weight_axis("Relu")
    with pytest.raises(ConfigError):
        per_channel_scales(np.ones((2, 2)), 3)


def test_manual_ranges_override():
    out = apply_manual_ranges({"a": 1.0, "b": 2.0}, {"b": 5.0, "c": 3.0})
    assert out == {"a": 1.0, "b": 5.0, "c": 3.0} and list(out) == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="'b'"):
        apply_manual_ranges({}, {"b": -1})


def test_int8_input_range():
    validate_int8_input(np.array([-128.0, 127.0]), tensor="x")
    with pytest.raises(DataError, match="'x'"):
        validate_int8_input(np.array([0.0, 200.0]), tensor="x")
