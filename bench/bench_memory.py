"""Peak memory of a whole `trtcal calibrate` process tree (CLI driver, local Ray, calibration actor).

Runs `python -m trtcal calibrate` as a child process, exactly as a user does (an embedded local Ray
cluster), and samples every process descended from it (raylet, GCS, Ray workers, the actor) every
50 ms from /proc: the peak of the summed RSS and of the summed PSS (RSS shares pages, e.g. shared
libraries and Ray's object store, between processes and so counts them several times; PSS splits
each shared page among the processes that map it, so the PSS sum is the memory the tree takes).
Each row also splits the peak by process group (driver, actor, idle workers, each Ray daemon) at
the moment of the PSS peak, gives each group's own peak, and the peak PSS of each stage (the CLI's
"trtcal: <stage> <s> s" lines on stderr, a sample belonging to the first stage that ended after it).

Cases:
  EfficientNet-Lite0 on N = 100 and N = 1000 real photo views (skimage photos plus seeded
  random-resized-crop/flip views, tests/fixtures/data.py) given as a .npy, an .npz and an image
  folder (JPEGs, preprocessed by Ray workers); the growth ratio peak(1000) / peak(100) per format.
  ocr_rec: PaddleOCR's PP-OCRv4 recogniser (rapidocr-onnxruntime 1.4.4 from PyPI, bench_zoo.py;
  404 tensors) on 128 rendered text lines (zoo_data.py), default options.

Run (one case at a time; nice it on a shared machine):
    nice -n 10 .venv/bin/python bench/bench_memory.py [--cases npy,npz,folder,ocr_rec] [--n 100,1000]
        [--write bench/RESULTS-memory.json] [-- extra trtcal calibrate options]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PAGE = os.sysconf("SC_PAGE_SIZE")
GIB = 1 << 30


# ---------------------------------------------------------------------------------------------
# The process tree and its memory, from /proc


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    children = _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def rss_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process; (0, 0) once it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:80]
    except OSError:
        return "?"


# Process groups of the tree, by command line (Ray workers rename themselves, e.g. ray::CalibrationActor).
_GROUPS = (
    ("actor", "ray::CalibrationActor"), ("idle workers", "ray::IDLE"), ("dashboard agent", "ray::DashboardAgent"),
    ("runtime env agent", "ray::RuntimeEnvAgent"), ("runtime env agent", "runtime_env_agent"),
    ("dashboard head", "dashboard/dashboard.py"), ("log monitor", "log_monitor.py"),
    ("autoscaler monitor", "autoscaler/_private/monitor.py"), ("raylet", "raylet/raylet"),
    ("gcs", "gcs/gcs_server"), ("workers", "ray::"), ("workers", "default_worker.py"),
)


def _group(pid: int, root: int) -> str:
    if pid == root:
        return "driver (CLI)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "other"
    head = " ".join(argv[:3])  # the program and its script: the raylet's arguments name the agents' commands
    return next((name for name, marker in _GROUPS if marker in head), "other")


_STAGE_LINE = re.compile(r"^trtcal: (.+?) ([0-9.]+) s( \(.*\))?$")


def _read_stages(stream: Any, stages: list[tuple[float, str, float]], text: list[str]) -> None:
    """The CLI's "trtcal: <stage> <s> s" lines (one per finished stage), with the time they came."""
    for line in stream:
        found = _STAGE_LINE.match(line.strip())
        if found:
            stages.append((time.perf_counter(), found.group(1), float(found.group(2))))
        text.append(line)


def _stage_peaks(timeline: list[tuple[float, int, int]], stages: list[tuple[float, str, float]]) -> list[tuple[str, int, int]]:
    """(stage, peak tree PSS, actor PSS at that peak) per stage: a sample belongs to the first stage
    that ended after it was taken (the CLI prints a stage's line when it ends)."""
    peaks: dict[str, tuple[int, int]] = {}
    order: list[str] = []
    k = 0
    for t, pss, actor in timeline:
        while k < len(stages) and stages[k][0] < t:
            k += 1
        stage = stages[k][1] if k < len(stages) else "(after the last stage)"
        if stage not in peaks:
            order.append(stage)
            peaks[stage] = (0, 0)
        if pss > peaks[stage][0]:
            peaks[stage] = (pss, actor)
    return [(s, *peaks[s]) for s in order]


