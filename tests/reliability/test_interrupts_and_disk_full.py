"""The driver interrupted (SIGINT, SIGTERM) while publishing, and the local disk full.

Real processes (`python -m trtcal …` children signalled by PID), a real S3 server behind a loopback
proxy that holds one upload so the signal lands mid-publish, a real 2 MiB tmpfs (we run as root;
the tests skip, saying so, where mounting is not permitted). After every fault: the store holds no
partial entry, nothing of the run is left running, and running again works.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.reliability.netfault import FaultProxy, Rule
from tests.reliability.rayhead import session_pids
from tests.reliability.tiny_cnn import tiny_batch, write_tiny_cnn
from trtcal.errors import StorageError, TrtcalError
from trtcal.storage import CacheStore, compute_cache_key

REPO_ROOT = Path(__file__).resolve().parents[2]
INPUTS = {"model_sha256": hashlib.sha256(b"interrupt-model").hexdigest(), "algorithm": "minmax"}
KEY = compute_cache_key(INPUTS)
CACHE = b"TRT-100300-MinMaxCalibration\ninput: 3c010a14\n"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _assert_nothing_left_running(sid: int) -> None:
    deadline = time.monotonic() + 20
    left = session_pids(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.3)
        left = session_pids(sid)
    for pid in left:  # only processes of the session our child started
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the interrupted run outlived it (killed now): {left}"


def _store_files(store_root: Path) -> list[str]:
    return sorted(str(p.relative_to(store_root)) for p in store_root.rglob("*") if p.is_file())


# --- a publish signalled while it streams an artifact ---------------------------------------------

# `trtcal cache put` takes regular files only (a FIFO could hang it), so the child publishes through
# the API, which streams a FIFO the caller feeds: the signal lands at a known point of the upload.
_PUBLISH_CHILD = """
import json, sys
from pathlib import Path
from trtcal.storage import CacheStore, compute_cache_key
url, options, inputs, cache, pipe = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
try:
    CacheStore(url, **options).publish(compute_cache_key(inputs), {"calibration.cache": Path(cache), "batch.arrow": Path(pipe)},
                                       key_inputs=inputs)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_publish_signalled_mid_upload_leaves_no_entry(kind: str, signum: int, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "local":
        url, options = str(tmp_path / "store"), {}
    else:
        server = request.getfixturevalue("s3_server")
        url, options = f"s3://{server.create_bucket()}/calib", server.storage_options()
    (tmp_path / "calibration.cache").write_bytes(CACHE)
    pipe = tmp_path / "batch.arrow"
    os.mkfifo(pipe)
    argv = [sys.executable, "-c", _PUBLISH_CHILD, url, json.dumps(options), json.dumps(INPUTS), str(tmp_path / "calibration.cache"),
            str(pipe)]
    child = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, cwd=tmp_path)
    with open(pipe, "wb") as feed:  # blocks until the child opens the pipe: it is publishing now
        feed.write(os.urandom(6 << 20))  # one 5 MiB part is uploaded on S3
        time.sleep(1.0)
        child.send_signal(signum)
        try:
            stdout, stderr = child.communicate(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
    _assert_nothing_left_running(child.pid)
    if signum == signal.SIGINT:
        assert child.returncode == 130, stderr
        assert b"interrupted" in stderr and b"Traceback" not in stderr
    else:
        assert child.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM, 143), stderr
    store = CacheStore(url, **options)
    assert store.get(KEY) is None and store.ls() == [] and store.verify() == []
    report = store.gc(orphan_grace=timedelta(0))
    # SIGINT unwinds (the publisher removes its staging files); SIGTERM's default action does not:
    # locally the half-written file stays as an orphan for gc; on S3 the unfinished multipart upload
    # is invisible to listings (a bucket lifecycle rule aborts it, see docs/storage.md).
    assert len(report.removed_orphans) == (1 if signum == signal.SIGTERM and kind == "local" else 0)
    (tmp_path / "inputs.json").write_text(json.dumps(INPUTS))
    cli_options = [] if kind == "local" else [
        "--storage-option", f"endpoint_url={server.endpoint_url}", "--storage-option", f"key={server.key}",
        "--storage-option", f"secret={server.secret}"]
    again = subprocess.run(  # `trtcal cache put` without the stream: room for a clean publish
        [sys.executable, "-m", "trtcal", "cache", "put", url, *cli_options, "--key-inputs", str(tmp_path / "inputs.json"),
         str(tmp_path / "calibration.cache")], env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    hit = store.get(KEY)
    assert hit is not None and hit.read("calibration.cache") == CACHE
    if kind == "s3":
        for text in (stderr.decode(), again.stderr, again.stdout):
            assert server.secret not in text and server.key not in text


# --- `trtcal calibrate` signalled while it publishes its entry ------------------------------------


@pytest.mark.slow
def test_calibrate_signalled_during_publish_leaves_no_entry_and_a_rerun_gives_identical_bytes(s3_server: Any, tmp_path: Path) -> None:
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    np.save(tmp_path / "batch.npy", tiny_batch(16))
    published: dict[str, dict[str, Any]] = {}
    with FaultProxy(s3_server.endpoint_url) as proxy:
        for signum in (signal.SIGINT, signal.SIGTERM):
            bucket = s3_server.create_bucket()
            url = f"s3://{bucket}/calib"
            argv = [sys.executable, "-m", "trtcal", "calibrate", str(model), "--data", str(tmp_path / "batch.npy"),
                    "--store", url, "--storage-option", f"endpoint_url={proxy.url}", "--workers", "1", "--device", "cpu",
                    "-a", "minmax", "-a", "entropy2", "--json"]
            env = _env(AWS_ACCESS_KEY_ID=s3_server.key, AWS_SECRET_ACCESS_KEY=s3_server.secret)
            held = proxy.add(Rule("hold", method="PUT", path=r"/artifacts/.*/ranges\.json$", times=1, hold_s=300))
            child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, cwd=tmp_path)
            try:
                assert held.arrived.wait(180), "the calibration never reached its publish"
                child.send_signal(signum)
                stdout, stderr = child.communicate(timeout=120)
            finally:
                held.release()  # the held upload now reaches the server: a staged orphan, never an entry
                if child.poll() is None:
                    child.kill()
                    child.wait()
            _assert_nothing_left_running(child.pid)
            assert child.returncode != 0, stdout
            if signum == signal.SIGINT:
                assert child.returncode == 130 and b"Traceback" not in stderr, stderr[-3000:]
            direct = CacheStore(url, **s3_server.storage_options())
            assert direct.ls() == [] and direct.verify() == []  # no entry, complete or partial
            assert direct.gc(orphan_grace=timedelta(0)).removed_orphans  # what was staged is only an orphan
            rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
            assert rerun.returncode == 0, rerun.stderr[-3000:]
            result = json.loads(rerun.stdout)
            assert result["cache_hit"] is False and result["published"] is True
            entry = direct.get(result["key"])
            assert entry is not None
            published[signal.Signals(signum).name] = {
                n: r["sha256"] for n, r in entry.manifest["artifacts"].items() if n != "run.json"  # run.json holds timings
            }
            for text in (stderr.decode(errors="replace"), rerun.stderr, rerun.stdout):
                assert s3_server.secret not in text and s3_server.key not in text
    assert published["SIGINT"] == published["SIGTERM"]  # both reruns: the same key, the same artifact bytes
    assert {"calibration.cache", "ranges.json", "model.qdq.onnx"} <= set(published["SIGINT"])


