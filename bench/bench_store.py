"""CacheStore on a local S3 server (SeaweedFS on 127.0.0.1), with its anchors timed in the same run.

1. Cache hit of a typical entry: lookup + verify (sha256 of every byte) + fetch of
   calibration.cache (all 95 tensors of EfficientNet-Lite0), ranges.json, report.json and a
   18.5 MB model (the real efficientnet_lite0.onnx bytes, standing in for model.qdq.onnx).
   Anchor A: fetching (and, for publish, writing) the same four objects with plain s3fs
   (no manifest, no hashing).
   Anchor B: what a cache hit saves: one real trtcal.calibrate of EfficientNet-Lite0 (entropy2,
   ONNX Runtime CPU) over --images inputs, timed in this run.
2. `ls` over 10,000 entries (every manifest read, concurrently), with a filter, and `verify`
   of all of them; the same on a local directory store.

Run:  .venv/bin/python bench/bench_store.py [--entries 10000] [--images 32]
      (starts its own SeaweedFS, or uses TRTCAL_TEST_S3_ENDPOINT/_KEY/_SECRET when set)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tests.fixtures.data import efficientnet_model_path  # noqa: E402
from tests.fixtures.s3 import S3Server, running_server, server_from_env  # noqa: E402
from trtcal.core import write_trt_cache  # noqa: E402
from trtcal.storage import CacheStore, EntryFilter, KeyInputs, compute_cache_key  # noqa: E402

MODEL = efficientnet_model_path()  # $TRTCAL_TEST_MODEL, else fetched once by trtcal.demo.model_zoo


def typical_entry(i: int = 0) -> tuple[KeyInputs, dict[str, bytes]]:
    import onnx

    model_bytes = MODEL.read_bytes()
    graph = onnx.load_from_string(model_bytes).graph
    tensors = [t.name for t in graph.input] + [o for node in graph.node for o in node.output]
    rng = np.random.default_rng(i)
    amax = {name: float(rng.uniform(0.5, 20.0)) for name in tensors}
    inputs = KeyInputs(
        model_sha256=hashlib.sha256(model_bytes).hexdigest(),
        batch_fingerprint=hashlib.sha256(f"batch-{i}".encode()).hexdigest(),
        preprocessing={"preset": "imagenet-lite", "resize": 256, "crop": 224},
        algorithm="entropy2",
        algorithm_params={"num_bins": 2048},
        runner="onnxruntime-cpu",
        runner_version="1.32.0",
    )
    artifacts = {
        "calibration.cache": write_trt_cache(amax, trt_version="10.16.1", algorithm="entropy2"),
        "ranges.json": json.dumps({n: {"amax": a, "method": "entropy2"} for n, a in amax.items()}, indent=1).encode(),
        "report.json": json.dumps({"tensors": len(amax), "seconds": {"pass1": 1.0, "pass2": 2.0}}).encode(),
        "model.qdq.onnx": model_bytes,
    }
    return inputs, artifacts


def timed(fn: Any, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def ms(values: list[float]) -> str:
    v = sorted(values)
    return f"median {statistics.median(v) * 1e3:.1f} ms, p90 {v[int(0.9 * (len(v) - 1))] * 1e3:.1f} ms (n={len(v)})"


@contextlib.contextmanager
def s3() -> Iterator[S3Server]:
    external = server_from_env()
    if external is not None:
        yield external
        return
    with running_server(graceful=False) as server:
        yield server


def bench_hit(server: S3Server, repeat: int) -> float:
    bucket = server.create_bucket()
    store = CacheStore(f"s3://{bucket}/calib", **server.storage_options())
    inputs, artifacts = typical_entry()
    key = compute_cache_key(inputs)
    size = sum(len(v) for v in artifacts.values())
    print(f"typical entry: {len(artifacts)} artifacts, {size / 1e6:.2f} MB ({', '.join(f'{k} {len(v):,} B' for k, v in artifacts.items())})")

    t_miss = timed(lambda: store.get(key), repeat)
    t0 = time.perf_counter()
    store.publish(key, artifacts, key_inputs=inputs)
    t_publish = time.perf_counter() - t0

    def hit() -> None:
        entry = CacheStore(f"s3://{bucket}/calib", **server.storage_options()).get(key)
        assert entry is not None
        for name in artifacts:
            assert len(entry.read(name)) == len(artifacts[name])

    def hit_small() -> None:  # what a TensorRT-cache consumer needs: lazy lookup + the cache file only
        entry = CacheStore(f"s3://{bucket}/calib", **server.storage_options()).get(key, lazy=True)
        assert entry is not None and entry.read("calibration.cache") == artifacts["calibration.cache"]

    hit()  # warm the client's connection pool
    t_hit = timed(hit, repeat)
    t_small = timed(hit_small, repeat)

    import fsspec

    fs, root = fsspec.core.url_to_fs(f"s3://{bucket}/calib", **server.storage_options())
    paths = [p for p in fs.find(root) if "/artifacts/" in p]
    assert len(paths) == len(artifacts)

    def raw() -> None:
        fs.cat(paths)

    t_raw = timed(raw, repeat)

    def raw_put() -> None:
        for name, data in artifacts.items():
            fs.pipe_file(f"{root}/raw-put/{name}", data)

    t_raw_put = timed(raw_put, 3)
    print(f"publish (4 artifacts + create-only manifest commit + index marker): {t_publish * 1e3:.1f} ms; "
          f"anchor, plain s3fs pipe_file of the same 4 objects: median {statistics.median(t_raw_put) * 1e3:.1f} ms (n=3)")
    print(f"miss (absent key):                 {ms(t_miss)}")
    print(f"HIT, lookup+verify+fetch all:      {ms(t_hit)}")
    print(f"hit, lazy + calibration.cache only: {ms(t_small)}")
    print(f"anchor A, plain s3fs fetch of the same {len(paths)} objects, no checks: {ms(t_raw)}"
          f"  -> hit costs {statistics.median(t_hit) / statistics.median(t_raw):.2f}x a bare fetch")

    return statistics.median(t_hit)


def bench_calibration(images: int) -> float | None:
    """Anchor B: one real trtcal.calibrate (entropy2) of EfficientNet-Lite0 over `images` inputs, in this process."""
    try:
        import trtcal

        batch = np.random.default_rng(0).standard_normal((images, 3, 224, 224)).astype(np.float32)
        t0 = time.perf_counter()
        trtcal.calibrate(str(MODEL), {"input": batch}, algorithms=["entropy2"])
        seconds = time.perf_counter() - t0
    except Exception as exc:  # the pipeline belongs to another module; report instead of inventing a number
        print(f"anchor B, trtcal.calibrate: not measured ({type(exc).__name__}: {exc})")
        return None
    print(f"anchor B, trtcal.calibrate(EfficientNet-Lite0, {images} inputs of 3x224x224, entropy2, CPU): {seconds:.2f} s")
    return seconds


def fill(store: CacheStore, count: int, workers: int) -> float:
    cache = write_trt_cache({"input": 2.0, "conv": 3.0}, trt_version="10.16.1", algorithm="entropy2")

    def one(i: int) -> None:
        inputs = {"model_sha256": hashlib.sha256(f"m{i % 50}".encode()).hexdigest(),
                  "algorithm": ("entropy2", "minmax", "percentile")[i % 3], "i": i}
        store.publish(compute_cache_key(inputs), {"calibration.cache": cache}, key_inputs=inputs)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    return time.perf_counter() - t0


def bench_ls(server: S3Server, count: int, t_calibrate: float | None) -> None:
    bucket = server.create_bucket()
    with tempfile.TemporaryDirectory(prefix="trtcal-bench-store-") as local_root:
        stores = {
            "S3 (SeaweedFS)": CacheStore(f"s3://{bucket}/calib", **server.storage_options()),
            "local dir": CacheStore(local_root),
        }
        _bench_ls_stores(stores, count, t_calibrate)


def _bench_ls_stores(stores: dict[str, CacheStore], count: int, t_calibrate: float | None) -> None:
    model = hashlib.sha256(b"m7").hexdigest()
    for label, store in stores.items():
        t_fill = fill(store, count, workers=8)
        print(f"[{label}] filled {count:,} entries in {t_fill:.1f} s ({count / t_fill:.0f} publishes/s, 8 threads)")
        t0 = time.perf_counter()
        listed = store.ls()
        t_ls = time.perf_counter() - t0
        assert len(listed) == count, len(listed)
        t0 = time.perf_counter()
        some = store.ls(EntryFilter(model_sha256=model[:8], algorithm="minmax"))
        t_filter = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = store.verify()
        t_verify = time.perf_counter() - t0
        assert all(r.ok for r in results) and len(results) == count
        print(f"[{label}] ls of {count:,} entries: {t_ls:.2f} s; ls --model/--algorithm ({len(some)} hits): {t_filter:.2f} s; "
              f"verify all: {t_verify:.2f} s")
        if t_calibrate:
            print(f"[{label}]   ls = 1/{t_calibrate / t_ls:.1f} of the calibration (anchor B)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    print(f"{platform.machine()} {platform.python_version()}, {platform.processor() or ''}".strip(", "))
    with s3() as server:
        print(f"S3 endpoint {server.endpoint_url} ({'started here' if server.owned else 'external'})")
        t_hit = bench_hit(server, args.repeat)
        t_calibrate = bench_calibration(args.images)
        if t_calibrate:
            print(f"  cache hit = 1/{t_calibrate / t_hit:.0f} of that calibration")
        bench_ls(server, args.entries, t_calibrate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
