"""trtcal.calibrate() vs ONNX Runtime quantize_static on EfficientNet-Lite0 and real-photo views.

For each N: calibration time and peak RSS of
  * trtcal.calibrate (entropy2 AND percentile from one collection; includes model load, batch
    open with fingerprint check, both passes, scale search and writing the artifacts),
  * onnxruntime.quantization.quantize_static with CalibrationMethod.Entropy, then Percentile
    (QDQ, per-channel symmetric int8, ActivationSymmetric; its data reader yields batches of
    ORT_BATCH rows because a batch size that does not divide N crashes its calibrators),
and, as the anchor for "within 2.5x of inference", one plain FP32 inference pass over the same
data (micro-batch 32) with ONNX Runtime's default graph optimisations (ORT_ENABLE_ALL) and with
ORT_DISABLE_ALL (what calibration runs, so every tensor keeps its graph value).

Every run is a fresh child process reading the same memory-mapped .arrow batch; peak RSS is the
child's ru_maxrss from wait4. The parent watches each child's RSS and kills it above
--limit-gib (ONNX Runtime's Entropy/Percentile keep every activation of every batch: ~53 MB per
image); such runs are reported as killed, with the RSS and time at the kill.

Run:  .venv/bin/python bench/bench_calibrate.py [--sizes 100 500 1000] [--limit-gib 12]
Writes the table to bench/RESULTS-calibrate.md (--results) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.data import efficientnet_model_path  # noqa: E402

# $TRTCAL_TEST_MODEL, else EfficientNet-Lite0 from trtcal.demo.model_zoo (fetched and converted once)
MODEL = efficientnet_model_path()
MICRO_BATCH = 32
ORT_BATCH = 20  # divides 100, 500 and 1000
KINDS = (
    "plain-enable-all", "plain-disable-all", "trtcal", "trtcal-processes", "ort-entropy", "ort-percentile", "breakdown",
    "plain-torch-cuda", "trtcal-cuda",  # need PyTorch with CUDA and a GPU
)


# ---------------------------------------------------------------------------------------------
# Children (one measured run each)


def _child_plain(data: str, level: str) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    from trtcal.batch import open_batch

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    session = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
    batch = open_batch(data, verify=False)
    t0 = time.perf_counter()
    for feed in batch.iter_micro_batches(MICRO_BATCH):
        session.run(["logits"], {"input": np.ascontiguousarray(feed["input"])})
    return {"seconds": time.perf_counter() - t0}


def _child_plain_torch_cuda(data: str) -> dict[str, Any]:
    """The GPU anchor: one FP32 forward over every row with the runner calibrate(device="cuda") uses
    here (PyTorch), no statistics; timed from the first micro-batch (cold kernels included)."""
    import torch

    from trtcal.batch import open_batch
    from trtcal.runners.torch_runner import TorchRunner, _inference, fp32_exact

    runner = TorchRunner(MODEL, device="cuda")
    batch = open_batch(data, verify=False)
    with fp32_exact(), _inference():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for feeds, _rows in runner._micro_batches(batch, 0, batch.num_rows, MICRO_BATCH):
            for _name, _value in runner._forward(feeds):
                pass
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "device": torch.cuda.get_device_name(0)}


def _child_trtcal(data: str, out: str, processes: int = 1, device: str = "cpu") -> dict[str, Any]:
    import trtcal

    t0 = time.perf_counter()
    result = trtcal.calibrate(
        MODEL, data, algorithms=("entropy2", "percentile"), output_dir=out, micro_batch=MICRO_BATCH, processes=processes,
        device=device,
    )
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds, "timings": result.timings, "tensors": len(result.tensor_names),
        "processes": result.manifest["runner"]["processes"],
        "runner": result.manifest["runner"]["kind"],
        "artifacts_sha256": {k: v["sha256"] for k, v in result.manifest["artifacts"].items()},
    }


def _child_ort(data: str, out: str, method: str) -> dict[str, Any]:
    import numpy as np
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from trtcal.batch import open_batch

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = open_batch(data, verify=False).iter_micro_batches(ORT_BATCH)

        def get_next(self) -> dict[str, Any] | None:
            chunk = next(self.batches, None)
            return None if chunk is None else {"input": np.array(chunk["input"])}

    t0 = time.perf_counter()
    quantize_static(
        str(MODEL), os.path.join(out, "model.qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return {"seconds": time.perf_counter() - t0}


def _child_breakdown(data: str) -> dict[str, Any]:
    """Per-image cost (best of 3 passes over the data, ms) of each piece of a calibration pass."""
    import onnxruntime as ort

    from trtcal.batch import open_batch
    from trtcal.core.histogram import fill_counts, reduce_stats
    from trtcal.runners.onnxruntime import OnnxRuntimeRunner

    batch = open_batch(data, verify=False)
    n = batch.num_rows
    runner = OnnxRuntimeRunner(MODEL)
    amax = {k: v.amax for k, v in runner.collect_stats(batch, micro_batch=MICRO_BATCH).items()}

    def best(step: Any) -> float:
        times = []
        for _ in range(3):
            total = 0.0
            for feed in batch.iter_micro_batches(MICRO_BATCH):
                total += step(feed)
            times.append(total)
        return 1000 * min(times) / n

    def timed(fn: Any) -> Any:
        def step(feed: Any) -> float:
            t0 = time.perf_counter()
            fn(feed)
            return time.perf_counter() - t0
        return step

    sessions = {}
    for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        sessions[level] = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])

    def stats_only(feed: Any) -> float:
        values = runner._run_reusing(feed)  # outside the clock
        t0 = time.perf_counter()
        for name, value in values.items():
            reduce_stats(value, tensor=name)
        return time.perf_counter() - t0

    def fill_only(feed: Any) -> float:
        values = runner._run_reusing(feed)
        t0 = time.perf_counter()
        for name, value in values.items():
            fill_counts(value, 2048, amax[name], tensor=name)
        return time.perf_counter() - t0

    def whole_pass(fn: Any) -> float:
        # One runner pass over every row (model run + statistics), as calibrate() runs it.
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * min(times) / n

    pass1 = whole_pass(lambda: runner.collect_stats(batch, micro_batch=MICRO_BATCH))
    pass2 = whole_pass(lambda: runner.collect_counts(batch, amax, num_bins=2048, micro_batch=MICRO_BATCH))
    values = runner.run(next(batch.iter_micro_batches(1)))
    return {
        "seconds": 0.0,
        "activation_values_per_image": int(sum(v.size for v in values.values())),
        "ms_per_image": {
            "plain_run_enable_all": best(timed(lambda f: sessions["ORT_ENABLE_ALL"].run(["logits"], dict(f)))),
            "plain_run_disable_all": best(timed(lambda f: sessions["ORT_DISABLE_ALL"].run(["logits"], dict(f)))),
            "run_all_tensors_as_outputs": best(timed(runner._run_reusing)),
            "reduce_stats_all_tensors": best(stats_only),
            "fill_counts_all_tensors": best(fill_only),
            "pass1_collect_stats": pass1,
            "pass2_collect_counts": pass2,
        },
    }


def child_main(kind: str, data: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    if kind == "plain-enable-all":
        result = _child_plain(data, "ORT_ENABLE_ALL")
    elif kind == "plain-disable-all":
        result = _child_plain(data, "ORT_DISABLE_ALL")
    elif kind == "trtcal":
        result = _child_trtcal(data, os.path.join(out, "artifacts"))
    elif kind == "trtcal-processes":  # processes=0: one per 2 cores, at most 8
        result = _child_trtcal(data, os.path.join(out, "artifacts-processes"), processes=0)
    elif kind == "plain-torch-cuda":
        result = _child_plain_torch_cuda(data)
    elif kind == "trtcal-cuda":
        result = _child_trtcal(data, os.path.join(out, "artifacts-cuda"), device="cuda")
    elif kind == "ort-entropy":
        result = _child_ort(data, out, "Entropy")
    elif kind == "ort-percentile":
        result = _child_ort(data, out, "Percentile")
    elif kind == "breakdown":
        result = _child_breakdown(data)
    else:
        raise SystemExit(f"unknown kind {kind}")
    result["vmhwm_mib"] = _status_kib("self", "VmHWM") / 1024
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent


def _status_kib(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(kind: str, data: Path, work: Path, limit_bytes: int) -> dict[str, Any]:
    """Run one child; peak RSS from wait4's rusage (also for a killed child)."""
    out = work / f"{kind}-{data.stem}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--data", str(data), "--out", str(out)]
    load_before = os.getloadavg()[0]
    with open(out / "stdout.txt", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, cwd=str(REPO))
        killed_at: dict[str, Any] | None = None
        peak_polled = 0
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = _status_kib(proc.pid, "VmRSS") * 1024
            peak_polled = max(peak_polled, rss)
            if rss > limit_bytes and killed_at is None:
                killed_at = {"rss_gib": rss / 2**30, "seconds": time.perf_counter() - t0}
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {
        "kind": kind, "wall": wall, "ru_maxrss_mib": rusage.ru_maxrss / 1024, "polled_rss_mib": peak_polled / 2**20,
        "load_before": load_before, "load_after": os.getloadavg()[0],
    }
    if killed_at is not None:
        row.update(status="killed", **killed_at)
        return row
    text = (out / "stdout.txt").read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        errors = (out / "stderr.txt").read_text().strip().splitlines()
        row.update(status=f"failed rc={proc.returncode}", error=errors[-1] if errors else "")
        return row
    row.update(status="ok", **json.loads(line[len("RESULT "):]))
    return row