# --- the local disk full -------------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs, mounted for this test and unmounted after it."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to create a 2 MiB tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_local_store_on_a_full_disk_fails_clearly_and_publishes_nothing(small_disk: Path) -> None:
    root = small_disk / "store"
    store = CacheStore(str(root))
    small_inputs = {**INPUTS, "algorithm": "entropy2"}
    store.publish(compute_cache_key(small_inputs), {"calibration.cache": CACHE}, key_inputs=small_inputs)
    before = _store_files(root)
    # 1. The artifact itself does not fit.
    with pytest.raises(StorageError, match="No space left on device") as info:
        store.publish(KEY, {"calibration.cache": CACHE, "model.qdq.onnx": os.urandom(3 << 20)}, key_inputs=INPUTS)
    assert str(root) in str(info.value)
    assert _store_files(root) == before and store.get(KEY) is None
    # 2. The artifacts fit exactly; the commit (the manifest) finds no room.
    page = os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (_free_bytes(small_disk) - 2 * page))
    assert _free_bytes(small_disk) == 2 * page
    with pytest.raises(StorageError, match="No space left on device"):
        store.publish(KEY, {"model.qdq.onnx": os.urandom(2 * page)}, key_inputs=INPUTS)
    assert _store_files(root) == before and store.get(KEY) is None
    assert _free_bytes(small_disk) == 2 * page  # the staged artifact was removed again
    # Room again: the same publish works, and the earlier entry never suffered.
    filler.unlink()
    entry = store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS)
    assert entry.read("calibration.cache") == CACHE
    assert [r.ok for r in store.verify()] == [True, True]


