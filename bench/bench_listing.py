"""Issue 15 item 1: what the listing digest (the content half of the batch key) costs.

Times `listing_digest` on a local tree of 100,000 files (100 folders x 1,000, ImageNet-like) and on
10,000 objects of a real SeaweedFS S3 server on 127.0.0.1, next to the build's own listing of the
same data (plan_shards + list_shard, sequential) and, as the anchor in the same run, the calibration
the key guards: EfficientNet-Lite0, entropy2, library `calibrate` on N random 224x224 inputs.

Run:  .venv/bin/python bench/bench_listing.py [--local-files 100000] [--s3-objects 10000] [--anchor-inputs 500]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from tests.fixtures.data import efficientnet_model_path  # noqa: E402
from tests.fixtures.s3 import running_server  # noqa: E402
from trtcal.workers.listing_digest import listing_digest  # noqa: E402
from trtcal.workers.sources import list_shard, open_dataset, plan_shards  # noqa: E402


def _median(action: Any, repeats: int) -> tuple[float, Any]:
    """Median of `repeats` timed calls after one untimed warm-up (imports, the S3 client's session)."""
    action()
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _build_listing(url: str, options: dict[str, Any] | None) -> int:
    dataset = open_dataset(url, options)
    return sum(len(list_shard(dataset, shard).relpaths) for shard in plan_shards(dataset).shards)


def _local_tree(root: Path, files: int) -> None:
    per_folder = 1000
    for i in range(files):
        folder = root / f"n{i // per_folder:08d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True)
        (folder / f"img_{i:07d}.jpg").write_bytes(b"\xff\xd8" + i.to_bytes(4, "little"))


def _s3_objects(server: Any, bucket: str, count: int) -> None:
    client = server._botocore_client()

    def put(i: int) -> None:
        client.put_object(Bucket=bucket, Key=f"images/n{i // 1000:08d}/img_{i:07d}.jpg", Body=b"\xff\xd8" + i.to_bytes(4, "little"))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-files", type=int, default=100_000)
    parser.add_argument("--s3-objects", type=int, default=10_000)
    parser.add_argument("--anchor-inputs", type=int, default=500, help="the default --samples of `trtcal calibrate`")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}
    with tempfile.TemporaryDirectory(prefix="trtcal-bench-listing-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        _local_tree(work / "images", args.local_files)
        report["local_create_s"] = round(time.perf_counter() - t0, 1)
        url = str(work / "images")
        digest_s, digest = _median(lambda: listing_digest(open_dataset(url)), args.repeats)
        build_s, listed = _median(lambda: _build_listing(url, None), args.repeats)
        report["local"] = {"files": digest.files, "digest_s": round(digest_s, 3), "build_listing_s": round(build_s, 3),
                           "build_listing_files": listed}
        print(f"local {digest.files} files: digest {digest_s:.3f} s, the build's listing {build_s:.3f} s", flush=True)
        with running_server(work / "s3") as server:
            bucket = server.create_bucket()
            t0 = time.perf_counter()
            _s3_objects(server, bucket, args.s3_objects)
            report["s3_create_s"] = round(time.perf_counter() - t0, 1)
            options = server.storage_options()
            s3_url = f"s3://{bucket}/images"
            digest_s, digest = _median(lambda: listing_digest(open_dataset(s3_url, options)), args.repeats)
            build_s, listed = _median(lambda: _build_listing(s3_url, options), args.repeats)
            report["s3"] = {"objects": digest.files, "digest_s": round(digest_s, 3), "build_listing_s": round(build_s, 3),
                            "build_listing_files": listed}
            print(f"S3 {digest.files} objects: digest {digest_s:.3f} s, the build's listing {build_s:.3f} s", flush=True)
    from trtcal import calibrate

    inputs = np.random.default_rng(0).standard_normal((args.anchor_inputs, 3, 224, 224)).astype(np.float32)
    t0 = time.perf_counter()
    calibrate(str(efficientnet_model_path()), inputs, algorithms=["entropy2"])
    anchor_s = time.perf_counter() - t0
    report["anchor"] = {"what": f"calibrate(EfficientNet-Lite0, {args.anchor_inputs} inputs, entropy2)", "seconds": round(anchor_s, 2)}
    for where in ("local", "s3"):
        report[where]["share_of_anchor"] = round(report[where]["digest_s"] / anchor_s, 4)
    print(f"anchor: {report['anchor']['what']} {anchor_s:.2f} s; digest share: local "
          f"{report['local']['share_of_anchor']:.1%}, S3 {report['s3']['share_of_anchor']:.1%} (goal <= 5%)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
