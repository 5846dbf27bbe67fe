"""INT8 accuracy of trtcal's calibration methods vs ONNX Runtime and ModelOpt on EfficientNet-Lite0.

Everything in one run, on the same data, judged the same way:

* calibration set: seeded augmented views (random-resized crops, flips) of real scikit-image photos;
* evaluation set: views of OTHER real photos (disjoint from the calibration photos);
* trtcal: FP32 statistics with trtcal's ONNX Runtime runner (exact max |x|, 2048-bin histograms),
  every method (entropy2, minmax, percentile 99.9/99.99/99.999, mse), Q/DQ by trtcal's exporter
  (noise-reduction rule on, and once off for a like-for-like placement);
* ONNX Runtime quantize_static, TensorRT-valid setting: QDQ, QInt8 activations and weights,
  per_channel=True, ActivationSymmetric=True, MinMax, QuantizeBias=False;
* ModelOpt ONNX PTQ int8 entropy (`modelopt.onnx.quantization.quantize`, high_precision_dtype
  fp32 so its unquantized layers stay FP32 like everyone else's), run in a separate Python given by
  --modelopt-python (ModelOpt needs torch, which trtcal's environment does not carry);
* every Q/DQ model simulated exactly: ONNX Runtime with GraphOptimizationLevel.ORT_DISABLE_ALL.

ModelOpt lives in its own virtual environment: `nvidia-modelopt[onnx]` pulls torch and
onnxruntime-gpu, which would replace the onnxruntime package trtcal runs on. Set it up once:
    python3 -m venv /tmp/modelopt-venv
    /tmp/modelopt-venv/bin/pip install "nvidia-modelopt[onnx]" torch==2.13.0   # CPU torch wheel
Without --modelopt-python the ModelOpt row is left out and the results say so.

Run:
    .venv/bin/python bench/bench_accuracy.py --modelopt-python /tmp/modelopt-venv/bin/python \
        [--calib 500] [--eval 200] [--write bench/RESULTS-accuracy.md] [--report report.html]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Disjoint photo sets (the stereo motorcycle pair is one scene: only its left view is used). The
# evaluation photos are the ones showing objects an ImageNet classifier can name; textures and
# micrographs (gravel, cell: FP32 top-1 probability < 0.1, logits that are mostly noise) calibrate
# but are not judged. Run with --eval-photos all to judge on them too.
CALIBRATION_PHOTOS = (
    "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "brick", "grass", "moon", "page",
    "gravel", "cell",
)
EVALUATION_PHOTOS = ("coffee", "chelsea", "motorcycle_left", "retina", "coins", "clock", "text")
METHODS = (
    ("entropy2", "entropy2", {}),
    ("minmax", "minmax", {}),
    ("percentile 99.9", "percentile", {"percentile": 99.9}),
    ("percentile 99.99", "percentile", {"percentile": 99.99}),
    ("percentile 99.999", "percentile", {"percentile": 99.999}),
    ("mse", "mse", {}),
)


# ---------------------------------------------------------------------------------------------
# Real photos and seeded augmented views


def load_photo(name: str) -> np.ndarray:
    from skimage import data

    image = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def preprocess(image) -> np.ndarray:
    """EfficientNet-Lite0: RGB, 224x224, (pixel - 127) / 128, CHW float32."""
    arr = np.asarray(image.convert("RGB").resize((224, 224), resample=3), dtype=np.float32)  # 3 = BICUBIC
    return ((arr - 127.0) / 128.0).transpose(2, 0, 1)


def views(names: tuple[str, ...], count: int, seed: int) -> np.ndarray:
    """`count` random-resized crops (area 25-100%, aspect 3/4-4/3) with random flips, round-robin over photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(load_photo(n)) for n in names]
    out = np.empty((count, 3, 224, 224), dtype=np.float32)
    for k in range(count):
        photo = photos[k % len(photos)]
        w, h = photo.size
        area = rng.uniform(0.25, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        left = int(rng.integers(0, w - cw + 1))
        top = int(rng.integers(0, h - ch + 1))
        crop = photo.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[k] = preprocess(crop)
    return out


# ---------------------------------------------------------------------------------------------
# Calibrators


def trtcal_ranges(model: str, calib: np.ndarray) -> tuple[dict[str, dict[str, float]], dict, float]:
    """amax per method per tensor from `trtcal.calibrate` (one statistics collection for all methods).

    calibrate() computes one percentile; the other two come from the same histograms.
    """
    import trtcal
    from trtcal.core import compute_amax

    t0 = time.perf_counter()
    result = trtcal.calibrate(
        model,
        {"input": calib},
        algorithms=("entropy2", "minmax", "percentile", "mse"),
        method_params={"percentile": {"percentile": 99.99}},
        tensors="quantizable",
        micro_batch=25,
    )
    table: dict[str, dict[str, float]] = {}
    for label, method, params in METHODS:
        if method != "percentile" or params["percentile"] == 99.99:
            table[label] = dict(result.amax[method])
        else:
            table[label] = {
                n: compute_amax(h.counts, h.hist_amax, "percentile", **params) for n, h in result.histograms.items()
            }
    return table, result.histograms, time.perf_counter() - t0


def ort_minmax(model: str, calib: np.ndarray, out: Path) -> float:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i : i + 20]} for i in range(0, len(calib), 20)])

        def get_next(self):
            return next(self.batches, None)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # ORT writes augmented_model.onnx into the current directory
        try:
            quantize_static(
                model,
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
            )
        finally:
            os.chdir(cwd)
    return time.perf_counter() - t0