@pytest.mark.slow
def test_disk_full_while_writing_the_batch_is_a_clear_error_and_nothing_is_published(
    ray_local: Any, small_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`calibrate_dataset` builds its Arrow batch in the temp dir: put that on the full disk."""
    import tempfile

    from tests.unit.workers.images import write_photo_folder
    from trtcal.orchestrator.job import calibrate_dataset

    data = tmp_path / "photos"
    write_photo_folder(data, classes={"a": ("astronaut", "coffee", "chelsea", "rocket"), "b": ("camera", "coins", "moon", "clock")})
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    store_url = str(tmp_path / "store")
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    # 8 samples at 224x224x3 float32 = 4.6 MiB: more than the 2 MiB disk (the batch fails before the
    # model's 32x32 input is ever compared with it).
    with pytest.raises(TrtcalError) as info:
        calibrate_dataset(str(model), str(data), store=store_url, num_samples=8, preprocess="imagenet", workers=2, device="cpu")
    assert "space" in str(info.value).lower(), str(info.value)
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert [p for p in small_disk.rglob("*") if p.is_file()] == []  # no temp batch left on the disk
    assert CacheStore(store_url).ls() == []


def test_batch_writer_on_a_full_disk_raises_a_trtcal_error(small_disk: Path) -> None:
    from trtcal.batch import write_batch

    rows = np.zeros((8, 3, 224, 224), np.float32)  # 4.6 MiB
    with pytest.raises(TrtcalError, match="space"):
        write_batch(small_disk / "batch.arrow", {"input": rows}, [f"s{i}" for i in range(8)], spec={"preset": "raw"})
    assert [p for p in small_disk.rglob("*") if p.is_file()] == []


def _calibrate_onto_full_output(ray_local: Any, small_disk: Path, tmp_path: Path) -> tuple[BaseException, Path, str]:
    """Publish to a roomy store, then copy the artifacts out to a nearly full disk."""
    from trtcal.orchestrator.job import calibrate_dataset

    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    np.save(tmp_path / "batch.npy", tiny_batch(8))
    store_url = str(tmp_path / "store")
    (small_disk / "filler").write_bytes(b"\0" * (_free_bytes(small_disk) - 2 * os.statvfs(small_disk).f_frsize))
    output = small_disk / "out"
    with pytest.raises(BaseException) as info:
        calibrate_dataset(str(model), str(tmp_path / "batch.npy"), store=store_url, device="cpu", output=str(output))
    return info.value, output, store_url


def test_output_folder_on_a_full_disk_is_never_half_written(ray_local: Any, small_disk: Path, tmp_path: Path) -> None:
    error, output, store_url = _calibrate_onto_full_output(ray_local, small_disk, tmp_path)
    assert "space" in str(error).lower(), error
    assert not output.exists()
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no temp folder left beside it
    entries = CacheStore(store_url).ls()
    assert len(entries) == 1 and CacheStore(store_url).verify()[0].ok  # the store entry is whole


def test_output_folder_on_a_full_disk_is_a_trtcal_error(ray_local: Any, small_disk: Path, tmp_path: Path) -> None:
    error, _output, _store_url = _calibrate_onto_full_output(ray_local, small_disk, tmp_path)
    assert isinstance(error, TrtcalError), repr(error)


def test_a_planned_batch_larger_than_the_free_space_fails_before_any_row(small_disk: Path) -> None:
    """PlannedBatchWriter reserves the whole file (posix_fallocate): a full disk is refused before
    any preprocessing work is spent, and nothing is left on the disk."""
    from trtcal.batch import InputInfo, PlannedBatchWriter

    ids = [f"{i:09d}" for i in range(8)]
    with pytest.raises(StorageError, match="space") as info:
        PlannedBatchWriter(small_disk / "b.arrow", sample_ids=ids, inputs=[InputInfo("x", (3, 224, 224), "float32")], spec={})
    assert str(small_disk / "b.arrow") in str(info.value)
    assert [p for p in small_disk.rglob("*") if p.is_file()] == []
