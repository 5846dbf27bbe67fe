"""`trtcal export qdq`, `trtcal eval` and `trtcal report` on tiny models, through the real CLI entry point."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tests.unit.export.graphs import initializer, residual_cnn, residual_cnn_amax
from trtcal.cli import main
from trtcal.core import write_trt_cache
from trtcal.export.qdq import export_qdq, serialize_model


@pytest.fixture()
def workdir(tmp_path):
    model = residual_cnn()
    onnx.save(model, tmp_path / "model.onnx")
    amax = residual_cnn_amax()
    ranges = {"tensors": {n: {"amax": {"minmax": a, "entropy2": a * 0.8}} for n, a in amax.items()}}
    (tmp_path / "ranges.json").write_text(json.dumps(ranges))
    np.save(
        tmp_path / "data.npy", np.random.default_rng(0).uniform(-3, 3, size=(24, 3, 6, 6)).astype(np.float32)
    )
    return tmp_path


def test_export_from_ranges_equals_the_library(workdir, capsys) -> None:
    out = workdir / "q.onnx"
    rc = main(
        [
            "export",
            "qdq",
            str(workdir / "model.onnx"),
            "--ranges",
            str(workdir / "ranges.json"),
            "--method",
            "minmax",
            "-o",
            str(out),
            "--report-json",
            str(workdir / "r.json"),
        ]
    )
    assert rc == 0
    assert out.read_bytes() == serialize_model(export_qdq(residual_cnn(), residual_cnn_amax()))
    report = json.loads((workdir / "r.json").read_text())
    assert report["kept_float_nodes"] == ["conv3"] and report["residual_adds"] == ["add"]
    assert "wrote" in capsys.readouterr().err


def test_export_from_cache_exclude_and_no_noise_reduction(workdir) -> None:
    cache = workdir / "calibration.cache"
    cache.write_bytes(write_trt_cache(residual_cnn_amax(), trt_version="10.3.0", algorithm="minmax"))
    out = workdir / "q.onnx"
    rc = main(
        [
            "export",
            "qdq",
            str(workdir / "model.onnx"),
            "--from-cache",
            str(cache),
            "-o",
            str(out),
            "--exclude",
            "^conv1$",
            "--no-noise-reduction",
        ]
    )
    assert rc == 0
    expected = export_qdq(
        residual_cnn(),
        residual_cnn_amax(),
        exclude_nodes=("^conv1$",),
        exclude_op_types=("^conv1$",),
        keep_last_smoothing_float=False,
    )
    assert out.read_bytes() == serialize_model(expected)
    q = onnx.load(out)
    assert initializer(q, "w1").dtype == np.float32 and "w3" not in {t.name for t in q.graph.initializer}


def test_export_errors_exit_2_with_a_message_and_write_nothing(workdir, capsys) -> None:
    out = workdir / "q.onnx"
    rc = main(
        [
            "export",
            "qdq",
            str(workdir / "model.onnx"),
            "--ranges",
            str(workdir / "ranges.json"),
            "-o",
            str(out),
        ]
    )
    assert rc == 2 and "choose one with --method" in capsys.readouterr().err
    rc = main(
        [
            "export",
            "qdq",
            str(workdir / "missing.onnx"),
            "--ranges",
            str(workdir / "ranges.json"),
            "--method",
            "minmax",
            "-o",
            str(out),
        ]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    (workdir / "bad.cache").write_text("garbage\n")
    rc = main(
        [
            "export",
            "qdq",
            str(workdir / "model.onnx"),
            "--from-cache",
            str(workdir / "bad.cache"),
            "-o",
            str(out),
        ]
    )
    assert rc == 2 and "header" in capsys.readouterr().err
    assert not out.exists()


def test_calibrate_eval_sensitivity_fallback_then_report(workdir, capsys) -> None:
    import trtcal

    result_dir = workdir / "result"
    trtcal.calibrate(str(workdir / "model.onnx"), str(workdir / "data.npy"), algorithms=("minmax", "entropy2"),
                     output_dir=result_dir)
    rc = main(["eval", str(workdir / "model.onnx"), "--result", str(result_dir), "--data", str(workdir / "data.npy"),
               "--sensitivity", "--fallback", "auto", "--target-sqnr", "30", "--max-float-fraction", "1",
               "--sensitivity-inputs", "8"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| minmax |" in printed and "| entropy2 |" in printed and "fallback" in printed
    assert "output SQNR (dB)" in printed and "agreement" not in printed.split("sensitivity")[0]  # [N,5,6,6]: no class axis
    evaluation = json.loads((result_dir / "evaluation.json").read_text())
    assert [r["label"] for r in evaluation["rows"]] == ["minmax", "entropy2"] and evaluation["num_inputs"] == 24
    sensitivity = json.loads((result_dir / "sensitivity.json").read_text())
    assert sorted(r["members"] for r in sensitivity["ranking"]) == [["conv1"], ["conv2", "add"]]  # one block
    fallback = json.loads((result_dir / "fallback.json").read_text())
    assert fallback["met"] and fallback["after"]["sqnr_db"] >= 30 and fallback["target"] == "SQNR >= 30 dB"
    assert (result_dir / f"model.{fallback['method']}.fallback.qdq.onnx").is_file()
    rc = main(["report", str(result_dir), "-o", str(workdir / "report.html")])
    assert rc == 0
    page = (workdir / "report.html").read_text()
    for name in residual_cnn_amax():
        assert f">{name}<" in page
    assert "Sensitivity ranking" in page and "INT8 vs FP32 evaluation" in page and page.count("<svg") == 6


def test_eval_errors(workdir, capsys) -> None:
    rc = main(
        [
            "eval",
            str(workdir / "model.onnx"),
            "--ranges",
            str(workdir / "ranges.json"),
            "--data",
            str(workdir / "nope.npy"),
        ]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(
        [
            "eval",
            str(workdir / "model.onnx"),
            "--ranges",
            str(workdir / "ranges.json"),
            "--data",
            str(workdir / "data.npy"),
            "--methods",
            "mse",
        ]
    )
    assert rc == 2 and "mse" in capsys.readouterr().err
    rc = main(
        [
            "eval",
            str(workdir / "model.onnx"),
            "--ranges",
            str(workdir / "ranges.json"),
            "--data",
            str(workdir / "data.npy"),
            "--target-agreement",
            "0.9",
        ]
    )
    assert rc == 2 and "--fallback auto" in capsys.readouterr().err


def test_eval_labels_checked_and_cut_by_limit(tmp_path, capsys) -> None:
    from tests.unit.export.graphs import mlp

    onnx.save(mlp(), tmp_path / "mlp.onnx")  # y [N, 4]: four classes
    (tmp_path / "ranges.json").write_text(json.dumps({"tensors": {"x": {"amax": {"minmax": 2.0}}, "h": {"amax": {"minmax": 3.0}}}}))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(-2, 2, size=(10, 8)).astype(np.float32))
    np.save(tmp_path / "good.npy", np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1]))
    np.save(tmp_path / "bad.npy", np.array([0, 1, 2, 3, 0, 1, 2, 3, 9, 1]))
    base = ["eval", str(tmp_path / "mlp.onnx"), "--ranges", str(tmp_path / "ranges.json"), "--data", str(tmp_path / "x.npy")]
    assert main([*base, "--labels", str(tmp_path / "good.npy"), "--limit", "6"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main([*base, "--labels", str(tmp_path / "bad.npy")]) == 2
    err = capsys.readouterr().err
    assert "bad.npy" in err and "label 9 at index 8 is outside the output's 4 classes (0..3)" in err
    assert main([*base, "--labels", str(tmp_path / "bad.npy"), "--limit", "8"]) == 0  # the bad label is cut
    capsys.readouterr()
    np.save(tmp_path / "short.npy", np.array([0, 1]))
    assert main([*base, "--labels", str(tmp_path / "short.npy")]) == 2
    assert "2 labels for 10 inputs" in capsys.readouterr().err
    assert main([*base, "--output-kind", "y=values", "--labels", str(tmp_path / "good.npy")]) == 2
    assert "class axis" in capsys.readouterr().err
    assert main([*base, "--sensitivity", "--fallback", "auto", "--output-kind", "y=values"]) == 2
    assert "--target-sqnr" in capsys.readouterr().err
