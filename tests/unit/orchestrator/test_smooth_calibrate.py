"""Smoothing inside `calibrate` (CalibrationConfig.smooth, docs/qdq.md "Smoothing"): auto smooths a
post-LN block and only it, the artifacts are of the smoothed copy (written too), the same bytes for
1 and 2 worker processes and for shuffled rows, a CNN byte for byte as before, the key says whether
it smoothed, and the original model with a smoothed cache is refused wherever a cache is replayed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.unit.export.test_smoothing import K, post_ln_block
from tests.unit.runners.tiny_models import conv
from trtcal.batch import write_batch
from trtcal.config import CalibrationConfig
from trtcal.errors import CacheFormatError, ConfigError
from trtcal.export.model_io import serialize_model
from trtcal.export.smoothing import SMOOTHED_MODEL, smooth_model
from trtcal.orchestrator.actor import ActorRequest, run_calibration
from trtcal.orchestrator.keys import calibration_key_inputs, smoothing_key
from trtcal.storage import compute_cache_key

ROWS = 24


def text_arrays(rows: int = ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    """x [rows, 5, K] with padding garbage at the positions the mask marks 0 (2 or 3 real tokens a row)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 5, K)).astype(np.float32)
    mask = np.ones((rows, 5), np.int64)
    mask[::2, 3:] = 0
    mask[1::2, 2:] = 0
    x[mask == 0] = 50.0
    return {"x": x, "mask": mask}


def calibrate(model: onnx.ModelProto, batch: object, **options: object) -> object:
    import trtcal

    return trtcal.calibrate(model, batch, algorithms=("entropy2", "minmax"), verdict=False, micro_batch=5, **options)


def without_manifest(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k != "manifest.json"}


def test_auto_smooths_the_layernorm_outputs_and_publishes_the_smoothed_model(tmp_path: Path) -> None:
    model, arrays = post_ln_block(), text_arrays()
    result = calibrate(model, arrays, output_dir=tmp_path / "out")
    smoothed_bytes = result.files[SMOOTHED_MODEL]
    # The same model `trtcal export smooth --mask-input mask` writes (the mask input is found by its name).
    feeds = [{k: v[i : i + 7] for k, v in arrays.items()} for i in range(0, ROWS, 7)]
    assert smoothed_bytes == serialize_model(smooth_model(model, feeds, alpha=0.5, mask_input="mask")[0])
    assert (tmp_path / "out" / SMOOTHED_MODEL).read_bytes() == smoothed_bytes
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["smoothing"] == result.smoothing == {
        "alpha": 0.5, "model": SMOOTHED_MODEL, "model_sha256": hashlib.sha256(smoothed_bytes).hexdigest(),
        "original_model_sha256": hashlib.sha256(model.SerializeToString()).hexdigest(), "mask_input": "mask",
        "sites": {"h": ["q_dense", "k_dense"]},
    }
    assert manifest["model"]["sha256"] == manifest["smoothing"]["original_model_sha256"]  # the key's model
    assert manifest["artifacts"][SMOOTHED_MODEL]["sha256"] == manifest["smoothing"]["model_sha256"]
    assert manifest["config"]["smooth"] == "auto" and "smoothing" in manifest["timings_s"]
    from trtcal.export.report import load_report_data

    assert any(f"belong to {SMOOTHED_MODEL}" in note for note in load_report_data(tmp_path / "out").notes)  # trtcal report says it too
    # The cache names the smoothed copy's tensors: the Mul output the MatMuls now read.
    assert "h_smoothed" in result.amax["entropy2"] and "h_smoothed" in result.files["calibration.cache"].decode()
    # on = auto where the pattern is; off = no smoothing, today's artifacts.
    assert without_manifest(calibrate(model, arrays, smooth="on").files) == without_manifest(result.files)
    off = calibrate(model, arrays, smooth="off")
    assert off.smoothing is None and SMOOTHED_MODEL not in off.files and "smoothing" not in off.manifest
    assert "h_smoothed" not in off.amax["entropy2"]
    # A model smoothed already (`trtcal export smooth`, or calibrate's own copy) has no site left: never smoothed twice.
    again = calibrate(onnx.load_from_string(smoothed_bytes), arrays)
    assert again.smoothing is None and without_manifest(again.files) == {
        k: v for k, v in without_manifest(result.files).items() if k != SMOOTHED_MODEL}