MODELOPT_SCRIPT = textwrap.dedent(
    """
    import sys, time, numpy as np
    from modelopt.onnx.quantization import quantize
    model, data, out = sys.argv[1:4]
    t0 = time.perf_counter()
    quantize(model, quantize_mode="int8", calibration_data=np.load(data), calibration_method="entropy",
             calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=out, log_level="WARNING")
    print("MODELOPT_SECONDS", time.perf_counter() - t0)
    import modelopt
    print("MODELOPT_VERSION", modelopt.__version__)
    """
)


def modelopt_entropy(python: str, model: str, calib_path: Path, out: Path) -> tuple[float | None, str]:
    """(seconds, note). seconds is None when ModelOpt could not run; the note says why."""
    if not python:
        return None, "not run: no --modelopt-python given"
    if not Path(python).exists():
        return None, f"not run: {python} does not exist"
    proc = subprocess.run(
        [python, "-c", MODELOPT_SCRIPT, model, str(calib_path), str(out)], capture_output=True, text=True, timeout=3600
    )
    if proc.returncode != 0 or not out.exists():
        return None, f"ModelOpt failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
    seconds = version = None
    for line in proc.stdout.splitlines():
        if line.startswith("MODELOPT_SECONDS"):
            seconds = float(line.split()[1])
        if line.startswith("MODELOPT_VERSION"):
            version = line.split()[1]
    return seconds, f"nvidia-modelopt {version}"


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="",
                        help="ONNX model (default: EfficientNet-Lite0 from trtcal.demo.model_zoo, fetched once)")
    parser.add_argument("--calib", type=int, default=500, help="calibration views")
    parser.add_argument("--eval", type=int, default=200, help="evaluation views")
    parser.add_argument("--eval-photos", choices=("objects", "all"), default="objects",
                        help="judge on object photos only (default) or also on the texture/micrograph photos")
    parser.add_argument("--modelopt-python", default="", help="a Python with nvidia-modelopt (and torch) installed")
    parser.add_argument("--fused", action="store_true", help="also run ORT's fused int8 kernels (labelled apart)")
    parser.add_argument("--no-fallback", action="store_true", help="skip the sensitivity ranking and fallback")
    parser.add_argument("--report", default="", help="also write trtcal's HTML report of this run here")
    parser.add_argument("--write", default="", help="write the results as Markdown to this file")
    parser.add_argument("--json", default="", help="write the raw numbers as JSON to this file")
    args = parser.parse_args()
    if not args.model:
        from tests.fixtures.data import efficientnet_model_path

        args.model = str(efficientnet_model_path())

    import onnxruntime

    from trtcal.export.evaluate import EvalConfig, evaluate
    from trtcal.export.qdq import QdqConfig, activation_scales, build_qdq

    t_start = time.perf_counter()
    calib_photos = CALIBRATION_PHOTOS if args.eval_photos == "objects" else CALIBRATION_PHOTOS[:-2]
    eval_photos = EVALUATION_PHOTOS if args.eval_photos == "objects" else EVALUATION_PHOTOS + CALIBRATION_PHOTOS[-2:]
    calib = views(calib_photos, args.calib, seed=1)
    evalset = views(eval_photos, args.eval, seed=2)
    print(f"data: {len(calib)} calibration views of {len(calib_photos)} photos, {len(evalset)} evaluation views "
          f"of {len(eval_photos)} other photos", flush=True)

    timings: dict[str, float] = {}
    table, histograms, timings["trtcal.calibrate (statistics + all scale searches)"] = trtcal_ranges(args.model, calib)
    print(f"trtcal calibration: {timings['trtcal.calibrate (statistics + all scale searches)']:.1f} s", flush=True)

    models: dict[str, object] = {}
    for label in table:
        models[f"trtcal {label}"] = build_qdq(args.model, activation_scales(table[label])).model
    for label in ("entropy2", "percentile 99.99", "mse"):
        models[f"trtcal {label} (noise reduction off)"] = build_qdq(
            args.model, activation_scales(table[label]), QdqConfig(keep_last_smoothing_float=False)
        ).model

    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        ort_path = Path(tmp) / "ort.onnx"
        timings["ORT quantize_static MinMax"] = ort_minmax(args.model, calib, ort_path)
        print(f"ORT quantize_static: {timings['ORT quantize_static MinMax']:.1f} s", flush=True)
        import onnx

        models["ORT quantize_static MinMax (TensorRT-valid)"] = onnx.load(str(ort_path))
        calib_path = Path(tmp) / "calib.npy"
        np.save(calib_path, calib)
        mo_path = Path(tmp) / "modelopt.onnx"
        seconds, note = modelopt_entropy(args.modelopt_python, args.model, calib_path, mo_path)
        notes.append(f"ModelOpt: {note}")
        if seconds is not None:
            timings["ModelOpt ONNX PTQ int8 entropy"] = seconds
            models["ModelOpt ONNX PTQ int8 entropy"] = onnx.load(str(mo_path))
            print(f"ModelOpt: {seconds:.1f} s", flush=True)
        else:
            print(note, flush=True)

        t0 = time.perf_counter()
        result = evaluate(args.model, models, evalset, config=EvalConfig(batch_size=20, fused_int8=args.fused))
        timings["evaluation (exact simulation)"] = time.perf_counter() - t0

    rows = {r.label: r.metrics for r in result.rows}
    trtcal_rows = {k: v for k, v in rows.items() if k.startswith("trtcal") and "noise reduction off" not in k}
    best_label = max(trtcal_rows, key=lambda k: (trtcal_rows[k].sqnr_db, trtcal_rows[k].top1_agreement))
    best = trtcal_rows[best_label]
    ort = rows["ORT quantize_static MinMax (TensorRT-valid)"]
    mo = rows.get("ModelOpt ONNX PTQ int8 entropy")
    goal_ort = best.sqnr_db >= ort.sqnr_db + 0.3 and best.top1_agreement >= ort.top1_agreement
    goal_mo = None if mo is None else (best.sqnr_db >= mo.sqnr_db and best.top1_agreement >= mo.top1_agreement)

    fallback_lines: list[str] = []
    ranking = fallback = None
    if not args.no_fallback:
        from trtcal.export.sensitivity import SensitivityConfig, fallback_auto, rank_sensitivity

        method_label = best_label[len("trtcal "):]
        scales = activation_scales(table[method_label])
        t0 = time.perf_counter()
        ranking = rank_sensitivity(args.model, scales, evalset, config=SensitivityConfig(max_inputs=16, batch_size=16))
        timings["sensitivity ranking (16 inputs)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fallback = fallback_auto(
            args.model, scales, evalset, ranking=ranking, config=SensitivityConfig(batch_size=20, target_agreement=0.99)
        )
        timings["fallback search"] = time.perf_counter() - t0
        fallback_lines = [
            f"Sensitivity ({ranking.method}, {ranking.num_inputs} evaluation inputs, method {method_label}), "
            "most harmful first: "
            + "; ".join(f"{r.node} (SQNR alone {r.sqnr_db:.1f} dB)" for r in ranking.ranking[:5]) + ".",
            "",
            f"Fallback to top-1 agreement >= 0.99 on all {len(evalset)} evaluation inputs: "
            f"{'met' if fallback.met else 'NOT met'} with {len(fallback.float_nodes)} of {fallback.quantized_layers} "
            f"layers in float ({100 * (fallback.float_mac_fraction or 0):.1f}% of the quantized MACs: "
            f"{', '.join(fallback.float_nodes) or 'none'}); agreement {fallback.before.top1_agreement:.4f} -> "
            f"{fallback.after.top1_agreement:.4f}, SQNR {fallback.before.sqnr_db:.2f} -> {fallback.after.sqnr_db:.2f} dB; "
            f"{len(fallback.steps)} evaluations.",
            "",
        ]
    if args.report:
        from trtcal.export.report import ReportData, TensorReport, write_report

        tensors = [
            TensorReport(name=n, amax_by_method={m: table[m][n] for m in table}, counts=h.counts, hist_amax=h.hist_amax)
            for n, h in histograms.items()
        ]
        write_report(
            ReportData(title="EfficientNet-Lite0: trtcal calibration methods", tensors=tensors, evaluation=result,
                       sensitivity=ranking, fallback=None if fallback is None else fallback.to_dict()),
            args.report,
        )

    command = "python " + " ".join(sys.argv)
    lines = [
        "# INT8 accuracy: trtcal vs ONNX Runtime quantize_static vs ModelOpt (EfficientNet-Lite0)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}. Total wall time "
        f"{time.perf_counter() - t_start:.0f} s.",
        "",
        f"Calibration: {len(calib)} seeded views (random-resized crops, flips) of {len(calib_photos)} real "
        f"scikit-image photos ({', '.join(calib_photos)}). Evaluation: {len(evalset)} views of "
        f"{len(eval_photos)} OTHER photos ({', '.join(eval_photos)}). Every Q/DQ model is simulated "
        "exactly (ONNX Runtime, GraphOptimizationLevel.ORT_DISABLE_ALL) and compared with the FP32 model on the "
        "same inputs.",
        "",
        result.to_markdown(),
        "",
        f"Best trtcal method by logit SQNR: **{best_label}**: {best.sqnr_db:.2f} dB, agreement {best.top1_agreement:.4f}.",
        f"- vs ORT quantize_static MinMax: {best.sqnr_db - ort.sqnr_db:+.2f} dB, agreement "
        f"{best.top1_agreement - ort.top1_agreement:+.4f} (goal: >= +0.30 dB and not lower): "
        f"{'MET' if goal_ort else 'NOT MET'}.",
    ]
    if mo is not None:
        lines.append(
            f"- vs ModelOpt ONNX PTQ entropy: {best.sqnr_db - mo.sqnr_db:+.2f} dB, agreement "
            f"{best.top1_agreement - mo.top1_agreement:+.4f} (goal: not lower in either): {'MET' if goal_mo else 'NOT MET'}."
        )
    lines += [""] + fallback_lines
    lines += ["Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + ".", ""]
    lines += [f"- {n}" for n in notes]
    lines += [
        "- trtcal rows keep the last smoothing layer (the classifier Gemm) in float, TensorRT's implicit-mode "
        "quantization-noise-reduction rule; the '(noise reduction off)' rows quantize it too, the placement ORT "
        "and ModelOpt use, to show how much of the difference that rule makes.",
        "- ORT quantize_static also quantizes Add/Clip/pooling outputs with its default op list; ModelOpt "
        "quantizes by its TensorRT partitioning rules; trtcal by the placement rules of docs/qdq.md.",
    ]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps({"evaluation": result.to_dict(), "timings": timings, "notes": notes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
