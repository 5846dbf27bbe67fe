"""Q/DQ export, exact-simulation evaluation and report on the real EfficientNet-Lite0 and real photos.

Calibration: trtcal's ONNX Runtime runner (two exact passes) on seeded views of real scikit-image
photos; evaluation on views of OTHER photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from trtcal.core import compute_amax, write_trt_cache
from trtcal.export.evaluate import EvalConfig, evaluate
from trtcal.export.qdq import activation_scales, build_qdq, qdq_from_cache, serialize_model
from trtcal.export.report import ReportData, TensorReport, render_report

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "efficientnet_lite0.onnx"
CALIBRATION_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "moon")
EVALUATION_PHOTOS = ("coffee", "chelsea", "motorcycle_left", "coins", "clock", "retina")
METHODS = {"minmax": ("minmax", {}), "percentile 99.99": ("percentile", {"percentile": 99.99}), "mse": ("mse", {})}


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
def calibrated():
    if not MODEL.is_file():
        pytest.fail(f"the example model {MODEL} is missing (it ships in shared/models)")
    from trtcal.runners.onnxruntime import OnnxRuntimeRunner
    from trtcal.workers.batch_format import batch_from_arrays

    runner = OnnxRuntimeRunner(str(MODEL), tensors="quantizable")
    batch = batch_from_arrays({"input": views(CALIBRATION_PHOTOS, 48, seed=1)})
    stats = runner.collect_stats(batch, micro_batch=16)
    hist_amax = {n: s.amax for n, s in stats.items()}
    counts = runner.collect_counts(batch, hist_amax, num_bins=2048, micro_batch=16)
    table = {
        label: {n: compute_amax(counts[n], hist_amax[n], method, **params) for n in runner.tensor_names}
        for label, (method, params) in METHODS.items()
    }
    return table, counts, hist_amax


def test_real_model_exports_check_and_simulate(calibrated) -> None:
    table, _, _ = calibrated
    exports = {label: build_qdq(str(MODEL), activation_scales(amax)) for label, amax in table.items()}
    for export in exports.values():
        onnx.checker.check_model(export.model, full_check=True)
        r = export.report
        assert len(r.quantized_nodes) == 49 and len(r.residual_adds) == 9  # every Conv; every skip Add
        assert r.kept_float_nodes == ("/_fc/Gemm",) and r.missing_tensors == ()
    evalset = views(EVALUATION_PHOTOS, 36, seed=2)
    result = evaluate(str(MODEL), {k: e.model for k, e in exports.items()}, evalset, config=EvalConfig(batch_size=12))
    for row in result.rows:
        assert row.simulated
        assert row.metrics.top1_agreement >= 0.75, row
        assert 8.0 < row.metrics.sqnr_db < 40.0, row  # real quantization noise, neither broken nor absent
    best = result.best()
    assert best.metrics.sqnr_db >= result.row("minmax").metrics.sqnr_db


def test_real_model_cache_round_trip_and_determinism(calibrated) -> None:
    table, _, _ = calibrated
    amax = table["percentile 99.99"]
    direct = serialize_model(build_qdq(str(MODEL), activation_scales(amax)).model)
    assert serialize_model(build_qdq(str(MODEL), activation_scales(amax)).model) == direct
    for version, algorithm in (("10.16.1", "entropy2"), ("8.6.1", "minmax")):
        cache = write_trt_cache(amax, trt_version=version, algorithm=algorithm)
        assert serialize_model(qdq_from_cache(str(MODEL), cache)) == direct


def test_real_model_report_names_every_tensor(calibrated) -> None:
    table, counts, hist_amax = calibrated
    tensors = [
        TensorReport(name=n, amax_by_method={m: table[m][n] for m in table}, counts=counts[n], hist_amax=hist_amax[n])
        for n in counts
    ]
    page = render_report(ReportData(title="EfficientNet-Lite0", tensors=tensors))
    for n in counts:
        assert f">{n}<" in page
    assert page.count("<svg") == len(counts)