def test_smoothed_artifacts_are_the_same_bytes_for_two_workers_and_shuffled_rows(tmp_path: Path) -> None:
    model, arrays = post_ln_block(), text_arrays(40)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    ids = np.array([f"row{i:02d}" for i in range(40)])
    write_batch(tmp_path / "batch.arrow", arrays, list(ids), spec={})
    order = np.random.default_rng(1).permutation(40)
    write_batch(tmp_path / "shuffled.arrow", {k: v[order] for k, v in arrays.items()}, list(ids[order]), spec={})
    one = calibrate(str(path), str(tmp_path / "batch.arrow"), processes=1)
    two = calibrate(str(path), str(tmp_path / "batch.arrow"), processes=2)
    assert two.manifest["runner"]["processes"] == 2
    assert without_manifest(one.files) == without_manifest(two.files)
    shuffled = calibrate(str(path), str(tmp_path / "shuffled.arrow"))
    assert shuffled.files[SMOOTHED_MODEL] == one.files[SMOOTHED_MODEL]
    assert shuffled.files["calibration.cache"] == one.files["calibration.cache"]


def test_a_cnn_is_unaffected_byte_for_byte_and_on_is_an_error(tmp_path: Path) -> None:
    import trtcal

    model = conv()
    x = np.random.default_rng(0).standard_normal((6, 1, 6, 6)).astype(np.float32)
    auto = trtcal.calibrate(model, {"x": x}, algorithms=("entropy2",), verdict=False)
    off = trtcal.calibrate(model, {"x": x}, algorithms=("entropy2",), verdict=False, smooth="off")
    assert auto.smoothing is None and "smoothing" not in auto.manifest and "smoothing" not in auto.timings
    assert without_manifest(auto.files) == without_manifest(off.files)
    with pytest.raises(ConfigError, match="--smooth on: .*no normalisation output .*--smooth auto"):
        trtcal.calibrate(model, {"x": x}, algorithms=("entropy2",), verdict=False, smooth="on")


def test_the_key_holds_smoothing_only_when_the_model_is_smoothed() -> None:
    cnn, encoder = conv().SerializeToString(), post_ln_block().SerializeToString()
    auto, on, off = (CalibrationConfig(smooth=m) for m in ("auto", "on", "off"))  # type: ignore[arg-type]
    assert smoothing_key(cnn, auto) is None and smoothing_key(cnn, off) is None
    with pytest.raises(ConfigError, match="--smooth on"):
        smoothing_key(cnn, on, model="cnn.onnx")
    record = smoothing_key(encoder, auto)
    assert record == smoothing_key(encoder, on) == {"rule": "smoothquant-norm-matmul/1", "alpha": 0.5}
    assert smoothing_key(encoder, off) is None
    assert smoothing_key(encoder, CalibrationConfig(smooth_alpha=0.8)) == {"rule": "smoothquant-norm-matmul/1", "alpha": 0.8}
    assert smoothing_key(encoder, auto, "tensorrt") is None  # TensorRT's calibrator takes the model as it is
    with pytest.raises(ConfigError, match="onnxruntime backend"):
        smoothing_key(encoder, on, "tensorrt")

    def key(smoothing: object) -> str:
        inputs = calibration_key_inputs("ab" * 32, "sha256:" + "cd" * 32, {}, auto, ("onnxruntime-cpu", "1"), smoothing=smoothing)  # type: ignore[arg-type]
        return compute_cache_key(inputs)

    unsmoothed = compute_cache_key(calibration_key_inputs("ab" * 32, "sha256:" + "cd" * 32, {}, off, ("onnxruntime-cpu", "1")))
    assert key(None) == unsmoothed  # the option itself is not keyed: a CNN keeps its key
    assert len({key(None), key(record), key({"rule": "smoothquant-norm-matmul/1", "alpha": 0.8})}) == 3
    with pytest.raises(ConfigError, match="smooth_alpha"):
        CalibrationConfig(smooth_alpha=1.5)
    with pytest.raises(ConfigError, match="smooth must be one of"):
        CalibrationConfig(smooth="yes")  # type: ignore[arg-type]


