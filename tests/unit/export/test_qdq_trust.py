"""Issue 15 item 4: a calibration that cannot be right for this model is an error, never a silent Q/DQ model."""

from __future__ import annotations

import struct

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.unit.export.graphs import make_model, residual_cnn, residual_cnn_amax, rng_weights, vi
from trtcal.cli import main
from trtcal.core import write_trt_cache
from trtcal.errors import CacheFormatError, ConfigError
from trtcal.export.qdq import QdqConfig, build_qdq, qdq_from_cache


def _hex(value: float) -> str:
    return struct.pack(">f", value).hex()


@pytest.mark.parametrize("scale_hex", ["00000001", "007fffff"])  # the smallest and largest float32 denormals
def test_a_cache_with_a_denormal_scale_is_an_error_not_a_scale_of_one(scale_hex: str) -> None:
    cache = f"TRT-8601-EntropyCalibration2\nx: 3c010a14\nr1: {scale_hex}\n".encode()
    with pytest.raises(ConfigError, match=r"1 tensor\(s\) have a scale that is zero, denormal.*'r1'"):
        qdq_from_cache(residual_cnn(), cache)
    # The library path too (scales handed in directly, as `trtcal eval` and sensitivity do).
    with pytest.raises(ConfigError, match="'r1'"):
        build_qdq(residual_cnn(), {"x": 0.02, "r1": float(np.frombuffer(bytes.fromhex(scale_hex)[::-1], np.float32)[0])})


@pytest.mark.parametrize(("scale_hex", "error"), [
    ("00000000", CacheFormatError), (_hex(-0.05), CacheFormatError), ("7fc00000", CacheFormatError), ("7f800000", CacheFormatError),
])
def test_zero_negative_and_non_finite_scales_are_errors(scale_hex: str, error: type[Exception]) -> None:
    cache = f"TRT-8601-EntropyCalibration2\nx: 3c010a14\nr1: {scale_hex}\n".encode()
    with pytest.raises(error, match="'r1'"):
        qdq_from_cache(residual_cnn(), cache)
    with pytest.raises(ConfigError, match="'r1'"):
        build_qdq(residual_cnn(), {"x": 0.02, "r1": struct.unpack(">f", bytes.fromhex(scale_hex))[0]})


def test_an_unusable_scale_of_a_tensor_the_model_lacks_is_ignored() -> None:
    cache = b"TRT-8601-EntropyCalibration2\nx: 3c010a14\nr1: 3c810a14\nnot_in_model: 00000001\n"
    assert qdq_from_cache(residual_cnn(), cache) is not None


def test_a_cache_of_another_model_is_an_error_naming_the_counts(tmp_path, capsys) -> None:
    onnx.save(residual_cnn(), tmp_path / "model.onnx")
    other = write_trt_cache({"input.1": 2.0, "conv_0": 3.0, "relu_0": 4.0}, trt_version="10.3.0", algorithm="entropy2")
    (tmp_path / "other.cache").write_bytes(other)
    out = tmp_path / "q.onnx"
    rc = main(["export", "qdq", str(tmp_path / "model.onnx"), "--from-cache", str(tmp_path / "other.cache"), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "name 3 tensor(s), 0 of them in this model" in err and "another model" in err
    assert not out.exists()


def _chain(n: int) -> onnx.ModelProto:
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        inits.append((f"w{i}", rng_weights(i, 3, 3, 3, 3)))
        prev = f"c{i}"
    return make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi(prev, ["N", 3, 6, 6])], inits)


def test_a_cache_covering_too_few_activations_is_an_error_unless_allowed(tmp_path, capsys) -> None:
    model = _chain(5)  # conv0..conv3 need x, c0, c1, c2 (conv4 stays float by noise reduction)
    cache = write_trt_cache({"x": 2.0, "unrelated": 1.0}, trt_version="10.3.0", algorithm="entropy2")
    with pytest.raises(ConfigError, match=r"cover 1 of the 4 activation tensor"):
        build_qdq(model, {"x": 2.0 / 127})
    assert build_qdq(model, {"x": 2.0 / 127}, QdqConfig(min_range_coverage=0.0)).report.quantized_nodes == ("conv0",)
    onnx.save(model, tmp_path / "model.onnx")
    (tmp_path / "c.cache").write_bytes(cache)
    argv = ["export", "qdq", str(tmp_path / "model.onnx"), "--from-cache", str(tmp_path / "c.cache"), "-o", str(tmp_path / "q.onnx")]
    assert main(argv) == 2 and "--allow-missing-ranges" in capsys.readouterr().err
    assert main([*argv, "--allow-missing-ranges"]) == 0 and (tmp_path / "q.onnx").exists()


def test_full_ranges_still_export_as_before() -> None:
    scales = {n: float(np.float32(a) / np.float32(127)) for n, a in residual_cnn_amax().items()}
    assert build_qdq(residual_cnn(), scales).report.quantized_nodes == ("conv1", "conv2")
    with pytest.raises(ConfigError, match="min_range_coverage"):
        QdqConfig(min_range_coverage=1.5)


# item 9: files written for others to read follow the umask (they were 0600)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_exported_files_get_the_umask_mode_not_0600(tmp_path, umask: int, mode: int) -> None:
    import os

    from trtcal.export.qdq import write_bytes_atomic

    old = os.umask(umask)
    try:
        path = write_bytes_atomic(tmp_path / "report.html", b"<html></html>")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
