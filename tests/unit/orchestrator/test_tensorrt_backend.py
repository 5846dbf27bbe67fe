"""`trtcal calibrate --backend tensorrt`: config rules and the clear errors where TensorRT/GPU are absent.

The real TensorRT path runs only where TensorRT 10 and a GPU exist (tests/tensorrt/).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from trtcal.cli import main as cli_main
from trtcal.config import CalibrationConfig, JobConfig
from trtcal.errors import BackendUnavailableError, ConfigError
from trtcal.orchestrator.actor import ActorRequest, run_calibration

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_tensorrt_backend_needs_one_tensorrt_algorithm() -> None:
    JobConfig(backend="tensorrt", calibration=CalibrationConfig(algorithms=("minmax",)))
    with pytest.raises(ConfigError, match="exactly one --algorithm"):
        JobConfig(backend="tensorrt", calibration=CalibrationConfig(algorithms=("entropy2", "minmax")))
    with pytest.raises(ConfigError, match="exactly one --algorithm"):
        JobConfig(backend="tensorrt", calibration=CalibrationConfig(algorithms=("percentile",)))
    with pytest.raises(ConfigError, match="backend"):
        JobConfig(backend="tvm")


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the error where TensorRT is absent")
def test_actor_work_without_tensorrt_is_a_clear_error(efficientnet_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "x.npy"
    np.save(data, np.zeros((2, 3, 224, 224), np.float32))
    cal = CalibrationConfig(algorithms=("entropy2",))
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        run_calibration(ActorRequest(efficientnet_path.read_bytes(), str(data), cal, export_qdq=False, backend="tensorrt"))


def test_cli_backend_tensorrt_on_a_gpu_less_cluster_fails_fast(efficientnet_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "x.npy"
    np.save(data, np.zeros((2, 3, 224, 224), np.float32))
    rc = cli_main(["calibrate", str(efficientnet_path), "--data", str(data), "--backend", "tensorrt", "-a", "entropy2",
                   "--store", str(tmp_path / "store"), "-o", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--backend tensorrt" in err and "no GPU" in err
    assert not (tmp_path / "out").exists()


def test_single_batch_plan_keeps_one_batch_when_it_fits() -> None:
    from trtcal.runners.tensorrt.calibrate import single_batch_plan

    assert single_batch_plan(500, 1 << 20, 4 << 30) == (500, 0)  # 0.5 GiB of 2 GiB usable
    assert single_batch_plan(500, 1 << 20, None) == (500, 0)  # free memory unknown: TensorRT's advice
    assert single_batch_plan(5000, 1 << 20, 4 << 30) == (1250, 0)  # exact divisor within the limit (2048)
    assert single_batch_plan(4099, 1 << 20, 4 << 30) == (2048, 3)  # 4099 = 4099 x 1: drop the remainder
    assert single_batch_plan(7, 1 << 30, 1 << 20) == (1, 0)  # nothing fits: one sample at a time


def test_bytes_per_sample_counts_every_float_tensor(efficientnet_path: Path) -> None:
    import onnx

    from trtcal.runners.tensorrt.calibrate import bytes_per_sample

    model = onnx.shape_inference.infer_shapes(onnx.load(str(efficientnet_path)))
    slow = 0
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = value.type.tensor_type
        if t.elem_type == onnx.TensorProto.FLOAT and value.name not in {i.name for i in model.graph.initializer}:
            n = 4
            for d in t.shape.dim[1:]:
                n *= d.dim_value or 1
            slow += n
    got = bytes_per_sample(efficientnet_path)
    assert got == slow
    assert 20 << 20 < got < 200 << 20  # EfficientNet-Lite0: tens of MB of activations per 224x224 image
