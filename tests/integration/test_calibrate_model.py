"""calibrate() on the real EfficientNet-Lite0 with real photos (skimage.data views)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.fixtures.data import INPUT_NAME, PREPROCESS_SPEC
from tests.unit.runners import tiny_models
from trtcal.batch import open_batch, write_batch
from trtcal.cli import main as cli_main
from trtcal.core.cache_format import read_trt_cache
from trtcal.errors import DataError, ModelError, NonFiniteError
from trtcal.orchestrator.calibrate import calibrate

pytestmark = pytest.mark.slow

METHODS = ("entropy2", "minmax", "percentile", "mse", "entropy", "legacy")
HASHED = [f"calibration.{m}.cache" for m in METHODS] + ["calibration.cache", "ranges.json", "histograms.npy"]


def _artifacts(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _manifest_without_timings(directory: Path) -> dict[str, Any]:
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.pop("timings_s")
    return manifest


@pytest.fixture(scope="module")
def first_run(efficientnet_path: Path, photo_batch_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("calibrate") / "run1"
    result = calibrate(efficientnet_path, photo_batch_path, algorithms=METHODS, output_dir=out)
    return result, out


def test_every_conv_input_and_output_has_a_finite_positive_calibrated_amax(first_run: Any, efficientnet_path: Path) -> None:
    result, out = first_run
    model = onnx.load(str(efficientnet_path))
    conv_tensors = {t for n in model.graph.node if n.op_type == "Conv" for t in (n.input[0], n.output[0])}
    assert len(conv_tensors) > 49
    ranges = json.loads((out / "ranges.json").read_text())
    for method in METHODS:
        cache = read_trt_cache((out / f"calibration.{method}.cache").read_bytes())
        if method == "legacy":  # TensorRT's legacy header is "0 <cutoff> <quantile>": no version in it
            assert cache.version is None and cache.legacy_params is not None
        else:
            assert cache.version == 101601
        for name in conv_tensors:
            amax = cache.amax[name]
            assert np.isfinite(amax) and amax > 0, (method, name)
            assert ranges["tensors"][name]["source"][method] == "calibrated", (method, name)
            assert result.stats[name].count > 0 and result.stats[name].nan_count == 0


def test_minmax_equals_the_true_max_abs_computed_independently(first_run: Any, efficientnet_path: Path,
                                                              photo_arrays: Any) -> None:
    result, out = first_run
    arrays, _ids = photo_arrays
    model = onnx.load(str(efficientnet_path))
    conv_outputs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    for name in conv_outputs:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(["logits", *conv_outputs], {INPUT_NAME: np.ascontiguousarray(arrays)})  # one run, all 48
    cache = read_trt_cache((out / "calibration.minmax.cache").read_bytes())
    ranges = json.loads((out / "ranges.json").read_text())
    for name, value in zip(["logits", *conv_outputs], values):
        true_amax = float(np.abs(value).max())
        assert result.amax["minmax"][name] == true_amax, name
        assert ranges["tensors"][name]["amax"]["minmax"] == true_amax
        assert cache.scale[name] == float(np.float32(true_amax) / np.float32(127.0))
    assert result.amax["minmax"][INPUT_NAME] == float(np.abs(arrays).max())


def test_two_runs_give_identical_bytes(first_run: Any, efficientnet_path: Path, photo_batch_path: Path,
                                      tmp_path: Path) -> None:
    _result, out = first_run
    calibrate(efficientnet_path, photo_batch_path, algorithms=METHODS, output_dir=tmp_path / "run2")
    first, second = _artifacts(out), _artifacts(tmp_path / "run2")
    assert sorted(first) == sorted(second) == sorted([*HASHED, "manifest.json"])
    for name in HASHED:
        assert first[name] == second[name], name
    assert _manifest_without_timings(out) == _manifest_without_timings(tmp_path / "run2")


def test_shuffled_sample_order_gives_identical_bytes(first_run: Any, efficientnet_path: Path, photo_arrays: Any,
                                                    photo_batch_path: Path, tmp_path: Path) -> None:
    _result, out = first_run
    arrays, ids = photo_arrays
    perm = np.random.default_rng(11).permutation(len(ids))
    write_batch(tmp_path / "shuffled.arrow", {INPUT_NAME: arrays[perm]}, [ids[i] for i in perm], spec=PREPROCESS_SPEC)
    assert open_batch(tmp_path / "shuffled.arrow").fingerprint == open_batch(photo_batch_path).fingerprint
    calibrate(efficientnet_path, tmp_path / "shuffled.arrow", algorithms=METHODS, output_dir=tmp_path / "run")
    first, shuffled = _artifacts(out), _artifacts(tmp_path / "run")
    for name in HASHED:
        assert first[name] == shuffled[name], name


@pytest.mark.parametrize("processes", [2, 3])
def test_worker_processes_give_the_bytes_of_one(first_run: Any, efficientnet_path: Path, photo_batch_path: Path,
                                               tmp_path: Path, processes: int) -> None:
    """calibrate(processes=k): k processes on contiguous slices, merged exactly; 48 rows, micro-batch 5,
    so the slices are uneven and end mid-way through the one-process micro-batches of 32 too."""
    _result, out = first_run
    result = calibrate(efficientnet_path, photo_batch_path, algorithms=METHODS, output_dir=tmp_path / "w",
                       micro_batch=5, processes=processes)
    assert result.manifest["runner"]["processes"] == processes
    first, parallel = _artifacts(out), _artifacts(tmp_path / "w")
    different = [name for name in HASHED if first[name] != parallel[name]]
    assert different == [], f"{processes} processes changed {different}"


def test_processes_fall_back_to_this_process_for_in_memory_batches(efficientnet_path: Path, photo_arrays: Any) -> None:
    arrays, _ids = photo_arrays
    result = calibrate(efficientnet_path, {INPUT_NAME: arrays[:6]}, algorithms=("minmax",), processes=2)
    assert result.manifest["runner"]["processes"] == 1


def test_processes_fall_back_when_the_main_module_is_stdin(efficientnet_path: Path, photo_batch_path: Path) -> None:
    """`python - < script.py` has no main file for multiprocessing's spawn to re-import: collect here."""
    import subprocess
    import sys

    from tests.fixtures.data import REPO_ROOT

    script = (
        f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); import trtcal\n"
        f"r = trtcal.calibrate({str(efficientnet_path)!r}, {str(photo_batch_path)!r}, algorithms=('minmax',), processes=2)\n"
        "print('processes', r.manifest['runner']['processes'])\n"
    )
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("processes 1")


