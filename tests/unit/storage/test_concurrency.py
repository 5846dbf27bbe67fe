"""8 processes race to publish the same keys: exactly one entry per key, every writer gets it, no error."""

from __future__ import annotations

import hashlib
import multiprocessing
from datetime import timedelta
from typing import Any

import pytest

from trtcal.storage import CacheStore, EntryFilter, compute_cache_key

WRITERS = 8
ROUNDS = 3


def _inputs(round_index: int) -> dict[str, Any]:
    return {"model_sha256": hashlib.sha256(b"model").hexdigest(), "algorithm": "entropy2", "round": round_index}


def _writer(url: str, options: dict[str, Any], writer: int, barrier: Any, results: Any) -> None:
    store = CacheStore(url, namespace="race", **options)
    for round_index in range(ROUNDS):
        inputs = _inputs(round_index)
        key = compute_cache_key(inputs)
        # Deterministic artifacts (same key, same bytes) plus a writer-specific note in the manifest.
        artifacts = {"calibration.cache": f"TRT-100300-EntropyCalibration2\nround{round_index}: 3c010a14\n".encode(),
                     "model.qdq.onnx": hashlib.sha256(key.encode()).digest() * 4096}
        barrier.wait(timeout=120)  # everyone publishes at the same moment
        try:
            entry = store.publish(key, artifacts, key_inputs=inputs, extra={"writer": writer})
            results.put((round_index, writer, entry.manifest["extra"]["writer"], entry.manifest["stage"], entry.read("model.qdq.onnx") == artifacts["model.qdq.onnx"], None))
        except Exception as exc:  # reported to the test, which fails on it
            results.put((round_index, writer, None, None, False, f"{type(exc).__name__}: {exc}"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_eight_processes_race_to_publish_one_key(kind: str, tmp_path: Any, request: pytest.FixtureRequest) -> None:
    if kind == "local":
        url, options = str(tmp_path / "store"), {}
    else:
        server = request.getfixturevalue("s3_server")
        url, options = f"s3://{server.create_bucket()}/race", server.storage_options()
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds s3fs's event-loop thread
    barrier = ctx.Barrier(WRITERS)
    results = ctx.Queue()
    processes = [ctx.Process(target=_writer, args=(url, options, w, barrier, results)) for w in range(WRITERS)]
    for p in processes:
        p.start()
    rows = [results.get(timeout=180) for _ in range(WRITERS * ROUNDS)]
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0

    assert [r for r in rows if r[5] is not None] == []  # no writer saw an error
    store = CacheStore(url, namespace="race", **options)
    for round_index in range(ROUNDS):
        round_rows = [r for r in rows if r[0] == round_index]
        winners = {r[2] for r in round_rows}
        stages = {r[3] for r in round_rows}
        assert len(winners) == 1 and len(stages) == 1, round_rows  # all got the same committed entry
        assert sum(r[1] == r[2] for r in round_rows) == 1  # exactly one writer committed its own manifest
        assert all(r[4] for r in round_rows)  # and its bytes verified
        key = compute_cache_key(_inputs(round_index))
        entry = store.get(key)
        assert entry is not None and entry.manifest["extra"]["writer"] in winners
    assert len(store.ls(EntryFilter(namespace="race"))) == ROUNDS
    # Losers removed their staging directories: one staging directory per key is left.
    report = store.gc(orphan_grace=timedelta(0), dry_run=True)
    assert report.removed_orphans == [] and report.kept_recent_orphans == 0


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_eight_threads_race_in_one_process(kind: str, tmp_path: Any) -> None:
    import threading
    import uuid

    url = f"memory://race-{uuid.uuid4().hex[:8]}" if kind == "memory" else str(tmp_path / "store")
    store = CacheStore(url)
    inputs = _inputs(0)
    key = compute_cache_key(inputs)
    barrier = threading.Barrier(WRITERS)
    winners: list[Any] = []
    errors: list[BaseException] = []

    def write(writer: int) -> None:
        barrier.wait(timeout=30)
        try:
            entry = store.publish(key, {"calibration.cache": b"TRT-100300-MinMaxCalibration\n"}, key_inputs=inputs, extra={"writer": writer})
            winners.append(entry.manifest["extra"]["writer"])
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(winners) == WRITERS and len(set(winners)) == 1
    assert len(store.ls()) == 1
    assert store.gc(orphan_grace=timedelta(0), dry_run=True).removed_orphans == []
