"""`calibrate()` on tiny graphs: artifacts, config mapping, zero ranges, manual ranges, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.unit.runners import tiny_models
from trtcal.batch import write_batch
from trtcal.cli import main as cli_main
from trtcal.config import CalibrationConfig
from trtcal.core.cache_format import read_trt_cache
from trtcal.errors import ConfigError, DataError, ModelError, NonFiniteError
from trtcal.orchestrator.calibrate import SAFE_AMAX, calibrate
from trtcal.progress import RecordingProgress


@pytest.fixture()
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(tiny_models.mlp(), path)
    return path


@pytest.fixture()
def mlp_data(tmp_path: Path) -> Path:
    path = tmp_path / "data.npy"
    np.save(path, tiny_models.small_int_inputs(40, [4]))
    return path


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_artifacts_and_their_content(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    out = tmp_path / "out"
    progress = RecordingProgress()
    result = calibrate(mlp_path, mlp_data, algorithms=["percentile", "minmax"], output_dir=out, micro_batch=7,
                       trt_version="10.3.0", progress=progress)
    assert _names(out) == [
        "calibration.cache", "calibration.minmax.cache", "calibration.percentile.cache",
        "histograms.npy", "manifest.json", "ranges.json",
    ]
    assert _names(tmp_path) == ["data.npy", "mlp.onnx", "out"]  # no temp dirs left beside it
    assert (out / "calibration.cache").read_bytes() == (out / "calibration.percentile.cache").read_bytes()
    minmax = read_trt_cache((out / "calibration.minmax.cache").read_bytes())
    assert minmax.header == "TRT-100300-MinMaxCalibration"
    assert list(minmax.scale) == tiny_models.MLP_ACTIVATIONS
    expected = tiny_models.mlp_reference(np.load(mlp_data))
    for name in tiny_models.MLP_ACTIVATIONS:
        assert result.amax["minmax"][name] == float(np.abs(expected[name]).max())
        assert minmax.scale[name] == float(np.float32(np.abs(expected[name]).max()) / np.float32(127))

    ranges = json.loads((out / "ranges.json").read_text())
    counts = np.load(out / "histograms.npy")
    assert counts.shape == (7, 2048) and counts.dtype == np.int64
    for name in tiny_models.MLP_ACTIVATIONS:
        entry = ranges["tensors"][name]
        assert entry["amax"]["minmax"] == result.amax["minmax"][name]
        assert entry["min"] == float(expected[name].min()) and entry["max"] == float(expected[name].max())
        row = entry["histogram"]["row"]
        assert ranges["histogram_tensors"][row] == name
        np.testing.assert_array_equal(counts[row], result.histograms[name].counts)
        assert counts[row].sum() == expected[name].size == entry["count"]

    manifest = json.loads((out / "manifest.json").read_text())
    import hashlib

    for name in _names(out):
        if name != "manifest.json":
            assert manifest["artifacts"][name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert manifest["model"]["sha256"] == hashlib.sha256(mlp_path.read_bytes()).hexdigest()
    assert manifest["runner"]["kind"] == "onnxruntime" and manifest["runner"]["graph_optimization_level"] == "ORT_DISABLE_ALL"
    assert manifest["config"]["algorithms"] == ["percentile", "minmax"] and manifest["config"]["micro_batch"] == 7
    assert set(manifest["timings_s"]) >= {"statistics", "histograms", "scales"}
    stages = {stage for kind, stage, _ in progress.events if kind == "finish"}
    assert stages == {"statistics", "histograms", "verdict"}  # the quality verdict ends every calibration


def test_minmax_alone_skips_the_histogram_pass(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    result = calibrate(mlp_path, mlp_data, algorithms="minmax", output_dir=tmp_path / "out")
    assert result.histograms == {} and "histograms" not in result.timings
    assert "histograms.npy" not in _names(tmp_path / "out")
    both = calibrate(mlp_path, mlp_data, algorithms=["minmax", "entropy2"])
    assert both.amax["minmax"] == result.amax["minmax"]


def test_zero_tensor_gets_the_safe_amax_and_manual_ranges_override(tmp_path: Path) -> None:
    model = tmp_path / "zeros.onnx"
    onnx.save(tiny_models.zeros_model(), model)
    x = tiny_models.small_int_inputs(5, [3])
    result = calibrate(model, {"x": x}, algorithms=["entropy2", "mse"], output_dir=tmp_path / "out",
                       manual_ranges={"y": 3.5})  # a tensor the model lacks is an error (see the end of this file)
    for method in ("entropy2", "mse"):
        cache = read_trt_cache((tmp_path / "out" / f"calibration.{method}.cache").read_bytes())
        assert cache.scale["z"] == 1.0 and result.amax[method]["z"] == SAFE_AMAX
        assert result.amax[method]["y"] == 3.5
    ranges = json.loads((tmp_path / "out" / "ranges.json").read_text())
    assert ranges["tensors"]["z"]["source"]["entropy2"] == "zero_range_default"
    assert ranges["tensors"]["y"]["source"]["mse"] == "manual"
    assert ranges["tensors"]["x"]["source"]["mse"] == "calibrated"


def test_errors_leave_no_artifacts_and_keep_an_earlier_output(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    out = tmp_path / "out"
    first = calibrate(mlp_path, mlp_data, output_dir=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    log_path = tmp_path / "log.onnx"
    onnx.save(tiny_models.log_model(), log_path)
    bad = np.array([[1.0, -2.0, 3.0]], np.float32)
    with pytest.raises(NonFiniteError, match="'y'"):
        calibrate(log_path, {"x": bad}, output_dir=out)
    with pytest.raises(DataError, match="input 'x'"):
        calibrate(mlp_path, {"x": np.zeros((3, 5), np.float32)}, output_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npy", "log.onnx", "mlp.onnx", "out"]
    # A successful re-run replaces the earlier trtcal output whole.
    second = calibrate(mlp_path, mlp_data, output_dir=out, algorithms=["minmax"])
    assert _names(out) == ["calibration.cache", "calibration.minmax.cache", "manifest.json", "ranges.json"]
    assert first.amax["auto"] and second.amax["minmax"]


def test_a_foreign_non_empty_directory_is_refused_before_any_work(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    progress = RecordingProgress()
    with pytest.raises(ConfigError, match="not empty and holds no trtcal manifest"):
        calibrate(mlp_path, mlp_data, output_dir=out, progress=progress)
    assert progress.events == [] and _names(out) == ["notes.txt"]


def test_empty_batch_and_unloadable_model(tmp_path: Path, mlp_path: Path) -> None:
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(DataError, match="holds no rows"):
        calibrate(mlp_path, tmp_path / "empty.npy", output_dir=tmp_path / "out")
    (tmp_path / "bad.onnx").write_bytes(mlp_path.read_bytes()[:50])
    with pytest.raises(ModelError, match="bad.onnx"):
        calibrate(tmp_path / "bad.onnx", {"x": np.zeros((1, 4), np.float32)}, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_keywords_map_onto_the_config(mlp_path: Path, mlp_data: Path) -> None:
    config = CalibrationConfig(algorithms=("mse",), micro_batch=3, num_bins=512)
    result = calibrate(mlp_path, mlp_data, config=config, num_bins=256, tensors=["h", "y"])
    assert result.manifest["config"]["algorithms"] == ["mse"]
    assert result.manifest["config"]["num_bins"] == 256 and result.manifest["config"]["micro_batch"] == 3
    assert result.tensor_names == ("h", "y") and result.histograms["h"].num_bins == 256
    assert calibrate(mlp_path, mlp_data).manifest["config"] == CalibrationConfig().to_dict()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"algorithms": ()}, "at least one"),
        ({"algorithms": ("entropy3",)}, "unknown method"),
        ({"algorithms": ("minmax", "minmax")}, "twice"),
        ({"micro_batch": 0}, "micro_batch"),
        ({"activation_budget_mib": -1}, "activation_budget_mib"),
        ({"num_bins": 2.5}, "num_bins"),
        ({"trt_version": "ten"}, "trt_version"),
        ({"method_params": {"percentile": {"percentile": 99.9}}}, "not one of the requested"),
        ({"algorithms": ("percentile",), "method_params": {"percentile": {"percentile": 120}}}, "percentile"),
        ({"algorithms": ("percentile",), "method_params": {"percentile": {"pct": 1}}}, "invalid parameters"),
        ({"tensors": "some"}, "tensors"),
        ({"tensors": ()}, "tensors"),
        ({"nonfinite": "skip"}, "nonfinite"),
        ({"manual_ranges": {"a": 0.0}}, "manual_ranges"),
        ({"device": "gpu"}, "device"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CalibrationConfig(**kwargs)


def test_the_default_budget_is_the_runners_cpu_256_mib_gpu_none() -> None:
    """None leaves the budget to the runner: 256 MiB of host memory on the CPU, none on a GPU runner
    (small runs made EfficientNet-Lite0 7x slower on an H100; docs/batch-format.md)."""
    from trtcal.runners.base import BaseRunner
    from trtcal.runners.onnxruntime import OnnxRuntimeRunner

    assert CalibrationConfig().activation_budget_mib is None
    assert OnnxRuntimeRunner.default_activation_budget_mib == BaseRunner.default_activation_budget_mib == 256
    torch_runner = pytest.importorskip("trtcal.runners.torch_runner")
    assert torch_runner.TorchRunner.default_activation_budget_mib == torch_runner.OrtDeviceRunner.default_activation_budget_mib == 0


def test_config_round_trips_through_a_dict() -> None:
    config = CalibrationConfig(algorithms=("entropy2", "percentile"), tensors=("a", "b"),
                               method_params={"percentile": {"percentile": 99.9}}, manual_ranges={"a": 2})
    assert CalibrationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="unknown calibration config field"):
        CalibrationConfig.from_dict({"algorithm": "minmax"})


def test_cli_maps_options_and_reports_errors(tmp_path: Path, mlp_path: Path, mlp_data: Path, capsys) -> None:
    out = tmp_path / "cli"
    rc = cli_main(["-q", "calibrate", str(mlp_path), "--data", str(mlp_data), "-a", "percentile", "-a", "minmax",
                   "--percentile", "99.9", "--output", str(out), "--trt-version", "8.6.1", "--micro-batch", "5"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["method_params"] == {"percentile": {"percentile": 99.9}}
    assert manifest["config"]["micro_batch"] == 5
    assert (out / "calibration.cache").read_bytes().startswith(b"TRT-8601-EntropyCalibration2\n")
    write_batch(tmp_path / "wrong.arrow", {"image": np.zeros((2, 4), np.float32)}, ["a", "b"], spec={})
    rc = cli_main(["-q", "calibrate", str(mlp_path), "--data", str(tmp_path / "wrong.arrow"), "--output",
                   str(tmp_path / "cli2")])
    assert rc == 2 and "missing input(s) ['x']" in capsys.readouterr().err
    assert not (tmp_path / "cli2").exists()


# issue 15 item 3: the output folder is written file by file


def test_a_rerun_keeps_the_users_files_and_evaluation_json(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    out = tmp_path / "out"
    calibrate(mlp_path, mlp_data, output_dir=out, algorithms=["entropy2", "percentile"])
    (out / "notes.txt").write_text("mine")
    (out / "evaluation.json").write_text("{}")
    calibrate(mlp_path, mlp_data, output_dir=out, algorithms=["minmax"])
    # The user's files stay; the earlier run's percentile/entropy2 caches are trtcal's and go.
    assert _names(out) == ["calibration.cache", "calibration.minmax.cache", "evaluation.json", "manifest.json", "notes.txt",
                           "ranges.json"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "evaluation.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs or files beside it
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_force_writes_into_a_foreign_folder_and_touches_nothing_else(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "calibration.old.txt").write_text("not trtcal's name")
    calibrate(mlp_path, mlp_data, output_dir=out, algorithms=["minmax"], force=True)
    assert "notes.txt" in _names(out) and "calibration.old.txt" in _names(out) and "manifest.json" in _names(out)


def test_a_failed_write_leaves_no_manifest_and_no_temp_files(tmp_path: Path, mlp_path: Path, mlp_data: Path, monkeypatch) -> None:
    """A crash mid-publish (a real ENOSPC needs a tmpfs: tests/reliability) may leave some new files, but
    never a manifest describing a set that is not all there."""
    import os

    from trtcal import _io

    out = tmp_path / "out"
    calibrate(mlp_path, mlp_data, output_dir=out, algorithms=["minmax"])
    real_replace = os.replace
    calls = {"n": 0}

    def failing_replace(src, dst):  # the second rename fails
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(_io.os, "replace", failing_replace)
    with pytest.raises(OSError):
        calibrate(mlp_path, mlp_data, output_dir=out, algorithms=["entropy2"])
    monkeypatch.setattr(_io.os, "replace", real_replace)
    assert "manifest.json" not in _names(out) and not [n for n in _names(out) if n.startswith(".")]


# issue 15 item 4: a manual range for a tensor the model lacks


def test_a_manual_range_for_an_unknown_tensor_is_an_error_with_near_names(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    names = {o for node in tiny_models.mlp().graph.node for o in node.output}
    near = sorted(names)[0] + "x"
    with pytest.raises(ConfigError, match=rf"1 tensor\(s\) that model .* does not have: '{near}' \(did you mean"):
        calibrate(mlp_path, mlp_data, manual_ranges={near: 3.0})
    with pytest.raises(ConfigError, match="'no_such_tensor'"):
        calibrate(mlp_path, mlp_data, manual_ranges={"no_such_tensor": 3.0, sorted(names)[0]: 2.0})
