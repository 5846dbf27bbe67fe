#!/usr/bin/env python3
"""Issue 18 on real TensorRT: engine accuracy per method, and TensorRT's own calibrator as speed anchor.

Three steps (docs/tensorrt.md has the device commands):

  prepare OUT             here (CPU, ONNX Runtime): calibration views (8 photos x 16) and disjoint held-out
                          views (the other 8 photos x 8), trtcal's cache of every method and of auto, the FP32
                          reference outputs, and each method's exact Q/DQ simulation on the held-out views
  engines DIR             GPU machine with TensorRT: one INT8 engine per cache in DIR (trtcal's replay path,
                          a shared timing cache), run on the held-out views, compared with FP32 and with the
                          simulation; prints the table and writes DIR/engines.json
  speed --sizes N...      GPU machine with TensorRT: time to a cache, TensorRT's IInt8EntropyCalibrator2
                          (batches of 128, its build included) vs trtcal on the GPU (statistics + every
                          method), on the same N deterministic photo views in memory; both again on the
                          reversed order (bytes of TensorRT's cache vs trtcal's)

The views are uint8 crops (tests/fixtures/data.py augmentation) turned into float32 (x - 127) / 128
on both machines, so every consumer reads the same float32 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("entropy2", "minmax", "percentile", "mse", "legacy")


def to_input(views_u8: np.ndarray) -> np.ndarray:
    """uint8 [N, 3, 224, 224] -> the model input, exactly as tests/fixtures/data.preprocess computes it."""
    return (views_u8.astype(np.float32) - np.float32(127.0)) / np.float32(128.0)


def crop_u8(image: np.ndarray, index: int, seed: int) -> np.ndarray:
    """View `index` of a photo: a seeded random-resized crop (view 0: the centre crop), uint8 CHW.

    tests/fixtures/data.preprocess does the resize and crop; its (x - 127) / 128 is exact in float32,
    so the uint8 pixels come back exactly.
    """
    from PIL import Image

    from tests.fixtures.data import augmented_view, preprocess

    img = Image.fromarray(image) if index == 0 else augmented_view(image, np.random.default_rng([seed, index]))
    return np.rint(preprocess(img) * np.float32(128.0) + np.float32(127.0)).astype(np.uint8)


def photo_views_u8(photos: dict[str, np.ndarray], names: list[str], per_photo: int, seed: int) -> np.ndarray:
    return np.stack([crop_u8(photos[name], k, seed) for k in range(per_photo) for name in names])


def ort_outputs(model: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact Q/DQ simulation
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 16]})[0] for i in range(0, len(x), 16)])


def quality(reference: np.ndarray, output: np.ndarray) -> dict[str, float]:
    from trtcal.core.output_metrics import sqnr_db

    ref, out = reference.astype(np.float64), output.astype(np.float64)
    return {"sqnr_db": sqnr_db(ref, out), "top1": float(np.mean(ref.argmax(1) == out.argmax(1)))}


def cmd_prepare(args: argparse.Namespace) -> None:
    import onnx

    from tests.fixtures.data import efficientnet_model_path, load_photos
    from trtcal.core import write_trt_cache
    from trtcal.export.qdq import export_qdq
    from trtcal.orchestrator.calibrate import calibrate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    names = sorted(photos)
    cal_u8 = photo_views_u8(photos, names[0::2], 16, seed=0)
    held_u8 = photo_views_u8(photos, names[1::2], 8, seed=1)
    np.save(out / "heldout_u8.npy", held_u8)
    np.savez_compressed(out / "photos.npz", **photos)
    model_path = efficientnet_model_path()
    model = model_path.read_bytes()
    t0 = time.perf_counter()
    result = calibrate(model, {"input": to_input(cal_u8)}, algorithms=("auto", *METHODS), verdict=False)
    print(f"calibrated {len(cal_u8)} views, every method and auto, in {time.perf_counter() - t0:.1f} s")
    held = to_input(held_u8)
    reference = ort_outputs(model, held)
    np.save(out / "fp32_heldout.npy", reference)
    simulated = {}
    for method in ("auto", *METHODS):
        (out / f"{method}.cache").write_bytes(write_trt_cache(result.amax[method], trt_version="8.5.3", algorithm="entropy2"))
        qdq = export_qdq(onnx.load_from_string(model), result.amax[method])
        simulated[method] = quality(reference, ort_outputs(qdq.SerializeToString(), held))
        print(f"{method:>10}: simulated Q/DQ on {len(held)} held-out views {simulated[method]}")
    (out / "simulated.json").write_text(json.dumps(
        {"model": model_path.name, "calibration": f"{len(cal_u8)} views of {names[0::2]}",
         "heldout": f"{len(held_u8)} views of {names[1::2]}", "simulated": simulated}, indent=1))


def _trt_outputs(trt, engine_bytes: bytes, x: np.ndarray, batch: int) -> np.ndarray:
    """Run a TensorRT 8.5/8.6 engine (binding API) over x with torch's CUDA buffers."""
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    context = engine.create_execution_context()
    inp = [i for i in range(engine.num_bindings) if engine.binding_is_input(i)][0]
    outp = [i for i in range(engine.num_bindings) if not engine.binding_is_input(i)][0]
    context.set_binding_shape(inp, (batch, *x.shape[1:]))
    result = torch.empty(tuple(context.get_binding_shape(outp)), dtype=torch.float32, device="cuda")
    outputs = []
    for i in range(0, len(x), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(x[i : i + batch])).cuda()
        bindings = [0] * engine.num_bindings
        bindings[inp], bindings[outp] = int(chunk.data_ptr()), int(result.data_ptr())
        if not context.execute_v2(bindings):
            raise RuntimeError("TensorRT execute_v2 failed")
        torch.cuda.synchronize()
        outputs.append(result.cpu().numpy().copy())
    return np.concatenate(outputs)