def run_and_sample(command: list[str], env: dict[str, str], interval: float = 0.05) -> dict[str, Any]:
    """Run `command`; the peak summed RSS and PSS of its process tree, the biggest processes, the
    split by process group at the PSS peak, and the peak PSS of each stage (named by the stage line
    that ended it: the stage still running when the sample was taken)."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stages: list[tuple[float, str, float]] = []
    stderr: list[str] = []
    stdout_parts: list[str] = []
    reader = threading.Thread(target=_read_stages, args=(proc.stderr, stages, stderr), daemon=True)
    reader.start()
    out_reader = threading.Thread(target=lambda: stdout_parts.append(proc.stdout.read() if proc.stdout else ""), daemon=True)
    out_reader.start()
    peak_rss = peak_pss = 0
    at_peak: dict[str, list[int]] = {}
    group_peak: dict[str, list[int]] = {}
    timeline: list[tuple[float, int, int]] = []  # (time, tree PSS, actor PSS)
    biggest: dict[int, int] = {}
    names: dict[int, str] = {}
    groups: dict[int, str] = {}
    while proc.poll() is None:
        total_rss = total_pss = 0
        by_group: dict[str, list[int]] = {}
        for pid in process_tree(proc.pid):
            rss, pss = rss_pss(pid)
            total_rss += rss
            total_pss += pss
            group = groups.get(pid) or _group(pid, proc.pid)
            if group not in ("workers", "idle workers", "other"):
                groups[pid] = group  # an idle worker becomes the actor: re-read until it has a final name
            row = by_group.setdefault(group, [0, 0])
            row[0] += pss
            row[1] += rss
            if pss > biggest.get(pid, 0):
                biggest[pid] = pss
                names[pid] = _cmdline(pid)
        for group, (pss, rss) in by_group.items():
            best = group_peak.setdefault(group, [0, 0])
            best[0], best[1] = max(best[0], pss), max(best[1], rss)
        timeline.append((time.perf_counter(), total_pss, by_group.get("actor", [0, 0])[0]))
        if total_pss > peak_pss:
            at_peak = by_group
        peak_rss, peak_pss = max(peak_rss, total_rss), max(peak_pss, total_pss)
        time.sleep(interval)
    proc.wait()
    reader.join(timeout=5)
    out_reader.join(timeout=5)
    stdout = "".join(stdout_parts)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{''.join(stderr)[-3000:]}")
    top = sorted(biggest.items(), key=lambda kv: -kv[1])[:3]

    def gib(v: int) -> float:
        return round(v / GIB, 3)

    return {
        "peak_rss_gib": gib(peak_rss), "peak_pss_gib": gib(peak_pss),
        "seconds": round(time.perf_counter() - t0, 1),
        "top_pss_gib": [[names[p], gib(v)] for p, v in top],
        "at_peak_pss_rss_gib": {g: [gib(p), gib(r)] for g, (p, r) in sorted(at_peak.items(), key=lambda kv: -kv[1][0])},
        "group_peak_pss_rss_gib": {g: [gib(p), gib(r)] for g, (p, r) in sorted(group_peak.items(), key=lambda kv: -kv[1][0])},
        "stage_peak_pss_gib": [[s, gib(p), gib(a)] for s, p, a in _stage_peaks(timeline, stages)],
        "stage_seconds": {name: seconds for _, name, seconds in stages},
        "result": json.loads(stdout) if stdout.strip().startswith("{") else stdout[-500:],
    }


# ---------------------------------------------------------------------------------------------
# Data


def _views(n: int) -> np.ndarray:
    from tests.fixtures.data import photo_views

    return photo_views(n)[0]


def _save(path: Path, write: Any) -> Path:
    """Write through a temp name then rename: a concurrent run never reads half a file."""
    if not path.exists():
        tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
        write(tmp)
        os.replace(tmp, path)
    return path


def make_npy(root: Path, n: int) -> Path:
    return _save(root / f"photos-{n}.npy", lambda tmp: np.save(tmp, _views(n)))


def make_npz(root: Path, n: int, compressed: bool = False) -> Path:
    from tests.fixtures.data import INPUT_NAME

    writer = np.savez_compressed if compressed else np.savez
    return _save(root / f"photos-{n}{'-z' if compressed else ''}.npz", lambda tmp: writer(tmp, **{INPUT_NAME: _views(n)}))


def make_folder(root: Path, n: int) -> Path:
    """n JPEGs: the photos, then seeded augmented views of them (shorter side 256)."""
    from PIL import Image

    from tests.fixtures.data import augmented_view, load_photos

    folder = root / f"images-{n}"
    stamp = folder / ".complete"
    if stamp.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    names = list(photos)
    for i in range(n):
        name, k = names[i % len(names)], i // len(names)
        img = Image.fromarray(photos[name]) if k == 0 else augmented_view(photos[name], np.random.default_rng([0, i]))
        scale = 256 / min(img.size)
        img = img.resize((max(256, round(img.size[0] * scale)), max(256, round(img.size[1] * scale))), Image.BICUBIC)
        img.convert("RGB").save(folder / f"{name}_{k:05d}.jpg", "JPEG", quality=90)
    stamp.write_text("")
    return folder


def make_ocr(root: Path, n: int) -> tuple[Path, Path]:
    import bench_zoo
    import zoo_data

    model, _ = bench_zoo.fetch(bench_zoo.MODELS["ocr_rec"])
    return model, _save(root / f"ocr-lines-{n}.npy", lambda tmp: np.save(tmp, zoo_data.line_batch("calib", n, 48, 320, seed=1)))


# ---------------------------------------------------------------------------------------------


def calibrate_command(model: Path, data: Path, folder: bool, n: int, store: Path, output: Path, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "trtcal", "calibrate", str(model), "--data", str(data), "--store", str(store),
               "--output", str(output), "--json", *extra]
    if folder:
        command += ["--preprocess", "efficientnet-lite", "--num-samples", str(n)]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="npy,npz,folder,ocr_rec")
    parser.add_argument("--n", default="100,1000")
    parser.add_argument("--ocr-n", type=int, default=128)
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "trtcal-bench-memory"))
    parser.add_argument("--write", default=None, help="append the results as JSON lines to this file")
    parser.add_argument("extra", nargs="*", help="options passed to trtcal calibrate (after --)")
    args = parser.parse_args()
    from tests.fixtures.data import efficientnet_model_path

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    sizes = [int(s) for s in args.n.split(",")]
    rows: list[dict[str, Any]] = []
    for case in cases:
        for n in ([args.ocr_n] if case == "ocr_rec" else sizes):
            if case == "ocr_rec":
                model, data = make_ocr(data_dir, n)
            else:
                model = efficientnet_model_path()
                data = {"npy": make_npy, "npz": make_npz, "folder": make_folder}[case](data_dir, n)
            with tempfile.TemporaryDirectory(prefix="trtcal-bench-memory-") as tmp:
                env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
                env["TRTCAL_CACHE_DIR"] = str(Path(tmp) / "cache")
                command = calibrate_command(model, data, case == "folder", n, Path(tmp) / "store", Path(tmp) / "out", args.extra)
                got = run_and_sample(command, env)
            result = got.pop("result")
            row = {"case": case, "n": n, **got,
                   "tensors": result.get("tensors") if isinstance(result, dict) else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    by_case: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["n"]] = row
    for case, runs in by_case.items():
        if len(runs) >= 2:
            lo, hi = runs[min(runs)], runs[max(runs)]
            print(f"{case}: N {min(runs)} -> {max(runs)}: PSS x{hi['peak_pss_gib'] / lo['peak_pss_gib']:.3f}, "
                  f"RSS x{hi['peak_rss_gib'] / lo['peak_rss_gib']:.3f}")
    if args.write:
        with open(args.write, "a") as f:
            f.write(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "extra": args.extra, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
