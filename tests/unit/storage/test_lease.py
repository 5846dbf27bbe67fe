"""Issue 15 item 10: concurrent jobs on one key compute once (real processes, local store and S3)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from trtcal.storage import CacheStore, compute_cache_key

INPUTS = {"model_sha256": "ab" * 32, "algorithm": "minmax", "batch_fingerprint": "lease"}
KEY = compute_cache_key(INPUTS)


def _job(url: str, options: dict[str, Any], log_dir: str, seconds: float, ttl_s: float) -> None:
    store = CacheStore(url, **options)
    with store.compute_once(KEY, ttl=timedelta(seconds=ttl_s), poll_s=0.2) as entry:
        if entry is None:  # we hold the lease: compute and publish
            Path(log_dir, f"computed-{os.getpid()}").write_text("x")
            time.sleep(seconds)
            entry = store.publish(KEY, {"calibration.cache": f"pid {os.getpid()}".encode()}, key_inputs=INPUTS)
    Path(log_dir, f"got-{os.getpid()}").write_bytes(entry.read("calibration.cache"))


def _race(url: str, options: dict[str, Any], tmp_path: Path, jobs: int = 6) -> tuple[list[Path], set[bytes]]:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_job, args=(url, options, str(tmp_path), 2.0, 5.0)) for _ in range(jobs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    computed = sorted(tmp_path.glob("computed-*"))
    got = {p.read_bytes() for p in tmp_path.glob("got-*")}
    return computed, got


def test_six_jobs_on_one_key_compute_once_and_all_get_the_entry(tmp_path: Path) -> None:
    computed, got = _race(str(tmp_path / "store"), {}, tmp_path)
    assert len(computed) == 1 and len(got) == 1 and len(list(tmp_path.glob("got-*"))) == 6
    assert not list((tmp_path / "store").rglob("leases/*/*.json"))  # released


@pytest.mark.slow
def test_six_jobs_on_one_key_compute_once_on_s3(s3_server: Any, tmp_path: Path) -> None:
    computed, got = _race(f"s3://{s3_server.create_bucket()}/calib", s3_server.storage_options(), tmp_path)
    assert len(computed) == 1 and len(got) == 1


def test_a_holder_killed_mid_compute_lets_a_waiter_compute_after_the_ttl(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    url = str(tmp_path / "store")
    holder = ctx.Process(target=_job, args=(url, {}, str(tmp_path), 600.0, 2.0))
    holder.start()
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("computed-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    lease = next((tmp_path / "store").rglob("leases/*/*.json"))
    assert json.loads(lease.read_text())["pid"] == holder.pid
    waiter = ctx.Process(target=_job, args=(url, {}, str(tmp_path), 0.1, 2.0))
    waiter.start()
    time.sleep(1.0)
    os.kill(holder.pid, signal.SIGKILL)  # dies holding the lease: it stops refreshing
    holder.join()
    started = time.monotonic()
    waiter.join(60)
    assert waiter.exitcode == 0 and time.monotonic() - started < 30
    assert len(list(tmp_path.glob("computed-*"))) == 2
    assert (tmp_path / f"got-{waiter.pid}").read_bytes() == f"pid {waiter.pid}".encode()


def test_a_read_only_store_never_leases(tmp_path: Path) -> None:
    store = CacheStore(str(tmp_path / "store"), read_only=True)
    with store.compute_once(KEY) as entry:
        assert entry is None
    assert not (tmp_path / "store").exists()
