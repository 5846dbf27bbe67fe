"""A real S3 server (SeaweedFS) that dies, comes back, throttles, fails and drops connections.

After every fault either the operation completes with bytes identical to a clean run, or it fails
with a clear StorageError (naming the endpoint, never a credential) and the store holds no partial
entry; afterwards the same operation works.

Not repeated here: the server killed for good mid-upload (tests/unit/storage/test_faults.py).
The server is restarted from the test's main thread: `S3Server` starts it under `setpriv
--pdeathsig`, which would end it as soon as a helper thread that restarted it returned.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.netfault import FaultProxy, Rule
from trtcal.errors import CorruptEntryError, StorageError
from trtcal.storage import CacheStore, compute_cache_key

INPUTS = {"model_sha256": hashlib.sha256(b"reliability-model").hexdigest(), "algorithm": "entropy2"}
KEY = compute_cache_key(INPUTS)
CACHE = b"TRT-100300-EntropyCalibration2\ninput: 3c010a14\nconv1: 3d4ccccd\n"
BIG = 20 << 20  # three 8 MiB reads, four 5 MiB parts


def _big_bytes(seed: int = 0) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, BIG, dtype=np.uint8).tobytes()


@pytest.fixture()
def proxy(s3_private_server: Any) -> Iterator[FaultProxy]:
    with FaultProxy(s3_private_server.endpoint_url) as p:
        yield p


def _store(server: Any, bucket: str, endpoint: str | None = None, **options: Any) -> CacheStore:
    client_kwargs = {"endpoint_url": endpoint or server.endpoint_url}
    return CacheStore(f"s3://{bucket}/calib", **server.storage_options(client_kwargs=client_kwargs, **options))


def _no_secret(server: Any, *texts: str) -> None:
    for text in texts:
        assert server.secret not in text and server.key not in text


@pytest.mark.slow
def test_connection_refused_at_start_names_the_endpoint_and_no_credential() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    key, secret = "AKIDREFUSEDTEST1234", "refused-secret-value-XYZ-987"
    store = CacheStore("s3://bucket/calib", key=key, secret=secret, client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})
    for action in (lambda: store.get(KEY), lambda: store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS)):
        with pytest.raises(StorageError) as info:
            action()
        message = str(info.value)
        assert f"127.0.0.1:{port}" in message and "connect" in message.lower()
        assert key not in message and secret not in message
        assert info.value.__cause__ is None and info.value.__context__ is None or secret not in repr(info.value.__context__)


def test_throttling_5xx_and_dropped_connections_are_retried_to_identical_bytes(s3_private_server: Any, proxy: FaultProxy) -> None:
    server = s3_private_server
    clean_bucket, faulty_bucket = server.create_bucket(), server.create_bucket()
    big = _big_bytes(1)
    artifacts = {"calibration.cache": CACHE, "model.qdq.onnx": big}
    clean = _store(server, clean_bucket).publish(KEY, artifacts, key_inputs=INPUTS)

    store = _store(server, faulty_bucket, endpoint=proxy.url, default_block_size=5 << 20)
    proxy.add(Rule("503", method="PUT", path=r"/calibration\.cache$", times=3))  # SlowDown
    proxy.add(Rule("500", method="PUT", path=r"/model\.qdq\.onnx$", times=2))  # a multipart part
    proxy.add(Rule("reset", method="POST", path=r"/model\.qdq\.onnx$", times=1))  # initiate or complete
    proxy.add(Rule("503", method="PUT", path=r"/entries/", times=2))  # the commit itself
    entry = store.publish(KEY, artifacts, key_inputs=INPUTS)
    assert [r.matched for r in proxy.rules] == [3, 2, 1, 2]  # every fault was really injected
    assert entry.manifest["artifacts"] == clean.manifest["artifacts"]
    assert len(proxy.seen("PUT", r"/entries/")) == 3  # two throttled attempts, then the commit

    proxy.clear()
    proxy.add(Rule("503", method="GET", path=r"/entries/", times=2))
    proxy.add(Rule("reset", method="GET", path=r"/model\.qdq\.onnx$", times=1))
    proxy.add(Rule("500", method="GET", path=r"/calibration\.cache$", times=1))
    hit = _store(server, faulty_bucket, endpoint=proxy.url).get(KEY)
    assert hit is not None and [r.matched for r in proxy.rules] == [2, 1, 1]
    assert hit.read("model.qdq.onnx") == big and hit.read("calibration.cache") == CACHE
    # Exactly one entry, nothing orphaned by the retried uploads.
    direct = _store(server, faulty_bucket)
    assert [i.key for i in direct.ls()] == [KEY]
    assert direct.gc(orphan_grace=timedelta(0)).removed_orphans == []


@pytest.mark.slow
def test_persistent_errors_fail_after_bounded_retries_and_leave_no_entry(s3_private_server: Any, proxy: FaultProxy) -> None:
    server = s3_private_server
    bucket = server.create_bucket()
    store = _store(server, bucket, endpoint=proxy.url)
    proxy.add(Rule("503", method="GET", times=None))
    with pytest.raises(StorageError, match="cannot read s3://") as info:
        store.get(KEY)
    _no_secret(server, str(info.value))
    attempts = len(proxy.seen("GET"))
    assert 2 <= attempts <= 30  # retried, and not forever

    proxy.clear()
    proxy.add(Rule("500", method="PUT", times=None))
    with pytest.raises(StorageError, match="cannot write s3://") as info:
        store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS)
    _no_secret(server, str(info.value))
    assert 2 <= len(proxy.seen("PUT")) <= 30

    proxy.clear()
    assert store.get(KEY) is None and store.ls() == []
    assert store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS).read("calibration.cache") == CACHE


@pytest.mark.slow
def test_server_killed_and_restarted_mid_upload_completes_with_identical_bytes(s3_private_server: Any, tmp_path: Path) -> None:
    server = s3_private_server
    bucket = server.create_bucket()
    big = _big_bytes(2)
    store = _store(server, bucket, default_block_size=5 << 20)
    pipe = tmp_path / "batch.arrow"
    os.mkfifo(pipe)
    two_parts_sent, server_back = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def feed() -> None:
        with open(pipe, "wb") as f:
            f.write(big[: 12 << 20])  # two 5 MiB parts are uploaded from this
            two_parts_sent.set()
            server_back.wait(120)
            f.write(big[12 << 20 :])

    def publish() -> None:
        try:
            outcome["entry"] = store.publish(KEY, {"calibration.cache": CACHE, "batch.arrow": pipe}, key_inputs=INPUTS)
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=publish, daemon=True)]
    for t in threads:
        t.start()
    try:
        assert two_parts_sent.wait(120)
        server.kill()
        server.restart()  # same ports, same data directory; the multipart upload id survives
    finally:
        server_back.set()
        for t in threads:
            t.join(timeout=180)
    assert "error" not in outcome, outcome.get("error")
    fresh = _store(server, bucket)
    hit = fresh.get(KEY)
    assert hit is not None and hit.read("batch.arrow") == big
    assert hit.manifest["artifacts"]["batch.arrow"]["sha256"] == hashlib.sha256(big).hexdigest()
    assert fresh.gc(orphan_grace=timedelta(0)).removed_orphans == []


@pytest.mark.slow
@pytest.mark.parametrize("comes_back", [True, False], ids=["restarted", "stays-down"])
def test_server_killed_mid_download(s3_private_server: Any, proxy: FaultProxy, tmp_path: Path, comes_back: bool) -> None:
    """The second 8 MiB read of a download is held at the proxy while the server is killed: with the
    server back, the download completes verified; with it gone, a clear error and no file at all."""
    server = s3_private_server
    bucket = server.create_bucket()
    big = _big_bytes(3)
    _store(server, bucket).publish(KEY, {"calibration.cache": CACHE, "batch.arrow": big}, key_inputs=INPUTS)
    # One botocore attempt per s3fs try: with the server gone for good the defaults keep retrying for
    # about 190 s (measured by bench/stress.py); the outcome is the same, only sooner.
    # With the server back, the defaults stay: a SeaweedFS just restarted may answer 500 for a moment,
    # which botocore's retries absorb.
    fast = {} if comes_back else {"config_kwargs": {"connect_timeout": 2, "retries": {"max_attempts": 1}}}
    entry = _store(server, bucket, endpoint=proxy.url, **fast).get(KEY, lazy=True)
    assert entry is not None
    first = proxy.add(Rule("hold", method="GET", path=r"/batch\.arrow$", times=1, hold_s=0))  # the first read passes
    second = proxy.add(Rule("hold", method="GET", path=r"/batch\.arrow$", times=1, hold_s=120))
    first.release()
    dest = tmp_path / "out"
    dest.mkdir()
    outcome: dict[str, Any] = {}

    def download() -> None:
        try:
            outcome["path"] = entry.download("batch.arrow", dest)
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    thread = threading.Thread(target=download, daemon=True)
    thread.start()
    try:
        assert second.arrived.wait(120)
        server.kill()
        if comes_back:
            server.restart()
        second.release()
        thread.join(timeout=600)
    finally:
        second.release()
        if not comes_back:
            server.restart()
    if comes_back:
        assert "error" not in outcome, outcome.get("error")
        assert Path(outcome["path"]).read_bytes() == big
        assert sorted(p.name for p in dest.iterdir()) == ["batch.arrow"]
    else:
        error = outcome.get("error")
        assert isinstance(error, (StorageError, CorruptEntryError)), error
        _no_secret(server, str(error))
        assert list(dest.iterdir()) == []  # no partial file, no temp file
        assert entry.download("batch.arrow", dest).read_bytes() == big  # the server is back: it works again
