"""HTML report: content, determinism, loading a result directory, and rendering in headless Chromium."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pytest

from trtcal.core import compute_amax, histogram_of
from trtcal.errors import ConfigError
from trtcal.export.evaluate import EvaluationResult, LogitMetrics, MethodEvaluation
from trtcal.export.report import (
    ReportData,
    TensorReport,
    activation_sqnr_db,
    histogram_svg,
    load_report_data,
    render_report,
    write_report,
)
from trtcal.export.sensitivity import LayerSensitivity, SensitivityResult

METHODS = ("entropy2", "minmax", "percentile", "mse")
NAMES = ("/stem/Conv_output_0", "block<1>&add", "head/Relu_output_0")


def tensor(name: str, seed: int) -> TensorReport:
    x = np.random.default_rng(seed).laplace(size=200_000).astype(np.float32)
    h = histogram_of(x)
    amax = {m: compute_amax(h.counts, h.hist_amax, m) for m in METHODS}
    return TensorReport(name=name, amax_by_method=amax, counts=h.counts, hist_amax=h.hist_amax)


def report_data() -> ReportData:
    rows = tuple(
        MethodEvaluation(
            m, True, LogitMetrics(num_inputs=50, top1_agreement=a, top5_overlap=0.95, sqnr_db=s, mean_kl=0.01)
        )
        for m, a, s in (("entropy2", 0.98, 19.1), ("minmax", 0.96, 17.2))
    ) + (MethodEvaluation("minmax (ORT fused int8 kernels)", False, LogitMetrics(50, 0.74, 0.7, 8.0, 0.3)),)
    sensitivity = SensitivityResult(
        ranking=(
            LayerSensitivity("/blocks.0/dw/Conv", "Conv", ("a", "w"), 0.01, 20.0, 0.9),
            LayerSensitivity("/stem/Conv", "Conv", ("input", "w0"), 0.001, 30.0, 1.0),
        ),
        num_inputs=16,
    )
    fallback = {
        "target_agreement": 0.99,
        "met": True,
        "float_nodes": ["/blocks.0/dw/Conv"],
        "quantized_layers": 2,
        "float_mac_fraction": 0.05,
        "before": {"top1_agreement": 0.98, "sqnr_db": 19.1},
        "after": {"top1_agreement": 0.995, "sqnr_db": 21.0},
    }
    return ReportData(
        title="EfficientNet <test>",
        tensors=tuple(tensor(n, i) for i, n in enumerate(NAMES)),
        evaluation=EvaluationResult(rows=rows, num_inputs=50),
        sensitivity=sensitivity,
        fallback=fallback,
        qdq={"quantized_nodes": ["/stem/Conv"], "residual_adds": [], "kept_float_nodes": ["/fc/Gemm"]},
    )


def test_page_holds_every_part_escaped_and_is_deterministic() -> None:
    page = render_report(report_data())
    assert page == render_report(report_data())
    assert "block&lt;1&gt;&amp;add" in page and "block<1>&add" not in page
    assert "EfficientNet &lt;test&gt;" in page
    assert page.count("<svg") == len(NAMES)
    for m in METHODS:
        assert f"{m} amax" in page
    assert "ORT fused int8 kernels" in page and "class='fused'" in page and "class='best'" in page
    assert "/blocks.0/dw/Conv" in page and "Automatic float fallback" in page and "5.0% of their MACs" in page
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_histogram_svg_marks_each_threshold() -> None:
    t = tensor("t", 0)
    svg = histogram_svg(t.counts, t.hist_amax, dict(t.amax_by_method), {m: "#000" for m in METHODS})
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    for m in METHODS:
        assert f"<title>{m}: " in svg
    assert svg.count("<polygon") == 1


def test_activation_sqnr_matches_sampled_quantization() -> None:
    x = np.abs(np.random.default_rng(1).standard_normal(400_000)).astype(np.float64)
    h = histogram_of(x.astype(np.float32))
    for amax in (2.0, 3.5, float(x.max())):
        step = amax / 127
        q = np.clip(np.rint(x / step), -127, 127) * step
        direct = 10 * math.log10(np.sum(x**2) / np.sum((x - q) ** 2))
        assert activation_sqnr_db(h.counts, h.hist_amax, amax) == pytest.approx(direct, abs=0.3)


def test_load_a_calibrate_result_directory(tmp_path) -> None:
    import onnx

    import trtcal
    from tests.unit.export.graphs import residual_cnn

    onnx.save(residual_cnn(), tmp_path / "model.onnx")
    data = np.random.default_rng(0).uniform(-3, 3, size=(16, 3, 6, 6)).astype(np.float32)
    result = trtcal.calibrate(
        str(tmp_path / "model.onnx"), {"x": data}, algorithms=("entropy2", "minmax", "mse"), output_dir=tmp_path / "out"
    )
    extra = report_data()
    (tmp_path / "out" / "evaluation.json").write_text(json.dumps(extra.evaluation.to_dict()))
    (tmp_path / "out" / "sensitivity.json").write_text(json.dumps(extra.sensitivity.to_dict()))
    loaded = load_report_data(tmp_path / "out")
    assert [t.name for t in loaded.tensors] == list(result.tensor_names)
    for t in loaded.tensors:
        np.testing.assert_array_equal(t.counts, result.histograms[t.name].counts)
        assert t.hist_amax == result.histograms[t.name].hist_amax
        assert dict(t.amax_by_method) == {m: result.amax[m][t.name] for m in result.amax}
    assert loaded.evaluation == extra.evaluation and loaded.sensitivity == extra.sensitivity
    page = render_report(loaded)
    assert page.count("<svg") == len(result.tensor_names)
    (tmp_path / "out" / "histograms.npy").unlink()
    assert "No histogram recorded" in render_report(load_report_data(tmp_path / "out"))
    with pytest.raises(ConfigError, match="is not a directory"):
        load_report_data(tmp_path / "out" / "ranges.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no ranges.json"):
        load_report_data(tmp_path / "empty")


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "headless Chromium is needed to render the report and is not installed. Install it with: "
            "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium"
        )
    return path


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path) -> None:
    from PIL import Image

    browser = chromium()
    page = write_report(report_data(), tmp_path / "report.html")
    profile = tmp_path / "profile"
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)
    assert image.shape[0] >= 1000 and image.shape[1] >= 1000
    colours = len(np.unique(image.reshape(-1, 3) @ np.array([1 << 16, 1 << 8, 1])))
    non_white = float(np.mean(np.any(image < 240, axis=2)))
    assert colours > 20 and non_white > 0.02, (
        f"the page looks blank ({colours} colours, {non_white:.3f} non-white)"
    )
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], check=True, capture_output=True, timeout=120, text=True
    ).stdout
    for name in ("/stem/Conv_output_0", "block&lt;1&gt;&amp;add", "head/Relu_output_0"):
        assert name in dom
    assert dom.count("<svg") == len(NAMES)
