"""`calibrate` with auto (the default) and the quality verdict: bytes, warning, --min-sqnr (nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.data import INPUT_NAME, PREPROCESS_SPEC
from tests.reliability.tiny_cnn import tiny_cnn
from trtcal.batch import write_batch
from trtcal.batch.reader import _numbered_ids
from trtcal.core.auto_search import search_slices
from trtcal.export.auto_calibration import QualityError
from trtcal.orchestrator.calibrate import calibrate

BYTES_EQUAL = ("calibration.cache", "calibration.auto.cache", "ranges.json", "histograms.npy")


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx

    path = tmp_path_factory.mktemp("cnn") / "tiny_cnn.onnx"
    onnx.save(tiny_cnn(side=224), str(path))
    return path


def _run(model: Path, batch: Path, out: Path, **kwargs: object) -> dict[str, bytes]:
    calibrate(str(model), str(batch), output_dir=out, **kwargs)  # type: ignore[arg-type]
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_auto_is_the_default_and_the_same_bytes_for_1_or_2_processes_and_shuffled_rows(
    cnn_path: Path, photo_batch_path: Path, photo_arrays: tuple[np.ndarray, list[str]], tmp_path: Path
) -> None:
    one = _run(cnn_path, photo_batch_path, tmp_path / "one", processes=1)
    two = _run(cnn_path, photo_batch_path, tmp_path / "two", processes=2)
    arrays, ids = photo_arrays
    perm = np.random.default_rng(5).permutation(len(ids))
    shuffled_path = tmp_path / "shuffled.arrow"
    write_batch(shuffled_path, {INPUT_NAME: arrays[perm]}, [ids[i] for i in perm], spec=PREPROCESS_SPEC)
    shuffled = _run(cnn_path, shuffled_path, tmp_path / "shuffled", processes=1)
    for name in BYTES_EQUAL:
        assert one[name] == two[name] == shuffled[name], name
    manifests = [json.loads(files["manifest.json"]) for files in (one, two, shuffled)]
    assert manifests[0]["runner"]["processes"] == 1 and manifests[1]["runner"]["processes"] == 2
    verdicts = [json.dumps(m["verdict"], sort_keys=True) for m in manifests]
    assert verdicts[0] == verdicts[1] == verdicts[2]
    ranges = json.loads(one["ranges.json"])
    assert ranges["algorithms"] == ["auto"] and one["calibration.cache"].startswith(b"TRT-101601-EntropyCalibration2\n")
    searched = {n: e["auto"] for n, e in ranges["tensors"].items() if e.get("auto", {}).get("searched")}
    assert searched and all(e["chosen"] in e["local_noise_db"] for e in searched.values())
    slices = search_slices(ids, 64)
    assert ranges["auto_search"]["search_ids"] == [ids[i] for i in slices[0]]
    assert manifests[0]["verdict"]["verdict_ids"] == [ids[i] for i in slices[1]]
    assert set(manifests[0]["verdict"]["rows"]) >= {"auto", "entropy2", "minmax", "mse"}


def outlier_model():
    """x1 -> MatMul -> MatMul -> y1 and x2 -> MatMul -> MatMul -> y2: the first MatMuls get Q/DQ on x1, x2."""
    from onnx import helper

    from tests.unit.export.graphs import make_model, vi

    rng = np.random.default_rng(7)
    inits = [
        ("w1", rng.standard_normal((64, 16)).astype(np.float32)), ("v1", rng.standard_normal((16, 4)).astype(np.float32)),
        ("w2", rng.standard_normal((1000, 16)).astype(np.float32)), ("v2", rng.standard_normal((16, 4)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x1", "w1"], ["h1"], name="mm1"), helper.make_node("MatMul", ["h1", "v1"], ["y1"], name="out1"),
        helper.make_node("MatMul", ["x2", "w2"], ["h2"], name="mm2"), helper.make_node("MatMul", ["h2", "v2"], ["y2"], name="out2"),
    ]
    return make_model(nodes, [vi("x1", ["N", 64]), vi("x2", ["N", 1000])], [vi("y1", ["N", 4]), vi("y2", ["N", 4])], inits)


def outlier_data(n: int = 96) -> dict[str, np.ndarray]:
    """x1 ~ N(0, 1) with one huge value in a row outside the auto slices: minmax leaves x1 ~0 levels."""
    rng = np.random.default_rng(3)
    x1 = rng.standard_normal((n, 64)).astype(np.float32)
    x2 = rng.standard_normal((n, 1000)).astype(np.float32)
    search, held = search_slices(_numbered_ids(n), 64)
    outside = next(i for i in range(n) if i not in set(search) | set(held))
    x1[outside, 5] = 1000.0
    return {"x1": x1, "x2": x2}


def test_the_verdict_warns_when_the_written_method_is_far_below_the_best(tmp_path: Path) -> None:
    # (minmax alone skips pass 2, and without histograms the verdict can judge only minmax itself)
    result = calibrate(outlier_model(), outlier_data(), algorithms=["minmax", "mse"], output_dir=tmp_path / "out")
    verdict = json.loads((tmp_path / "out" / "manifest.json").read_text())["verdict"]
    assert verdict == result.manifest["verdict"]
    assert verdict["default"] == "minmax" and verdict["best"] != "minmax"
    assert verdict["default_below_best_db"] > 1.0 and verdict["warning"].startswith("the written default 'minmax'")
    assert set(verdict["rows"]["minmax"]["outputs"]) == {"y1", "y2"}
    assert {"mse", "entropy2", "percentile_99.9"} <= set(verdict["rows"])  # requested and candidates
    assert "auto" not in verdict["rows"]  # auto runs only when asked for (it is the default)
    judged = calibrate(outlier_model(), outlier_data(), output_dir=tmp_path / "auto").manifest["verdict"]
    assert judged["default"] == "auto" and judged["warning"] is None

    # The HTML report shows the verdict first (with the warning), then auto's choices worst tensor first.
    from trtcal.export.report import load_report_data, render_report

    page = render_report(load_report_data(tmp_path / "out"))
    assert page.index("<h2>Quality verdict</h2>") < page.index("<h2>Per-tensor ranges</h2>")
    assert "Warning:</b> the written default &#x27;minmax&#x27;" in page
    page = render_report(load_report_data(tmp_path / "auto"))
    ranges = json.loads((tmp_path / "auto" / "ranges.json").read_text())
    chosen_db = {n: e["auto"]["local_noise_db"][e["auto"]["chosen"]] for n, e in ranges["tensors"].items()
                 if e.get("auto", {}).get("searched")}
    assert set(chosen_db) == {"x1", "x2"}
    worst, other = sorted(chosen_db, key=lambda n: chosen_db[n])
    section = page[page.index("<h2>auto: per-tensor choice, worst tensors first</h2>"):]
    assert section.index(f"<td class='l'>{worst}</td>") < section.index(f"<td class='l'>{other}</td>")
    assert page.index("<h2>Quality verdict</h2>") < page.index("<h2>auto: per-tensor choice")


def test_min_sqnr_fails_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(QualityError, match=r"--min-sqnr 200 dB not met: the default 'minmax'"):
        calibrate(outlier_model(), outlier_data(), algorithms=["minmax", "mse"], output_dir=out, min_sqnr=200.0)
    assert not out.exists() and not any(tmp_path.iterdir())


def test_a_model_without_float_outputs_falls_back_to_entropy2_and_says_why(tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    from tests.unit.export.graphs import make_model, vi

    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("MatMul", ["h", "v"], ["y"], name="out"),
        helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0, name="argmax"),
    ]
    label = helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["N"])
    model = make_model(nodes, [vi("x", ["N", 8])], [label],
                       [("w", rng.standard_normal((8, 8)).astype(np.float32)), ("v", rng.standard_normal((8, 3)).astype(np.float32))])
    x = rng.standard_normal((40, 8)).astype(np.float32)
    result = calibrate(model, {"x": x}, algorithms=["auto", "entropy2"], output_dir=tmp_path / "out")
    assert result.amax["auto"] == result.amax["entropy2"]
    verdict = result.manifest["verdict"]
    assert verdict["rows"] == {} and "auto fell back to entropy2" in verdict["warning"] and "float32" in verdict["skipped"]
    ranges = json.loads((tmp_path / "out" / "ranges.json").read_text())
    assert ranges["auto_search"]["fallback"] == "entropy2"
    with pytest.raises(QualityError, match="cannot be checked"):
        calibrate(model, {"x": x}, output_dir=tmp_path / "bar", min_sqnr=10.0)
    assert not (tmp_path / "bar").exists()


def test_explicit_method_keys_do_not_change_and_auto_has_its_own() -> None:
    from trtcal.config import CalibrationConfig
    from trtcal.orchestrator.keys import calibration_key_inputs
    from trtcal.storage import compute_cache_key

    def key(cal: CalibrationConfig) -> str:
        inputs = calibration_key_inputs("ab" * 32, "sha256:" + "cd" * 32, {"resize": 256}, cal, ("onnxruntime-cpu", "1.32.0"))
        return str(compute_cache_key(inputs))

    explicit = CalibrationConfig(algorithms=("entropy2", "minmax"))
    # Golden moved once, on purpose: entropy2's search version 2 (TensorRT 8.5's bin 0 := bin 1) is part
    # of the key, so an entry of the old rule is never served; before it: 4d9477d6… (main before auto).
    golden = "ffe602303e616157c74d6bef0c285d6b2b8f45075aa361c6ae6bbc187d145068"
    assert key(explicit) == golden
    assert key(CalibrationConfig(algorithms=("entropy2", "minmax"), verdict=False)) == golden  # the verdict is no input
    assert key(CalibrationConfig(algorithms=("entropy2", "minmax"), min_sqnr=20.0)) == golden
    assert key(CalibrationConfig()) not in (golden, key(CalibrationConfig(algorithms=("entropy2",))))


def test_search_versions_key_only_the_methods_whose_rule_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    from trtcal.config import CalibrationConfig
    from trtcal.orchestrator.keys import calibration_key_inputs, search_versions
    from trtcal.storage import compute_cache_key

    def key(*algorithms: str) -> str:
        cal = CalibrationConfig(algorithms=algorithms)
        return str(compute_cache_key(calibration_key_inputs("ab" * 32, "sha256:" + "cd" * 32, {}, cal, ("onnxruntime-cpu", "1"))))

    assert search_versions(("minmax", "mse")) == {}
    assert search_versions(("entropy2", "minmax")) == {"entropy2": 2}
    # auto's candidates include entropy2, and auto's own rule (2: the cross-fit guard) is keyed too, so an
    # entry an earlier auto rule wrote is never served for this one
    assert search_versions(("auto",)) == {"auto": 2, "entropy2": 2}
    from trtcal.core import auto_search

    current = key("auto")
    monkeypatch.setattr(auto_search, "AUTO_RULE_VERSION", 1)
    assert key("auto") != current
    # a method still at its first rule keeps the key it always had (golden: main before issue 18's rule)
    assert key("minmax") == "aeffec3885b57381261d7f2afa435bc1be1380985580bd921c146f2a5955d9d0"
