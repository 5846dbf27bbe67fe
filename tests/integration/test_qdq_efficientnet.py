"""Q/DQ export, exact-simulation evaluation and report on the real EfficientNet-Lite0 and real photos.

Calibration: `trtcal.calibrate` on seeded views of real scikit-image photos; evaluation on views of
OTHER photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from trtcal.export.evaluate import EvalConfig, evaluate
from trtcal.export.qdq import activation_scales, build_qdq, qdq_from_cache, serialize_model

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CALIBRATION_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "moon")
EVALUATION_PHOTOS = ("coffee", "chelsea", "motorcycle_left", "coins", "clock", "retina")


def photo(name: str) -> np.ndarray:
    from skimage import data

    image = np.asarray(data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def views(names: tuple[str, ...], count: int, seed: int) -> np.ndarray:
    """Seeded random-resized crops (25-100% of the area) with flips; EfficientNet-Lite0 preprocessing."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(photo(n)) for n in names]
    out = np.empty((count, 3, 224, 224), dtype=np.float32)
    for k in range(count):
        image = photos[k % len(photos)]
        w, h = image.size
        side = rng.uniform(0.5, 1.0)
        cw, ch = int(w * side), int(h * side)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(crop.convert("RGB").resize((224, 224), resample=Image.BICUBIC), dtype=np.float32)
        out[k] = ((arr - 127.0) / 128.0).transpose(2, 0, 1)
    return out


@pytest.fixture(scope="module")
def calibrated(efficientnet_path: Path, tmp_path_factory):
    """`trtcal.calibrate` output directory and result for four methods on 48 real-photo views."""
    import trtcal

    out = tmp_path_factory.mktemp("calibration") / "result"
    result = trtcal.calibrate(
        str(efficientnet_path),
        {"input": views(CALIBRATION_PHOTOS, 48, seed=1)},
        algorithms=("entropy2", "minmax", "percentile", "mse"),
        method_params={"percentile": {"percentile": 99.99}},
        tensors="quantizable",
        micro_batch=16,
        output_dir=out,
    )
    return result, out


def test_real_model_exports_check_and_simulate(efficientnet_path: Path, calibrated) -> None:
    result, _ = calibrated
    exports = {m: build_qdq(str(efficientnet_path), activation_scales(amax)) for m, amax in result.amax.items()}
    # the classifier, the last smoothing layer, stays float (named by op type: exporters name it differently)
    (classifier,) = [n.name for n in onnx.load(str(efficientnet_path)).graph.node if n.op_type == "Gemm"]
    for export in exports.values():
        onnx.checker.check_model(export.model, full_check=True)
        r = export.report
        assert len(r.quantized_nodes) == 49 and len(r.residual_adds) == 9  # every Conv; every skip Add
        assert r.kept_float_nodes == (classifier,) and r.missing_tensors == ()
    # entropy2 is exported but not judged here: see the accuracy benchmark (bench/RESULTS-accuracy.md).
    judged = {m: exports[m].model for m in ("minmax", "percentile", "mse")}
    evalset = views(EVALUATION_PHOTOS, 36, seed=2)
    evaluation = evaluate(str(efficientnet_path), judged, evalset, config=EvalConfig(batch_size=12))
    for row in evaluation.rows:
        assert row.simulated
        assert row.metrics.top1_agreement >= 0.75, row
        assert 8.0 < row.metrics.sqnr_db < 40.0, row  # real quantization noise, neither broken nor absent


def test_tensorrt10_cache_to_qdq_is_the_same_model(efficientnet_path: Path, calibrated) -> None:
    result, out = calibrated
    for method in result.amax:
        direct = serialize_model(build_qdq(str(efficientnet_path), activation_scales(result.amax[method])).model)
        assert serialize_model(build_qdq(str(efficientnet_path), activation_scales(result.amax[method])).model) == direct
        cache = (out / f"calibration.{method}.cache").read_bytes()
        assert serialize_model(qdq_from_cache(str(efficientnet_path), cache)) == direct


def test_cli_eval_and_report_on_the_real_model(efficientnet_path: Path, calibrated, tmp_path) -> None:
    from trtcal.cli import main

    result, out = calibrated
    data = tmp_path / "eval.npy"
    np.save(data, views(EVALUATION_PHOTOS, 24, seed=3))
    assert main(["eval", str(efficientnet_path), "--result", str(out), "--data", str(data), "--methods", "minmax,mse"]) == 0
    assert main(["export", "qdq", str(efficientnet_path), "--ranges", str(out / "ranges.json"), "--method", "mse",
                 "-o", str(tmp_path / "model.qdq.onnx")]) == 0
    expected = serialize_model(build_qdq(str(efficientnet_path), activation_scales(result.amax["mse"])).model)
    assert (tmp_path / "model.qdq.onnx").read_bytes() == expected
    assert main(["report", str(out), "-o", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    for name in result.tensor_names:
        assert f">{name}<" in page
    assert page.count("<svg") == len(result.tensor_names)
    assert "INT8 vs FP32 evaluation" in page and "mse" in page