def test_micro_batch_size_does_not_change_the_artifacts(first_run: Any, efficientnet_path: Path,
                                                       photo_batch_path: Path, tmp_path: Path) -> None:
    """Measured: with ORT_DISABLE_ALL on CPU, ONNX Runtime's kernels give bitwise the same activations
    for micro-batches of 5 and 32 (convolutions run per image). Other execution providers or CPUs
    may differ by ulps across batch sizes; docs/batch-format.md says so."""
    _result, out = first_run
    calibrate(efficientnet_path, photo_batch_path, algorithms=METHODS, output_dir=tmp_path / "mb5", micro_batch=5)
    first, small = _artifacts(out), _artifacts(tmp_path / "mb5")
    different = [name for name in HASHED if first[name] != small[name]]
    assert different == [], f"micro-batch 5 vs 32 changed {different}"


def test_activation_budget_changes_samples_per_run_not_the_artifacts(first_run: Any, efficientnet_path: Path,
                                                                    photo_batch_path: Path, tmp_path: Path) -> None:
    """The default budget runs EfficientNet-Lite0 (~50 MB of tensors per image) a few images at a time;
    1 MiB runs one image at a time, 0 (no limit) 32: the same bytes (the default is the first run)."""
    result, out = first_run
    default = result.manifest["runner"]["samples_per_run"]
    assert 1 < default < 32 and result.manifest["runner"]["micro_batch"] == 32
    for budget, expected in ((1, 1), (0, 32)):
        run = calibrate(efficientnet_path, photo_batch_path, algorithms=METHODS, output_dir=tmp_path / str(budget),
                        activation_budget_mib=budget)
        assert run.manifest["runner"]["samples_per_run"] == expected
        different = [name for name in HASHED if _artifacts(out)[name] != _artifacts(tmp_path / str(budget))[name]]
        assert different == [], f"activation budget {budget} MiB changed {different}"


