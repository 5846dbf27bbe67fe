"""Preprocessing throughput: the Ray pipeline (`build_batch`) vs a single-process Pillow loop, same run.

Both do the same work with the same library functions, in the same process tree, on the same
synthetic ImageNet-like dataset (train/<wnid>/*.JPEG, 300-500 px per side, generated once into a
temp dir and reused): list (sharded), select (seeded), read, decode (Pillow), transform
(resize 256 / crop 224 / normalise / NCHW float32 for `imagenet`), write (the same
PlannedBatchWriter: rows written to their place in the final file as they come, hashed and flushed
in the background, then published as one record batch). Both batches must come out with the same
fingerprint; the script checks it.

The embedded Ray is started before the timed runs (its start-up is reported on its own line).

Run:
    .venv/bin/python bench/bench_preprocess.py                       # 10,000 images, 2 workers
    .venv/bin/python bench/bench_preprocess.py --num-images 2000 --workers 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

NUM_CLASSES = 100
GEN_VERSION = "1"


# -- the dataset (generated once)


def _make_image(index: int, seed: int) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(300, 501, size=2))
    # Smooth colour fields plus texture: JPEG sizes like photos' (~30-70 KB at quality 90).
    coarse = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    noise = rng.normal(0.0, 10.0, (height, width, 1)).astype(np.float32)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write_range(args: tuple[str, int, int, int]) -> int:
    root, start, stop, seed = args
    total = 0
    for i in range(start, stop):
        wnid = f"n{i % NUM_CLASSES:08d}"
        data = _make_image(i, seed)
        path = Path(root) / "train" / wnid / f"{wnid}_{i:06d}.JPEG"
        path.write_bytes(data)
        total += len(data)
    return total


def ensure_dataset(root: Path, num_images: int, seed: int = 0) -> Path:
    """train/<wnid>/*.JPEG under root, generated once (a stamp file records what is there)."""
    stamp = root / f".complete-v{GEN_VERSION}-{num_images}-{seed}"
    train = root / "train"
    if stamp.exists():
        return train
    if root.exists():
        shutil.rmtree(root)
    for c in range(NUM_CLASSES):
        (train / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    from multiprocessing import Pool

    step = 250
    jobs = [(str(root), s, min(s + step, num_images), seed) for s in range(0, num_images, step)]
    t0 = time.perf_counter()
    with Pool(os.cpu_count() or 1) as pool:
        nbytes = sum(pool.map(_write_range, jobs))
    print(f"generated {num_images} JPEGs ({nbytes / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s under {train}")
    stamp.write_text("ok")
    return train


# -- how busy the machine was (other sessions share it)


def _tree_cpu_seconds(root: int) -> float:
    """utime+stime of `root` and every live descendant, plus what `root` reaped."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = fields
        parents.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        fields = stats.get(pid)
        if fields is not None:
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            if pid == root:
                total += (int(fields[13]) + int(fields[14])) / ticks  # reaped children
        todo.extend(parents.get(pid, []))
    return total


def _machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class MachineLoad:
    """CPU seconds used by this benchmark's processes vs by everything else, over a run."""

    def __enter__(self) -> MachineLoad:
        self.t0 = time.perf_counter()
        self.busy0 = _machine_busy_seconds()
        self.ours0 = _tree_cpu_seconds(os.getpid())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t0
        self.ours = _tree_cpu_seconds(os.getpid()) - self.ours0
        self.others = max(0.0, _machine_busy_seconds() - self.busy0 - self.ours)

    def describe(self) -> str:
        cpus = os.cpu_count() or 1
        return (f"this benchmark used {self.ours:.1f} CPU-s, other processes {self.others:.1f} CPU-s "
                f"({100 * self.others / (self.wall * cpus):.0f}% of the machine) in {self.wall:.1f} s")

    def to_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall, "ours_cpu_s": self.ours, "others_cpu_s": self.others}


# -- the parallel ceiling: the same decode+transform in N plain processes, no Ray, no writing


def _decode_transform(args: tuple[list[str], Any]) -> float:
    from trtcal.workers.preprocess import decode_image, transform_image

    paths, spec = args
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            transform_image(decode_image(f.read()), spec)
    return time.perf_counter() - t0


def parallel_ceiling(data: Path, spec: Any, workers: int, limit: int) -> dict[str, float]:
    from multiprocessing import Pool

    paths = sorted(str(p) for p in data.rglob("*.JPEG"))[:limit]
    t0 = time.perf_counter()
    _decode_transform((paths, spec))
    single = time.perf_counter() - t0
    with Pool(workers) as pool:
        pool.map(_decode_transform, [(paths[:2], spec)] * workers)  # start-up outside the timing
        t0 = time.perf_counter()
        pool.map(_decode_transform, [(paths[k::workers], spec) for k in range(workers)])
        parallel = time.perf_counter() - t0
    return {"images": len(paths), "single_s": single, "parallel_s": parallel, "speedup": single / parallel}


# -- the single-process loop


def single_process(data: Path, output: Path, *, num_samples: int | None, seed: int, spec: Any, chunk: int) -> dict[str, Any]:
    from trtcal.batch import InputInfo, PlannedBatchWriter
    from trtcal.workers.preprocess import (
        DEFAULT_MAX_IMAGE_PIXELS,
        decode_image,
        output_shape,
        transform_image,
    )
    from trtcal.workers.selection import select_samples
    from trtcal.workers.sources import (
        list_shard,
        open_dataset,
        plan_shards,
        read_image_bytes,
        resolve_selection,
    )

    times = dict.fromkeys(("list", "select", "read", "decode", "transform", "write"), 0.0)
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    dataset = open_dataset(str(data))
    plan = plan_shards(dataset)
    listings = [list_shard(dataset, shard) for shard in plan.shards]
    times["list"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    selection = select_samples([lst.class_counts(False) for lst in listings], num_samples=num_samples, seed=seed)
    refs = []
    for listing, chosen in zip(listings, selection.per_shard):
        if chosen:
            refs.extend(resolve_selection(listing, chosen, False))
    refs.sort(key=lambda r: r.sample_id)
    times["select"] = time.perf_counter() - t0
    document = {"preprocess": spec.to_dict(), "skipped_inputs": 0, "refused_entries": 0}
    shape = output_shape(spec)
    assert shape is not None, "the bench uses a cropping preset"
    writer = PlannedBatchWriter(
        str(output), sample_ids=[r.sample_id for r in refs], inputs=[InputInfo("input", shape, spec.dtype)], spec=document
    )
    fs = dataset.filesystem()
    for start in range(0, len(refs), chunk):
        rows, ids = [], []
        for ref in refs[start : start + chunk]:
            t0 = time.perf_counter()
            encoded = read_image_bytes(dataset, fs, ref)  # the workers' reader, root check included
            t1 = time.perf_counter()
            image = decode_image(encoded, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, alpha_background=spec.alpha_background)
            t2 = time.perf_counter()
            rows.append(transform_image(image, spec))
            ids.append(ref.sample_id)
            t3 = time.perf_counter()
            times["read"] += t1 - t0
            times["decode"] += t2 - t1
            times["transform"] += t3 - t2
        t0 = time.perf_counter()
        writer.write({"input": np.stack(rows)}, ids)
        times["write"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    info = writer.close()
    times["publish"] = time.perf_counter() - t0
    times["write"] += times["publish"]
    times["total"] = time.perf_counter() - t_start
    return {"seconds": times, "fingerprint": info.fingerprint, "rows": info.num_rows, "nbytes": info.nbytes}


# -- the Ray pipeline


def ray_pipeline(data: Path, output: Path, *, num_samples: int | None, seed: int, spec: Any, workers: int) -> dict[str, Any]:
    from trtcal.workers.build import build_batch

    t0 = time.perf_counter()
    report = build_batch(str(data), str(output), num_samples=num_samples, seed=seed, preprocess=spec, workers=workers)
    total = time.perf_counter() - t0
    return {
        "wall": {**report.wall_seconds, "total": total},
        "worker_seconds": dict(report.worker_seconds),
        "fingerprint": report.fingerprint,
        "rows": report.num_rows,
        "nbytes": report.nbytes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--num-samples", default="all", help="samples drawn (default: all images)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--preprocess", default="imagenet")
    parser.add_argument("--dtype", choices=("float32", "float16"))
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "trtcal-bench-imagenet")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the batches are written (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--order", choices=("single-first", "ray-first"), default="single-first")
    parser.add_argument("--ceiling-images", type=int, default=2000, help="images for the plain-processes control")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the two pipelines this often; the best of each is reported")
    args = parser.parse_args()

    from trtcal.workers.build import _CHUNK_TARGET_BYTES
    from trtcal.workers.preprocess import output_shape, parse_preprocess
    from trtcal.workers.ray_runtime import ray_session
    from trtcal.workers.selection import parse_num_samples

    spec = parse_preprocess(args.preprocess, dtype=args.dtype)
    num_samples = parse_num_samples(args.num_samples)
    data = ensure_dataset(args.data_dir / f"n{args.num_images}", args.num_images)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="trtcal-bench-out-", dir=str(args.data_dir)))
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = output_shape(spec) or (3, 224, 224)
    row_bytes = int(np.prod(shape)) * np.dtype(spec.dtype).itemsize
    n = num_samples or args.num_images
    chunk = max(1, min(64, _CHUNK_TARGET_BYTES // row_bytes, -(-n // (args.workers * 4))))

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"dataset: {args.num_images} synthetic JPEGs, 300-500 px, {data}; preprocess={args.preprocess} "
          f"dtype={spec.dtype}; samples={n}; batch {n * row_bytes / 2**30:.2f} GiB")
    results: dict[str, Any] = {"num_images": args.num_images, "samples": n, "workers": args.workers, "preprocess": args.preprocess}
    results["loadavg_before"] = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average before: {' '.join(results['loadavg_before'])}")
    t0 = time.perf_counter()
    with ray_session(num_cpus=args.workers) as session:
        results["ray_start_s"] = time.perf_counter() - t0
        print(f"embedded Ray started in {results['ray_start_s']:.1f} s ({session.num_cpus} CPUs; not in the timings below)")
        runs = ["single", "ray"] if args.order == "single-first" else ["ray", "single"]
        for attempt in range(args.repeat):
            for name in runs:
                target = out_dir / f"{name}.arrow"
                with MachineLoad() as load:
                    if name == "single":
                        run = single_process(data, target, num_samples=num_samples, seed=0, spec=spec, chunk=chunk)
                        seconds = run["seconds"]["total"]
                    else:
                        run = ray_pipeline(data, target, num_samples=num_samples, seed=0, spec=spec, workers=args.workers)
                        seconds = run["wall"]["total"]
                run["load"] = load.to_dict()
                results.setdefault("runs", []).append({"pipeline": name, "attempt": attempt, **run})
                print(f"{name} #{attempt + 1}: {seconds:.1f} s; {load.describe()}")
                best = results.get(name)
                if best is None or seconds < (best["seconds"]["total"] if name == "single" else best["wall"]["total"]):
                    results[name] = run
                target.unlink()
    with MachineLoad() as load:
        ceiling = parallel_ceiling(data, spec, args.workers, min(n, args.ceiling_images))
    results["ceiling"] = {**ceiling, "load": load.to_dict()}
    print(f"ceiling: {load.describe()}")
    shutil.rmtree(out_dir, ignore_errors=True)

    single, ray = results["single"], results["ray"]
    assert single["fingerprint"] == ray["fingerprint"], "the two pipelines must produce the same batch"
    s, r, w = single["seconds"], ray["wall"], ray["worker_seconds"]
    s_process = s["read"] + s["decode"] + s["transform"] + (s["write"] - s["publish"])
    r_publish = r["write"]
    rows = [
        ("list", s["list"], r["list"], ""),
        ("select", s["select"], r["select"], ""),
        ("read", s["read"], None, f"{w['read']:.2f} worker-s"),
        ("decode", s["decode"], None, f"{w['decode']:.2f} worker-s"),
        ("transform", s["transform"], None, f"{w['transform']:.2f} worker-s"),
        ("read+decode+transform+place rows", s_process, r["process"], "Ray: wall, rows placed in the final file as they come"),
        ("write (place rows + finish hash, fsync, publish)", s["write"], r_publish, "Ray: driver pwrite time + close"),
        ("total", s["total"], r["total"], ""),
    ]
    print()
    print(f"best of {args.repeat}; other processes used {100 * single['load']['others_cpu_s'] / (single['load']['wall_s'] * (os.cpu_count() or 1)):.0f}% "
          f"(single) and {100 * ray['load']['others_cpu_s'] / (ray['load']['wall_s'] * (os.cpu_count() or 1)):.0f}% (Ray) of the machine in those runs")
    print(f"| stage | single process (s) | Ray, {args.workers} workers (s) | note |")
    print("|---|---|---|---|")
    for stage, single_s, ray_s, note in rows:
        print(f"| {stage} | {single_s:.2f} | {'' if ray_s is None else f'{ray_s:.2f}'} | {note} |")
    end_to_end = (n / s["total"], n / r["total"])
    through_transform = (n / (s["list"] + s["select"] + s_process), n / (r["list"] + r["select"] + r["process"]))
    print()
    print(f"images/s end to end (list .. published batch): single {end_to_end[0]:.1f}, Ray {end_to_end[1]:.1f} "
          f"-> {end_to_end[1] / end_to_end[0]:.2f}x")
    print(f"images/s list .. transform (rows placed in the file, before the close that publishes it): "
          f"single {through_transform[0]:.1f}, Ray {through_transform[1]:.1f} -> "
          f"{through_transform[1] / through_transform[0]:.2f}x")
    print(f"parallel ceiling (decode+transform only, {ceiling['images']} images, {args.workers} plain processes vs 1, "
          f"no Ray, no writing): {ceiling['speedup']:.2f}x")
    print(f"same batch: {single['fingerprint']} ({single['rows']} rows, {single['nbytes'] / 2**30:.2f} GiB)")
    results["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average after: {' '.join(results['loadavg_after'])}")
    results["ratio_end_to_end"] = end_to_end[1] / end_to_end[0]
    results["ratio_through_transform"] = through_transform[1] / through_transform[0]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