def cmd_engines(args: argparse.Namespace) -> None:
    import tensorrt as trt

    from trtcal.runners import tensorrt as adapter

    folder = Path(args.dir)
    held = to_input(np.load(folder / "heldout_u8.npy"))
    reference = np.load(folder / "fp32_heldout.npy")
    simulated = json.loads((folder / "simulated.json").read_text())["simulated"]
    rows = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        engine = adapter.build_engine(
            args.model, cache=(folder / f"{method}.cache").read_bytes(), input_shapes={"input": (args.batch, 3, 224, 224)},
            timing_cache=folder / "timing.cache",
        )
        built = time.perf_counter() - t0
        measured = quality(reference, _trt_outputs(trt, engine, held, args.batch))
        row = {"method": method, "engine": measured, "simulated": simulated[method], "build_s": round(built, 1),
               "gap_db": round(simulated[method]["sqnr_db"] - measured["sqnr_db"], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = _gpu_name()
    print(f"\nEfficientNet-Lite0, {len(held)} held-out views, TensorRT {trt.__version__}, {device}")
    print("| method (trtcal cache) | engine SQNR (dB) | engine top-1 vs FP32 | simulated Q/DQ SQNR (dB) | simulated top-1 | simulation − engine (dB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        e, s = r["engine"], r["simulated"]
        print(f"| {r['method']} | {e['sqnr_db']:.2f} | {e['top1']:.3f} | {s['sqnr_db']:.2f} | {s['top1']:.3f} | {r['gap_db']:+.2f} |")
    Path(args.json).write_text(json.dumps({"tensorrt": trt.__version__, "device": device, "rows": rows}, indent=1))


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def _views_for_speed(photos: dict[str, np.ndarray], n: int, workers: int) -> np.ndarray:
    """n views (view i: photo i mod 16, crop i // 16, seed 0) made in parallel; the same array for any worker count."""
    from concurrent.futures import ProcessPoolExecutor

    names = sorted(photos)
    jobs = [(names[i % len(names)], i // len(names)) for i in range(n)]
    out = np.empty((n, 3, 224, 224), np.uint8)
    step = 256
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(photos,)) as pool:
        for start, chunk in zip(range(0, n, step), pool.map(_crop_chunk, [jobs[i : i + step] for i in range(0, n, step)])):
            out[start : start + len(chunk)] = chunk
    return out


_PHOTOS: dict[str, np.ndarray] = {}


def _init_worker(photos: dict[str, np.ndarray]) -> None:
    _PHOTOS.update(photos)


def _crop_chunk(jobs: list[tuple[str, int]]) -> np.ndarray:
    return np.stack([crop_u8(_PHOTOS[name], k, seed=0) for name, k in jobs])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _differing(a: dict[str, float], b: dict[str, float]) -> tuple[int, int, float]:
    shared = sorted(set(a) & set(b))
    diff = [abs(a[k] - b[k]) / max(abs(a[k]), 1e-30) for k in shared if a[k] != b[k]]
    return len(diff), len(shared), max(diff, default=0.0)


def cmd_speed(args: argparse.Namespace) -> None:
    from trtcal.core import read_trt_cache
    from trtcal.orchestrator.calibrate import calibrate
    from trtcal.runners import tensorrt as adapter

    photos = dict(np.load(args.photos))
    model = Path(args.model).read_bytes()
    log = Path(args.json)
    rows = json.loads(log.read_text()) if log.exists() else []
    for n in args.sizes:
        t0 = time.perf_counter()
        x = to_input(_views_for_speed(photos, n, os.cpu_count() or 4))
        print(f"N={n}: views made in {time.perf_counter() - t0:.1f} s ({x.nbytes / 2**30:.1f} GiB float32)", flush=True)
        for order in ("forward", "reversed") if n <= args.reverse_up_to else ("forward",):
            data = x if order == "forward" else np.ascontiguousarray(x[::-1])
            t0 = time.perf_counter()
            trt_cache = adapter.calibrate_with_tensorrt(
                args.model, {"input": data}, algorithm="entropy2", micro_batch=128, partial_batch="drop"
            )
            trt_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ours = calibrate(model, {"input": data}, algorithms=METHODS, device="cuda", verdict=False, micro_batch=128)
            ours_s = time.perf_counter() - t0
            row = {
                "n": n, "order": order, "tensorrt_entropy2_s": round(trt_s, 2), "trtcal_every_method_s": round(ours_s, 2),
                "ratio": round(trt_s / ours_s, 2), "tensorrt_cache": _sha(trt_cache),
                "trtcal_entropy2": _sha(ours.files["calibration.entropy2.cache"]),
                "trtcal_timings": {k: round(v, 2) for k, v in ours.timings.items()},
                "tensorrt_amax": read_trt_cache(trt_cache).amax, "trtcal_amax": ours.amax["entropy2"],
            }
            rows.append(row)
            log.write_text(json.dumps(rows))
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_amax")}), flush=True)
        if n <= args.reverse_up_to:
            fwd, rev = rows[-2], rows[-1]
            changed, shared, worst = _differing(fwd["tensorrt_amax"], rev["tensorrt_amax"])
            mine, _, _ = _differing(fwd["trtcal_amax"], rev["trtcal_amax"])
            print(f"N={n} forward vs reversed: TensorRT entropy2 {changed} of {shared} scales differ (max {worst:.1%}); "
                  f"trtcal {mine} differ, cache bytes {'identical' if fwd['trtcal_entropy2'] == rev['trtcal_entropy2'] else 'DIFFERENT'}")
        del x
    print(f"device: {_gpu_name()}, {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out")
    p = sub.add_parser("engines")
    p.add_argument("dir")
    p.add_argument("--model", required=True)
    p.add_argument("--methods", default="auto," + ",".join(METHODS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--json", default="engines.json")
    p = sub.add_parser("speed")
    p.add_argument("--model", required=True)
    p.add_argument("--photos", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    p.add_argument("--reverse-up-to", type=int, default=5000)
    p.add_argument("--json", default="speed.json")
    args = parser.parse_args()
    {"prepare": cmd_prepare, "engines": cmd_engines, "speed": cmd_speed}[args.command](args)


if __name__ == "__main__":
    main()