def test_cli_end_to_end(efficientnet_path: Path, photo_batch_path: Path, first_run: Any, tmp_path: Path) -> None:
    _result, out = first_run
    rc = cli_main(["-q", "calibrate", str(efficientnet_path), "--data", str(photo_batch_path), "--algorithm",
                   "entropy2", "--algorithm", "minmax", "--output", str(tmp_path / "cli"), "--trt-version", "10.16.1",
                   "--micro-batch", "16"])
    assert rc == 0
    cli = _artifacts(tmp_path / "cli")
    first = _artifacts(out)
    assert cli["calibration.cache"] == first["calibration.entropy2.cache"]
    assert cli["calibration.minmax.cache"] == first["calibration.minmax.cache"]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, photo_arrays: Any, efficientnet_path: Path) -> Path:
    directory = tmp_path_factory.mktemp("bad")
    arrays, _ids = photo_arrays
    np.savez(directory / "wrong_name.npz", image=arrays[:2])
    np.save(directory / "wrong_shape.npy", np.zeros((2, 3, 200, 200), np.float32))
    np.save(directory / "wrong_dtype.npy", arrays[:2].astype(np.float64))
    np.save(directory / "empty.npy", np.zeros((0, 3, 224, 224), np.float32))
    (directory / "truncated.onnx").write_bytes(efficientnet_path.read_bytes()[: 1 << 20])
    onnx.save(tiny_models.log_model(), directory / "log.onnx")
    np.save(directory / "negative.npy", np.array([[1.0, -1.0, 2.0], [0.5, 0.25, 3.0]], np.float32))
    return directory


@pytest.mark.parametrize(
    ("model", "data", "error", "match"),
    [
        ("real", "wrong_name.npz", DataError, r"missing input\(s\) \['input'\] \(expected \['input: \[\?, 3, 224, 224\] float32'\]\)"),
        ("real", "wrong_shape.npy", DataError, r"input 'input': the model expects \[\?, 3, 224, 224\] float32, .*\[3, 200, 200\]"),
        ("real", "wrong_dtype.npy", DataError, "input 'input': the model expects float32, the batch holds float64"),
        ("real", "empty.npy", DataError, "holds no rows"),
        ("truncated.onnx", "wrong_dtype.npy", ModelError, "truncated.onnx"),
        ("log.onnx", "negative.npy", NonFiniteError, "tensor 'y' holds 1 NaN and 0 Inf values"),
    ],
)
def test_bad_input_gives_a_clear_error_and_no_output(bad_inputs: Path, efficientnet_path: Path, tmp_path: Path,
                                                    model: str, data: str, error: type, match: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    model_path = efficientnet_path if model == "real" else bad_inputs / model
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        calibrate(model_path, bad_inputs / data, output_dir=out)
    rc = cli_main(["calibrate", str(model_path), "--data", str(bad_inputs / data), "--output", str(out)])
    assert rc == 2
    assert "trtcal: error: " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # not even a temp dir


def test_basic_graph_optimisations_would_not_change_any_value(efficientnet_path: Path, photo_arrays: Any) -> None:
    """Backs the runner's documented choice: ORT_DISABLE_ALL is used so every tensor keeps its graph
    name and value; ORT_ENABLE_BASIC is measured to give bitwise the same values on this model."""
    from trtcal.model import select_tensors, with_extra_outputs

    arrays, _ids = photo_arrays
    model = onnx.load(str(efficientnet_path))
    names = [n for n in select_tensors(model) if n != INPUT_NAME]
    augmented = with_extra_outputs(model, names).SerializeToString()
    values = {}
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        session = ort.InferenceSession(augmented, options, providers=["CPUExecutionProvider"])
        values[level] = session.run(names, {INPUT_NAME: np.ascontiguousarray(arrays[:8])})
    different = [n for n, a, b in zip(names, values["ORT_DISABLE_ALL"], values["ORT_ENABLE_BASIC"]) if not np.array_equal(a, b)]
    assert different == []