def ensure_data(work: Path, n: int) -> Path:
    """Write the first n views once, in a separate process (the parent stays small: a child's
    ru_maxrss starts from its parent's RSS at fork on Linux)."""
    path = work / f"views-{n}.arrow"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from tests.fixtures.data import write_photo_batch; from trtcal.batch import open_batch;"
        "import os, time; p, n = sys.argv[2], int(sys.argv[3]);"
        "ok = os.path.exists(p) and open_batch(p).num_rows == n;"
        "t = time.perf_counter(); ok or write_photo_batch(p, n);"
        "print('reused' if ok else f'wrote {n} views in {time.perf_counter() - t:.1f} s', p)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(REPO), str(path), str(n)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"writing the data failed: {done.stderr}")
    print(done.stdout.strip(), file=sys.stderr, flush=True)
    return path


def fmt_run(row: dict[str, Any]) -> tuple[str, str]:
    if row.get("status") == "killed":
        return f"killed at {row['seconds']:.0f} s", f"> {row['rss_gib']:.1f} GiB (killed)"
    if row.get("status") != "ok":
        return row.get("status", "?"), "-"
    return f"{row['seconds']:.1f} s", f"{row['vmhwm_mib'] / 1024:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=KINDS)
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--kinds", nargs="+", default=[k for k in KINDS if k != "breakdown"], choices=KINDS)
    parser.add_argument("--limit-gib", type=float, default=12.0, help="kill a child whose RSS exceeds this")
    parser.add_argument("--work-dir", default=None, help="where data and outputs go (default: a temp dir)")
    parser.add_argument("--results", default=str(REPO / "bench" / "RESULTS-calibrate.md"))
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.data, args.out)
        return

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="trtcal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        data = ensure_data(work, n)
        for kind in args.kinds:
            row = measure(kind, data, work, int(args.limit_gib * 2**30))
            row["n"] = n
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(rows, args, work)


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, work: Path) -> None:
    by = {(r["n"], r["kind"]): r for r in rows}
    lines = [
        "# trtcal.calibrate vs ONNX Runtime quantize_static (EfficientNet-Lite0, real-photo views)",
        "",
        f"Command: `.venv/bin/python bench/bench_calibrate.py --sizes {' '.join(map(str, args.sizes))} "
        f"--limit-gib {args.limit_gib:g}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
        "Each run is a fresh child process; peak RSS is the child's own high-water mark (VmHWM of "
        "/proc/self/status at exit; wait4's ru_maxrss is in the raw rows and agrees when the parent is "
        "small, since on Linux it starts from the parent's RSS at fork). trtcal computes entropy2 and "
        "percentile from one collection; each ONNX Runtime run computes one method.",
        "",
        "| N | plain FP32 pass (ENABLE_ALL) | plain FP32 pass (DISABLE_ALL) | trtcal total | trtcal peak RSS "
        "| trtcal / plain (ENABLE_ALL) | trtcal / plain (DISABLE_ALL) | ORT Entropy | ORT Entropy peak RSS "
        "| ORT Percentile | ORT Percentile peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in args.sizes:
        cells = [str(n)]
        plain_all = by.get((n, "plain-enable-all"), {})
        plain_dis = by.get((n, "plain-disable-all"), {})
        trt = by.get((n, "trtcal"), {})
        cells.append(fmt_run(plain_all)[0] if plain_all else "-")
        cells.append(fmt_run(plain_dis)[0] if plain_dis else "-")
        cells.extend(fmt_run(trt) if trt else ("-", "-"))
        for plain in (plain_all, plain_dis):
            ok = trt.get("status") == "ok" and plain.get("status") == "ok"
            cells.append(f"{trt['seconds'] / plain['seconds']:.1f}x" if ok else "-")
        for kind in ("ort-entropy", "ort-percentile"):
            cells.extend(fmt_run(by[(n, kind)]) if (n, kind) in by else ("-", "-"))
        lines.append("| " + " | ".join(cells) + " |")
    for n in args.sizes:
        cuda, plain_cuda = by.get((n, "trtcal-cuda"), {}), by.get((n, "plain-torch-cuda"), {})
        if cuda.get("status") == "ok" and plain_cuda.get("status") == "ok":
            lines.append(
                f"\nGPU ({plain_cuda['device']}, runner {cuda['runner']}) at N={n}: plain FP32 forward "
                f"{plain_cuda['seconds']:.2f} s; trtcal.calibrate(device='cuda') {cuda['seconds']:.2f} s = "
                f"{cuda['seconds'] / plain_cuda['seconds']:.2f}x (stages: "
                + ", ".join(f"{k} {v:.2f}" for k, v in cuda["timings"].items()) + ")"
            )
    for n in args.sizes:
        par, trt = by.get((n, "trtcal-processes"), {}), by.get((n, "trtcal"), {})
        plain_all = by.get((n, "plain-enable-all"), {})
        if par.get("status") == "ok":
            same = trt.get("artifacts_sha256") == par.get("artifacts_sha256") if trt.get("status") == "ok" else None
            lines.append(
                f"\ntrtcal with processes=0 ({par['processes']} processes) at N={n}: {par['seconds']:.1f} s, peak RSS "
                f"{par['vmhwm_mib'] / 1024:.2f} GiB (parent process only)"
                + (f", {trt['seconds'] / par['seconds']:.2f}x faster than one process" if trt.get("status") == "ok" else "")
                + (f", {par['seconds'] / plain_all['seconds']:.1f}x the plain ENABLE_ALL pass" if plain_all.get("status") == "ok" else "")
                + ("" if same is None else f"; artifacts identical to one process: {same}")
            )
    lines += ["", "trtcal stage timings (seconds):", ""]
    for n in args.sizes:
        for kind in ("trtcal", "trtcal-processes"):
            trt = by.get((n, kind), {})
            if trt.get("status") == "ok":
                stages = ", ".join(f"{k} {v:.1f}" for k, v in trt["timings"].items())
                lines.append(f"- N={n} {kind}: {stages}")
    for r in rows:
        if r["kind"] == "breakdown" and r.get("status") == "ok":
            ms = r["ms_per_image"]
            lines += [
                "",
                f"Where the time goes (N={r['n']}, micro-batch {MICRO_BATCH}, ms per image, best of 3; "
                f"{r['activation_values_per_image']:,} activation values per image):",
                "",
                *(f"- {k}: {v:.1f}" for k, v in ms.items()),
                f"- floor of trtcal (2 x run_all_tensors_as_outputs + reduce_stats + fill_counts): "
                f"{2 * ms['run_all_tensors_as_outputs'] + ms['reduce_stats_all_tensors'] + ms['fill_counts_all_tensors']:.1f}"
                f" = {(2 * ms['run_all_tensors_as_outputs'] + ms['reduce_stats_all_tensors'] + ms['fill_counts_all_tensors']) / ms['plain_run_enable_all']:.1f}x plain_run_enable_all",
            ]
            if "pass1_collect_stats" in ms:
                both = ms["pass1_collect_stats"] + ms["pass2_collect_counts"]
                lines.append(
                    f"- both runner passes (pass1_collect_stats + pass2_collect_counts): {both:.1f}"
                    f" = {both / ms['plain_run_enable_all']:.1f}x plain_run_enable_all"
                    f", {both / ms['plain_run_disable_all']:.1f}x plain_run_disable_all"
                )
    lines += ["", "Load average (1 min) before/after each run:", ""]
    for r in rows:
        lines.append(f"- N={r['n']} {r['kind']}: {r['load_before']:.2f} / {r['load_after']:.2f}")
    lines += ["", "Raw rows:", "", "```", *(json.dumps(r, sort_keys=True) for r in rows), "```", ""]
    Path(args.results).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
