"""Real faults: the S3 server killed mid-upload, permission denied, a file where a directory belongs,
wrong credentials; and credentials never leaking into messages, logs or manifests.

(Truncated artifacts, flipped bytes and manifests pointing outside the root are in the contract
suite, tests/contract/test_cache_store.py, on every backend.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from trtcal.errors import ConfigError, ReadOnlyStoreError, StorageError
from trtcal.storage import CacheStore, compute_cache_key

INPUTS = {"model_sha256": hashlib.sha256(b"model").hexdigest(), "algorithm": "entropy2"}
KEY = compute_cache_key(INPUTS)
CACHE = b"TRT-100300-EntropyCalibration2\ninput: 3c010a14\n"


# The S3 server dies while a large artifact is streaming


@pytest.mark.slow
def test_s3_server_killed_mid_upload_leaves_no_visible_entry(s3_private_server: Any, tmp_path: Path) -> None:
    server = s3_private_server
    bucket = server.create_bucket()
    # One attempt per request and short timeouts, so the dead server is noticed in seconds.
    options = server.storage_options(
        default_block_size=5 << 20, config_kwargs={"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 1}}
    )
    store = CacheStore(f"s3://{bucket}/calib", **options)
    # The large artifact comes through a pipe, so the server is killed at a known point of the stream:
    # after 12 MiB were consumed (two 5 MiB parts uploaded), before the rest was even produced.
    pipe = tmp_path / "samples.arrow"
    os.mkfifo(pipe)
    fed: dict[str, Any] = {}

    def feed() -> None:
        try:
            with open(pipe, "wb") as f:
                f.write(os.urandom(12 << 20))
                server.kill()
                fed["killed"] = True
                for _ in range(20):
                    f.write(os.urandom(1 << 20))
        except BrokenPipeError:
            fed["reader_gone"] = True  # the publisher gave up and closed its end: expected

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        with pytest.raises(StorageError) as info:
            store.publish(KEY, {"calibration.cache": CACHE, "samples.arrow": pipe}, key_inputs=INPUTS)
        feeder.join(timeout=60)
        assert fed == {"killed": True, "reader_gone": True}
        assert "samples.arrow" in str(info.value)
        assert server.secret not in str(info.value) and server.key not in str(info.value)
    finally:
        server.restart()

    fresh = CacheStore(f"s3://{bucket}/calib", **server.storage_options())
    assert fresh.get(KEY) is None  # nothing half-written is visible
    assert fresh.ls() == []
    # calibration.cache was staged before the crash and the publisher could not clean up: an orphan for gc.
    assert fresh.gc().kept_recent_orphans == 1
    report = fresh.gc(orphan_grace=timedelta(0))
    assert len(report.removed_orphans) == 1
    # The store works again, and the key publishes cleanly.
    samples = tmp_path / "samples-2.arrow"
    samples.write_bytes(os.urandom(6 << 20))
    entry = fresh.publish(KEY, {"calibration.cache": CACHE, "samples.arrow": samples}, key_inputs=INPUTS)
    assert entry.read("calibration.cache") == CACHE
    assert fresh.get(KEY) is not None


# Permission denied on a local store (tests run as root, for whom chmod denies nothing)


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[str]:
    """Make `directory` refuse new entries: chmod for a normal user; for root, the immutable attribute."""
    if os.geteuid() != 0:
        mode = directory.stat().st_mode
        directory.chmod(0o555)
        try:
            yield "chmod 555"
        finally:
            directory.chmod(mode)
        return
    chattr = shutil.which("chattr")
    result = subprocess.run([chattr, "+i", str(directory)], capture_output=True, text=True) if chattr else None
    if result is None or result.returncode != 0:
        pytest.skip(f"running as root and cannot set the immutable attribute here: {result.stderr if result else 'no chattr'}")
    try:
        yield "chattr +i"
    finally:
        subprocess.run([chattr, "-i", str(directory)], check=True)  # type: ignore[list-item]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_permission_denied_when_staging_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = CacheStore(str(root))
    old_inputs = {**INPUTS, "algorithm": "minmax"}
    store.publish(compute_cache_key(old_inputs), {"calibration.cache": CACHE}, key_inputs=old_inputs)
    before = _files(root)
    with unwritable(root / "v1" / "default" / "artifacts"):
        with pytest.raises(StorageError, match="permission denied") as info:
            store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS)
        assert str(root) in str(info.value)
        assert store.get(compute_cache_key(old_inputs)) is not None  # reading still works
        assert store.get(KEY) is None
    assert _files(root) == before


def test_permission_denied_at_commit_removes_the_staged_artifacts(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = CacheStore(str(root))
    old_inputs = {**INPUTS, "algorithm": "minmax"}
    store.publish(compute_cache_key(old_inputs), {"calibration.cache": CACHE}, key_inputs=old_inputs)
    before = _files(root)
    with unwritable(root / "v1" / "default" / "entries"):
        with pytest.raises(StorageError, match="permission denied"):
            store.publish(KEY, {"calibration.cache": CACHE, "big.bin": os.urandom(1 << 20)}, key_inputs=INPUTS)
    assert _files(root) == before  # the staged artifacts were removed again
    assert store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS).read("calibration.cache") == CACHE


def test_file_where_the_store_expects_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / "v1").write_text("not a directory")
    store = CacheStore(str(root))
    with pytest.raises(StorageError, match="file is in the way"):
        store.get(KEY)
    with pytest.raises(StorageError, match="file is in the way"):
        store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS)
    with pytest.raises(StorageError):
        store.ls()
    assert (root / "v1").read_text() == "not a directory"


def test_protocols_without_atomic_create_are_read_only() -> None:
    store = CacheStore("http://127.0.0.1:9/calib")
    assert store.read_only
    with pytest.raises(ReadOnlyStoreError, match="create-only"):
        store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS)


# Credentials


def test_wrong_credentials_fail_clearly_without_showing_them(s3_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    bucket = s3_server.create_bucket()
    wrong = "WRONG-secret-value-123"
    store = CacheStore(f"s3://{bucket}/c", **s3_server.storage_options(secret=wrong))
    with caplog.at_level(logging.DEBUG, logger="trtcal"):
        with pytest.raises(StorageError) as get_error:
            store.get(KEY)
        with pytest.raises(StorageError) as put_error:
            store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS)
    for text in (str(get_error.value), str(put_error.value), get_error.value.url, caplog.text, repr(store), repr(store.config)):
        assert wrong not in text and s3_server.key not in text
    assert "permission denied" in str(put_error.value) or "Forbidden" in str(put_error.value) or "denied" in str(put_error.value)


def test_credentials_are_never_written_into_a_manifest(s3_server: Any) -> None:
    store = CacheStore(f"s3://{s3_server.create_bucket()}/c", **s3_server.storage_options())
    with pytest.raises(ConfigError, match="credential"):
        store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS, extra={"debug": f"secret={s3_server.secret}"})
    inputs = {**INPUTS, "note": s3_server.key}
    with pytest.raises(ConfigError, match="credential"):
        store.publish(compute_cache_key(inputs), {"calibration.cache": CACHE}, key_inputs=inputs)
    entry = store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS, extra={"ok": 1})
    manifest_text = str(entry.manifest)
    assert s3_server.secret not in manifest_text and s3_server.key not in manifest_text


def test_aws_endpoint_url_environment_variable_is_honoured(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.create_bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    store = CacheStore(f"s3://{bucket}/c")  # no storage options at all: endpoint and keys from the environment
    store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS)
    hit = CacheStore(f"s3://{bucket}/c").get(KEY)
    assert hit is not None and hit.read("calibration.cache") == CACHE
