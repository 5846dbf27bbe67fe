"""Reliability under load: concurrent calibrations on one store, faults injected, hostile input, entries lost.

Everything is real: a SeaweedFS S3 server on 127.0.0.1 (started here, killed and restarted here), a
loopback proxy in front of it that answers 503 SlowDown / 500 / dropped connections, a Ray head
(`ray start --head`, 2 CPUs), `trtcal calibrate` processes, the tiny CNN of tests/reliability and the
real EfficientNet-Lite0.

Phases (each prints its figures; --json writes them all):
 1. jobs     N `trtcal calibrate` processes at once on one S3 store and one Ray head: half on one
             key (same model and batch), half on keys of their own, two EfficientNet-Lite0 jobs on
             one key, and one extra job SIGKILLed mid-run then run again. Checks: every job exits
             0, same key -> identical artifact bytes, one entry per key, `verify` clean.
 2. storm    W writer processes publish E entries each through the fault proxy (a share of
             requests answered 503/500/reset) while the S3 server is killed and restarted once.
             Every publish that returned is checked afterwards (lost = returned but absent or
             corrupt: must be 0); every failed one must have left no entry, then is published again.
 3. bounds   How long and how many requests a persistent fault takes to become a clear error.
 4. hostile  Fuzzed and hand-written bad input through the real readers: tried / refused with a
             trtcal error / accepted (valid) / crashed (another exception) / hung.
 5. redteam  Every trap of issue 15 tried for real (bench/redteam.py): ok / silent-wrong /
             files-lost / hung / leaked / crashed per case (no S3 or Ray head needed).

Run:  .venv/bin/python bench/stress.py [--jobs 8] [--writers 8] [--entries 6] [--long] [--json out.json]
      (about 3-4 minutes on 2 cores; --long adds the slowest bounds: persistent 503 on publish and a
      download with the server gone, about 5 more minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from tests.fixtures.data import efficientnet_model_path  # noqa: E402
from tests.fixtures.s3 import S3Server, running_server  # noqa: E402
from tests.reliability.netfault import FaultProxy, Rule  # noqa: E402
from tests.reliability.rayhead import client_env, ray_head, session_pids  # noqa: E402
from tests.reliability.tiny_cnn import tiny_batch, tiny_cnn  # noqa: E402
from trtcal.errors import TrtcalError  # noqa: E402
from trtcal.storage import CacheStore, compute_cache_key  # noqa: E402

EFFICIENTNET = efficientnet_model_path()  # $TRTCAL_TEST_MODEL, else fetched once by trtcal.demo.model_zoo


def _say(text: str) -> None:
    print(text, flush=True)


# --- 1. concurrent calibration jobs -------------------------------------------------------------


def phase_jobs(server: S3Server, work: Path, num_jobs: int) -> dict[str, Any]:
    bucket = server.create_bucket()
    store_url = f"s3://{bucket}/calib"
    tiny = work / "tiny.onnx"
    tiny.write_bytes(tiny_cnn(0).SerializeToString(deterministic=True))
    batches = {}
    for seed in range(num_jobs):
        batches[seed] = work / f"batch-{seed}.npy"
        np.save(batches[seed], tiny_batch(32, seed=seed))
    from tests.fixtures.data import photo_views

    views, _ids = photo_views(16)
    np.save(work / "photos.npy", views)
    np.save(work / "killed.npy", tiny_batch(32, seed=99))
    store_creds = {"AWS_ACCESS_KEY_ID": server.key, "AWS_SECRET_ACCESS_KEY": server.secret}
    specs: list[tuple[str, Path, Path, str]] = []  # (name, model, data, expected group)
    half = num_jobs // 2
    for i in range(num_jobs):
        data = batches[0] if i < half else batches[i]
        specs.append((f"tiny-{i}", tiny, data, "same" if i < half else f"own-{i}"))
    specs += [("effnet-0", EFFICIENTNET, work / "photos.npy", "effnet"), ("effnet-1", EFFICIENTNET, work / "photos.npy", "effnet")]
    with ray_head(num_cpus=2, env=store_creds) as head:
        env = client_env(head)
        env.update(PYTHONPATH=str(REPO_ROOT), TRTCAL_CACHE_DIR=str(work / "cache"), **store_creds)

        def argv(model: Path, data: Path) -> list[str]:
            return [sys.executable, "-m", "trtcal", "calibrate", str(model), "--data", str(data), "--store", store_url,
                    "--storage-option", f"endpoint_url={server.endpoint_url}", "--address", head.address,
                    "--device", "cpu", "-a", "entropy2", "-a", "minmax", "--json"]

        started = time.perf_counter()
        procs = {}
        for name, model, data, _group in specs:
            procs[name] = (subprocess.Popen(argv(model, data), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            start_new_session=True), time.perf_counter())
        # One more job on a key of its own, SIGKILLed (no cleanup at all) once its driver is well under way.
        victim = subprocess.Popen(argv(tiny, work / "killed.npy"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
        time.sleep(6.0)
        victim.kill()
        victim_rc = victim.wait()  # -9: it was still running when killed
        results: dict[str, dict[str, Any]] = {}
        for name, (proc, t0) in procs.items():
            out, err = proc.communicate(timeout=900)
            wall = time.perf_counter() - t0
            row: dict[str, Any] = {"rc": proc.returncode, "wall_s": round(wall, 1)}
            if proc.returncode == 0:
                info = json.loads(out)
                row.update(key=info["key"], cache_hit=info["cache_hit"], published=info["published"])
            else:
                row["error"] = err.decode(errors="replace")[-600:]
            results[name] = row
        concurrent_wall = time.perf_counter() - started
        for pid in session_pids(victim.pid):  # what the killed driver left behind (its Ray workers are the head's)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        store = CacheStore(store_url, **server.storage_options())
        entries_after_kill = {i.key: i for i in store.ls()}
        rerun = subprocess.run(argv(tiny, work / "killed.npy"), env=env, capture_output=True, timeout=600)
        rerun_key = json.loads(rerun.stdout)["key"] if rerun.returncode == 0 else None
        # Killed before its commit: no entry; after it: a complete one. Never anything in between.
        if rerun_key is None or rerun_key not in entries_after_kill:
            victim_entry = "absent"
        else:
            problems = [v for v in store.verify() if v.key == rerun_key and not v.ok]
            victim_entry = "partial" if problems else "complete (killed after its commit)"

    # Checks.
    groups: dict[str, list[str]] = {}
    for name, _m, _d, group in specs:
        groups.setdefault(group, []).append(name)
    failures = [n for n, r in results.items() if r["rc"] != 0]
    store = CacheStore(store_url, **server.storage_options())
    listed = {i.key for i in store.ls()}
    verify = store.verify()
    shas: dict[str, dict[str, str]] = {}
    for info in store.ls():
        entry = store.get(info.key)
        assert entry is not None
        shas[info.key] = {n: r["sha256"] for n, r in entry.manifest["artifacts"].items() if n != "run.json"}
    same_key_identical = all(len({results[n].get("key") for n in names}) == 1 for names in groups.values())
    expected_keys = {results[n]["key"] for n in results if results[n]["rc"] == 0}
    if rerun_key:
        expected_keys.add(rerun_key)
    lost = sorted(expected_keys - listed)
    out = {
        "jobs": len(specs) + 1,
        "concurrent": len(specs),
        "succeeded": len(specs) - len(failures),
        "failed": failures,
        "distinct_keys": len({r.get("key") for r in results.values() if r.get("key")}),
        "computed": sum(1 for r in results.values() if r.get("published") and not r.get("cache_hit")),
        "cache_hits": sum(1 for r in results.values() if r.get("cache_hit")),
        "same_key_jobs_agree": same_key_identical,
        "entries_in_store": len(listed),
        "verify_problems": [v.problem for v in verify if not v.ok],
        "killed_job_exit": victim_rc,
        "killed_job_entry_before_rerun": victim_entry,
        "killed_job_rerun_ok": rerun.returncode == 0,
        "entries_lost": len(lost),
        "wall_s_all_concurrent": round(concurrent_wall, 1),
        "per_job": results,
    }
    _say(f"[jobs] {out['concurrent']} concurrent + 1 SIGKILLed: {out['succeeded']}/{out['concurrent']} ok, "
         f"{out['distinct_keys']} keys, {out['computed']} computed + {out['cache_hits']} hits, "
         f"same-key agree={same_key_identical}, entries={len(listed)}, verify problems={len(out['verify_problems'])}, "
         f"killed job (exit {victim_rc}) entry: {victim_entry}, rerun ok={out['killed_job_rerun_ok']}, "
         f"lost={len(lost)}, wall {concurrent_wall:.1f}s")
    return out


# --- 2. publish storm through faults ------------------------------------------------------------


def _writer(url: str, options: dict[str, Any], writer: int, entries: int, results: Any) -> None:
    store = CacheStore(url, namespace="storm", **options)
    for i in range(entries):
        # Every other writer shares its keys with writer 0, so commits race too.
        owner = 0 if writer % 2 == 0 else writer
        inputs = {"model_sha256": hashlib.sha256(f"storm-{owner}-{i}".encode()).hexdigest(), "algorithm": "entropy2"}
        key = compute_cache_key(inputs)
        big = np.random.default_rng(owner * 1000 + i).integers(0, 256, 6 << 20, dtype=np.uint8).tobytes()
        artifacts = {"calibration.cache": f"TRT-100300-EntropyCalibration2\nt{owner}_{i}: 3c010a14\n".encode(), "batch.arrow": big}
        t0 = time.perf_counter()
        try:
            entry = store.publish(key, artifacts, key_inputs=inputs)
            ok = entry.read("batch.arrow") == big
            results.put((writer, i, key, "ok" if ok else "returned-wrong-bytes", time.perf_counter() - t0, ""))
        except TrtcalError as exc:
            results.put((writer, i, key, type(exc).__name__, time.perf_counter() - t0, str(exc)[:300]))
        except BaseException as exc:  # a crash: counted, never expected
            results.put((writer, i, key, "CRASH " + type(exc).__name__, time.perf_counter() - t0, str(exc)[:300]))


def phase_storm(server: S3Server, writers: int, entries: int, fault_share: float) -> dict[str, Any]:
    bucket = server.create_bucket()
    url = f"s3://{bucket}/calib"
    with FaultProxy(server.endpoint_url) as proxy:
        for n, action in enumerate(("503", "500", "reset")):
            proxy.add(Rule(action, times=None, probability=fault_share / 3, seed=n))
        options = server.storage_options(client_kwargs={"endpoint_url": proxy.url}, default_block_size=5 << 20)
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        procs = [ctx.Process(target=_writer, args=(url, options, w, entries, results)) for w in range(writers)]
        started = time.perf_counter()
        for p in procs:
            p.start()
        rows = []
        killed_at = None
        while len(rows) < writers * entries:
            try:
                rows.append(results.get(timeout=1.0))
            except Exception:  # queue.Empty
                if not any(p.is_alive() for p in procs):
                    break  # a writer died without reporting: its missing rows show up as a shortfall
            if killed_at is None and len(rows) >= writers * entries // 3:
                server.kill()  # a crash of the S3 server in the middle of the storm
                killed_at = len(rows)
                time.sleep(1.0)
                server.restart()
        for p in procs:
            p.join(timeout=120)
        wall = time.perf_counter() - started
        injected = {a: len([s for s in proxy.log if s.action == a]) for a in ("503", "500", "reset")}
        requests = len(proxy.log)
    store = CacheStore(url, namespace="storm", **server.storage_options())
    listed = {i.key for i in store.ls()}
    returned = {r[2] for r in rows if r[3] == "ok"}
    failed = {r[2] for r in rows if r[3] != "ok"} - returned
    lost = sorted(k for k in returned if k not in listed or store.get(k) is None)
    partial_visible = sorted(k for k in failed if k in listed and store.get(k) is None)
    verify = store.verify()
    store.gc(orphan_grace=timedelta(0))
    # Publish the failed ones again, without faults: all must land.
    republished = 0
    for writer, i, key, status, _t, _m in rows:
        if status != "ok" and key not in listed:
            owner = 0 if writer % 2 == 0 else writer
            inputs = {"model_sha256": hashlib.sha256(f"storm-{owner}-{i}".encode()).hexdigest(), "algorithm": "entropy2"}
            if store.get(key) is None:
                store.publish(key, {"calibration.cache": b"TRT-100300-EntropyCalibration2\n"}, key_inputs=inputs)
                republished += 1
    out = {
        "writers": writers,
        "publishes": len(rows),
        "publishes_unreported": writers * entries - len(rows),
        "distinct_keys": len({r[2] for r in rows}),
        "returned_ok": sum(1 for r in rows if r[3] == "ok"),
        "failed_clean": sum(1 for r in rows if r[3] in ("StorageError", "CorruptEntryError")),
        "crashed": sum(1 for r in rows if r[3].startswith("CRASH") or r[3] == "returned-wrong-bytes"),
        "errors": sorted({r[3] + ": " + r[5][:120] for r in rows if r[3] != "ok"})[:5],
        "faults_injected": injected,
        "requests_through_proxy": requests,
        "server_killed_after_publishes": killed_at,
        "entries_lost": len(lost),
        "partial_entries_visible": len(partial_visible),
        "verify_problems": [v.problem for v in verify if not v.ok],
        "republished_after": republished,
        "wall_s": round(wall, 1),
        "publish_s_median": round(float(np.median([r[4] for r in rows])), 2),
        "publish_s_max": round(max(r[4] for r in rows), 2),
    }
    _say(f"[storm] {out['publishes']} publishes by {writers} writers ({out['distinct_keys']} keys, 6 MiB each): "
         f"{out['returned_ok']} ok, {out['failed_clean']} clean errors, {out['crashed']} crashes; faults injected "
         f"{injected} of {requests} requests + 1 server kill/restart; lost={len(lost)}, partial visible={len(partial_visible)}, "
         f"verify problems={len(out['verify_problems'])}; publish median {out['publish_s_median']}s max {out['publish_s_max']}s")
    return out


# --- 3. bounded failures ------------------------------------------------------------------------


def _timed(action: Callable[[], Any]) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        action()
        outcome = "no error"
    except TrtcalError as exc:
        outcome = f"{type(exc).__name__}"
    except BaseException as exc:
        outcome = f"CRASH {type(exc).__name__}"
    return time.perf_counter() - t0, outcome


def phase_bounds(server: S3Server, work: Path, long: bool) -> dict[str, Any]:
    inputs = {"model_sha256": "ee" * 32, "algorithm": "minmax"}
    key = compute_cache_key(inputs)
    out: dict[str, Any] = {}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = CacheStore("s3://b/c", key="AKIDX1234", secret="s" * 20, client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})
    seconds, outcome = _timed(lambda: refused.get(key))
    out["connection_refused_get"] = {"seconds": round(seconds, 1), "outcome": outcome}
    bucket = server.create_bucket()
    with FaultProxy(server.endpoint_url) as proxy:
        store = CacheStore(f"s3://{bucket}/c", **server.storage_options(client_kwargs={"endpoint_url": proxy.url}))
        cases = [("persistent_503_get", "503", "GET", lambda: store.get(key)),
                 ("persistent_500_publish", "500", "PUT", lambda: store.publish(key, {"calibration.cache": b"x"}, key_inputs=inputs))]
        if long:
            cases.append(("persistent_503_publish", "503", None, lambda: store.publish(key, {"calibration.cache": b"x"}, key_inputs=inputs)))
        for name, action, method, call in cases:
            proxy.clear()
            proxy.log.clear()
            proxy.add(Rule(action, method=method, times=None))
            seconds, outcome = _timed(call)
            out[name] = {"seconds": round(seconds, 1), "requests": len(proxy.log), "outcome": outcome}
        proxy.clear()
        if long:
            big = os.urandom(20 << 20)
            store.publish(key, {"calibration.cache": b"x", "batch.arrow": big}, key_inputs=inputs)
            entry = CacheStore(f"s3://{bucket}/c", **server.storage_options(client_kwargs={"endpoint_url": proxy.url})).get(key, lazy=True)
            held = proxy.add(Rule("hold", method="GET", path=r"/batch\.arrow$", times=1, hold_s=300))
            dest = work / "dl"
            dest.mkdir(exist_ok=True)
            import threading

            result: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: result.update(r=_timed(lambda: entry.download("batch.arrow", dest))))
            thread.start()
            held.arrived.wait(60)
            server.kill()
            held.release()
            thread.join(900)
            server.restart()
            seconds, outcome = result["r"]
            out["server_down_mid_download"] = {"seconds": round(seconds, 1), "outcome": outcome,
                                               "files_left": len(list(dest.iterdir()))}
    for name, row in out.items():
        _say(f"[bounds] {name}: {row}")
    return out


# --- 4. hostile input ---------------------------------------------------------------------------


class _Tally:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, int]] = {}
        self.crashes: dict[str, list[str]] = {}

    def run(self, category: str, action: Callable[[], Any]) -> None:
        row = self.rows.setdefault(category, {"tried": 0, "refused": 0, "accepted": 0, "crashed": 0, "hung": 0})
        row["tried"] += 1
        try:
            action()
            row["accepted"] += 1
        except TrtcalError:
            row["refused"] += 1
        except _Hung as exc:
            row["hung"] += 1
            self.crashes.setdefault(category, []).append(f"hang: {exc}")
        except BaseException as exc:  # a crash: counted and named
            row["crashed"] += 1
            self.crashes.setdefault(category, []).append(f"{type(exc).__name__}: {str(exc)[:100]}")


class _Hung(Exception):
    pass


def _mutate(data: bytes, rng: random.Random, edits: int) -> bytes:
    out = bytearray(data)
    for _ in range(edits):
        if not out:
            break
        i = rng.randrange(len(out))
        kind = rng.randrange(4)
        if kind == 0:
            out[i] = rng.randrange(256)
        elif kind == 1:
            del out[i]
        elif kind == 2:
            out.insert(i, rng.randrange(256))
        else:
            del out[i:]
    return bytes(out)


_SUBPROCESS_PROBE = textwrap.dedent(
    """
    import resource, sys
    sys.path.insert(0, {root!r})
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from trtcal.errors import TrtcalError
    try:
        {call}
        print("ACCEPTED")
    except TrtcalError as exc:
        print("REFUSED")
    except BaseException as exc:
        print("CRASH", type(exc).__name__, str(exc)[:100])
    """
)


def _in_subprocess(call: str, timeout: float = 20.0) -> None:
    code = _SUBPROCESS_PROBE.format(root=str(REPO_ROOT), call=call)
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _Hung(f"no answer in {timeout:.0f}s: {call[:80]}") from None
    if result.stdout.startswith("REFUSED"):
        raise TrtcalError("refused in the subprocess")
    if not result.stdout.startswith("ACCEPTED"):
        raise RuntimeError((result.stdout + result.stderr)[-200:])


def phase_hostile(work: Path, scale: int) -> dict[str, Any]:
    from PIL import Image

    from trtcal.batch import batch_from_numpy, open_batch, write_batch
    from trtcal.core.cache_format import read_trt_cache
    from trtcal.orchestrator.calibrate import calibrate
    from trtcal.storage.index import parse_index_name
    from trtcal.storage.manifest import parse_manifest
    from trtcal.storage.names import check_artifact_name, check_key, check_namespace
    from trtcal.workers.preprocess import preprocess_image_bytes, preset

    rng = random.Random(20261126)
    tally = _Tally()
    inputs = {"model_sha256": "ab" * 32, "algorithm": "entropy2"}
    key = compute_cache_key(inputs)
    store = CacheStore(str(work / "hostile-store"))
    manifest = json.dumps(store.publish(key, {"calibration.cache": b"TRT-100300-EntropyCalibration2\nx: 3c010a14\n"},
                                         key_inputs=inputs).manifest).encode()
    for _ in range(20 * scale):
        data = _mutate(manifest, rng, rng.randint(1, 8))
        tally.run("manifest (mutated bytes)", lambda d=data: parse_manifest(d, key=key, namespace="default"))
    for depth in (1000, 100_000):
        tally.run("manifest (nesting bomb)", lambda n=depth: parse_manifest(b"[" * n + b"]" * n, key=key, namespace="default"))
    for _ in range(scale):
        name = "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randint(0, 20)))
        tally.run("index marker name", lambda n=name: parse_index_name(n) or (_ for _ in ()).throw(TrtcalError("not a marker")))
    cache = b"TRT-100300-EntropyCalibration2\ninput: 3c010a14\nconv1: 3d4ccccd\n"
    for _ in range(10 * scale):
        data = _mutate(cache, rng, rng.randint(1, 6))
        tally.run("TensorRT cache", lambda d=data: read_trt_cache(d))
    hostile_names = ["..", "../x", "/etc/passwd", "x\x00y", "x\ny", "a" * 5000, "名前", "\u202etxt", "x%2f..", "-rf", ""]
    for _ in range(scale):
        hostile_names.append("".join(chr(rng.randrange(0, 0x250)) for _ in range(rng.randint(0, 30))))
    for name in hostile_names:
        for check in (check_key, check_namespace, check_artifact_name):
            tally.run("names (key/namespace/artifact)", lambda c=check, n=name: c(n))
    batch_path = work / "valid.arrow"
    write_batch(batch_path, {"input": tiny_batch(4)}, [f"s{i}" for i in range(4)], spec={"preset": "raw"})
    valid = batch_path.read_bytes()
    for i in range(3 * scale):
        path = work / f"fuzz-{i % 4}.arrow"
        path.write_bytes(_mutate(valid, rng, rng.randint(1, 6)))

        def open_it(p: Path = path) -> None:
            with open_batch(p) as batch:
                batch.verify()

        tally.run("Arrow batch", open_it)
    for i in range(3 * scale):
        dims = tuple(rng.choice([0, 1, 3, 7, 2**20, 2**31, 2**40, 2**62]) for _ in range(rng.randint(0, 4)))
        dtype = rng.choice(["<f4", "|O", "<f8", "|V8", "<U4", "bogus"])
        header = f"{{'descr': {dtype!r}, 'fortran_order': False, 'shape': {dims!r}, }}".encode()
        header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
        path = work / f"fuzz-{i % 4}.npy"
        path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00" * 64)
        tally.run(".npy header", lambda p=path: batch_from_numpy(str(p), input_name="input"))
    spec = preset("imagenet")
    buffer = io.BytesIO()
    Image.new("RGB", (300, 260), (120, 30, 200)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    images = [b"", jpeg[: len(jpeg) // 3], b"not an image", os.urandom(2048)]
    for fmt in ("GIF", "TIFF", "ICO", "PDF"):
        buf = io.BytesIO()
        Image.new("RGB", (300, 260)).save(buf, fmt)
        images.append(buf.getvalue())
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    for w, h in ((2**31 - 1, 2**31 - 1), (100_000, 100_000), (65_535, 65_535)):
        images.append(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
                      chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    for _ in range(scale):
        images.append(_mutate(jpeg, rng, rng.randint(1, 10)))
    for data in images:
        tally.run("image bytes", lambda d=data: preprocess_image_bytes(d, spec))
    for width in (100_000, 20_000_000):  # tiny files, huge after resizing the shorter side to 256
        tally.run("image (extreme aspect ratio)", lambda w=width: _in_subprocess(
            "import io; from PIL import Image; from trtcal.workers.preprocess import preprocess_image_bytes, preset; "
            f"b = io.BytesIO(); Image.new('RGB', ({w}, 1)).save(b, 'PNG'); preprocess_image_bytes(b.getvalue(), preset('imagenet'))"))
    np.save(work / "b.npy", tiny_batch(4))
    for i in range(max(2, scale // 10)):
        path = work / f"garbage-{i}.onnx"
        path.write_bytes(os.urandom(rng.randint(0, 4096)))
        tally.run("ONNX model (garbage)", lambda p=path: calibrate(str(p), str(work / "b.npy"), output_dir=work / "never"))
    from onnx import TensorProto

    for location in ("../../../../etc/passwd", "/etc/passwd", "../secret.bin"):
        model = tiny_cnn()
        init = model.graph.initializer[0]
        n = len(init.raw_data)
        init.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", str(n))):
            e = init.external_data.add()
            e.key, e.value = k, v
        init.ClearField("raw_data")
        folder = work / "ext" / hashlib.sha256(location.encode()).hexdigest()[:8]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "m.onnx").write_bytes(model.SerializeToString())
        tally.run("ONNX external data outside", lambda f=folder: calibrate(str(f / "m.onnx"), str(work / "b.npy"), output_dir=work / "never"))
    folder = work / "ext" / "devzero"
    folder.mkdir(parents=True, exist_ok=True)
    tally.run("ONNX external data outside", lambda: _in_subprocess(
        "from pathlib import Path; from onnx import TensorProto; from tests.reliability.test_bad_input import _with_external_weight; "
        f"from trtcal.model import load_model; p = Path({str(folder)!r}) / 'm.onnx'; "
        "p.write_bytes(_with_external_weight('/dev/zero').SerializeToString()); load_model(str(p))", timeout=15))
    marker = work / "EXECUTED"
    np.save(work / "obj.npy", np.array([_Planted(str(marker))], dtype=object), allow_pickle=True)
    import pickle

    (work / "pickle.arrow").write_bytes(pickle.dumps(_Planted(str(marker))))
    for name in ("obj.npy", "pickle.arrow"):
        tally.run("planted pickle", lambda n=name: calibrate(str(tiny_path(work)), str(work / n), output_dir=work / "never"))
    totals = {k: sum(r[k] for r in tally.rows.values()) for k in ("tried", "refused", "accepted", "crashed", "hung")}
    out = {"by_category": tally.rows, "totals": totals, "crash_examples": tally.crashes, "pickle_executed": marker.exists()}
    for category, row in tally.rows.items():
        _say(f"[hostile] {category}: {row}" + (f"  e.g. {tally.crashes[category][0]}" if category in tally.crashes else ""))
    _say(f"[hostile] total: {totals}; planted pickle executed: {marker.exists()}")
    return out


class _Planted:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def tiny_path(work: Path) -> Path:
    path = work / "tiny-hostile.onnx"
    if not path.exists():
        path.write_bytes(tiny_cnn(0).SerializeToString())
    return path


# --- main ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="trtcal-stress-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="concurrent tiny-CNN calibration jobs (plus 2 EfficientNet-Lite0)")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--entries", type=int, default=6, help="publishes per writer in the storm")
    parser.add_argument("--fault-share", type=float, default=0.2, help="share of S3 requests answered with a fault")
    parser.add_argument("--scale", type=int, default=100, help="fuzz cases per hostile-input category (x1 to x20)")
    parser.add_argument("--phases", default="jobs,storm,bounds,hostile,redteam")
    parser.add_argument("--long", action="store_true", help="also time the slowest persistent faults (~5 min more)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    phases = set(args.phases.split(","))
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "command": "bench/stress.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    started = time.perf_counter()
    with _workdir() as work, running_server(work / "s3", graceful=False) as server:
        if "jobs" in phases:
            (work / "jobs").mkdir()
            report["jobs"] = phase_jobs(server, work / "jobs", args.jobs)
        if "storm" in phases:
            report["storm"] = phase_storm(server, args.writers, args.entries, args.fault_share)
        if "bounds" in phases:
            report["bounds"] = phase_bounds(server, work, args.long)
        if "hostile" in phases:
            (work / "hostile").mkdir()
            report["hostile"] = phase_hostile(work / "hostile", args.scale)
        if "redteam" in phases:
            from bench.redteam import run_redteam

            (work / "redteam").mkdir()
            _say("phase redteam: issue 15's traps")
            report["redteam"] = run_redteam(work / "redteam")
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["peak_rss_mib_of_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    lost = report.get("jobs", {}).get("entries_lost", 0) + report.get("storm", {}).get("entries_lost", 0)
    redteam_bad = sum(v for k, v in report.get("redteam", {}).get("counts", {}).items() if k != "ok")
    _say(f"entries lost: {lost}; red-team cases not ok: {redteam_bad}; total wall {report['wall_s']}s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    return 0 if lost == 0 and redteam_bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