def test_the_actor_exports_the_qdq_model_of_the_smoothed_copy(tmp_path: Path) -> None:
    np.savez(tmp_path / "batch.npz", **text_arrays())
    config = CalibrationConfig(algorithms=("minmax",), micro_batch=8, verdict=False)
    out = run_calibration(ActorRequest(model_bytes=post_ln_block().SerializeToString(), batch_url=str(tmp_path / "batch.npz"),
                                       calibration=config))
    assert out.smoothing is not None and out.smoothing["sites"] == {"h": ["q_dense", "k_dense"]}
    qdq = onnx.load_from_string(out.files["model.qdq.onnx"])
    onnx.checker.check_model(qdq, full_check=True)
    readers = {n.name: n for n in qdq.graph.node}
    assert readers["q_dense"].input[0].startswith("h_smoothed")  # the Q/DQ pair on the smoothed input
    assert json.loads(out.files["run.json"])["smoothing"] == out.smoothing


def test_the_original_model_with_a_smoothed_cache_is_refused_naming_the_smoothed_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trtcal.cli import main
    from trtcal.export.qdq import activation_scales, build_qdq

    model = post_ln_block()
    original = tmp_path / "model.onnx"
    original.write_bytes(model.SerializeToString())
    result = calibrate(model, text_arrays(), output_dir=tmp_path / "out")
    cache = tmp_path / "out" / "calibration.cache"
    with pytest.raises(CacheFormatError, match=r"smoothed copy of .*model.onnx.*'h_smoothed'"):
        build_qdq(str(original), activation_scales(result.amax["entropy2"]))
    build_qdq(str(tmp_path / "out" / SMOOTHED_MODEL), activation_scales(result.amax["entropy2"]))  # the right pair
    # `trtcal engine build` refuses before TensorRT is even looked for, naming the model beside the cache.
    engine_rc = main(["engine", "build", str(original), "--cache", str(cache), "-o", str(tmp_path / "e.engine")])
    engine_err = capsys.readouterr().err
    qdq_rc = main(["export", "qdq", str(original), "--from-cache", str(cache), "-o", str(tmp_path / "q.onnx")])
    qdq_err = capsys.readouterr().err
    for rc, err in ((engine_rc, engine_err), (qdq_rc, qdq_err)):
        assert rc != 0 and "smoothed copy" in err and str(tmp_path / "out" / SMOOTHED_MODEL) in " ".join(err.split()), err
    np.savez(tmp_path / "eval.npz", **text_arrays(8, seed=5))
    eval_rc = main(["eval", str(original), "--result", str(tmp_path / "out"), "--data", str(tmp_path / "eval.npz")])
    assert eval_rc != 0 and "smoothed copy" in capsys.readouterr().err  # judged on the wrong model: refused too
    assert not (tmp_path / "e.engine").exists() and not (tmp_path / "q.onnx").exists()


def test_a_tensor_list_and_manual_ranges_follow_the_smoothed_tensor(caplog: pytest.LogCaptureFixture) -> None:
    model, arrays = post_ln_block(), text_arrays()
    listed = calibrate(model, arrays, tensors=("h", "q"))
    assert set(listed.amax["minmax"]) == {"h", "q", "h_smoothed"}  # the MatMuls' new input is calibrated too
    manual = calibrate(model, arrays, manual_ranges={"h_smoothed": 3.0, "h": 7.0})  # names of the smoothed copy are known
    assert manual.amax["minmax"]["h_smoothed"] == 3.0 and manual.amax["minmax"]["h"] == 7.0
    assert "manual range of 'h': the model is smoothed" in caplog.text
    with pytest.raises(ConfigError, match="h_smoothed"):
        calibrate(model, arrays, smooth="off", manual_ranges={"h_smoothed": 3.0})  # not smoothed: no such tensor
