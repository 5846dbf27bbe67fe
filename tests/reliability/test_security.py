"""Nothing from a store or dataset is executed or unpickled; credentials appear nowhere trtcal writes;
a read-only consumer cannot write.

The credential test runs a full `trtcal -vv calibrate` (S3 dataset, S3 store, a Ray head of its own so
Ray's logs stay for inspection) with a planted access key, secret and Ray token, then searches every
byte written: stdout, stderr, every object in the buckets, the output folder, the Ray session's logs
and trtcal's cache dir.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.s3 import S3Server
from tests.reliability.rayhead import RayHead, client_env, ray_head
from tests.reliability.tiny_cnn import tiny_batch, tiny_cnn, write_tiny_cnn
from trtcal.errors import ConfigError, DataError, ReadOnlyStoreError, StorageError, TrtcalError
from trtcal.storage import CacheStore

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "trtcal"

# --- static: no path from data to code ------------------------------------------------------------

# (module, call) pairs that would run code from bytes; each allowed use is named with its reason.
_DANGEROUS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("marshal", "loads"), ("marshal", "load"),
    ("shelve", "open"), ("dill", "load"), ("dill", "loads"), ("cloudpickle", "loads"), ("torch", "load"),
    ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("joblib", "load"),
}
_ALLOWED = {
    # Round-trips an exception trtcal itself raised, to see whether it can cross its own worker pipe.
    ("trtcal/runners/data_parallel.py", "pickle.loads"),
    # The restricted checkpoint reader: an Unpickler subclass whose find_class allows a fixed set of
    # torch rebuild functions, after an opcode walk (tests/unit/test_pth_reader.py attacks it).
    ("trtcal/demo/_pth.py", "pickle.Unpickler"),
}


def _calls(tree: ast.AST) -> Iterator[tuple[ast.AST, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            yield node, f"{node.value.id}.{node.attr}"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec", "compile", "__import__"):
            yield node, node.func.id


def test_no_code_path_deserialises_or_executes_data() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(REPO_ROOT))
        tree = ast.parse(path.read_text(), filename=rel)
        for node, name in _calls(tree):
            module, _, attr = name.partition(".")
            if (module, attr) in _DANGEROUS or name in ("eval", "exec", "compile", "__import__"):
                if (rel, name) not in _ALLOWED:
                    found.append(f"{rel}:{getattr(node, 'lineno', '?')} {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "numpy"):
                pickle_kw = [k for k in node.keywords if k.arg == "allow_pickle"]
                if not pickle_kw or not (isinstance(pickle_kw[0].value, ast.Constant) and pickle_kw[0].value.value is False):
                    found.append(f"{rel}:{node.lineno} np.load without allow_pickle=False")
            if isinstance(node, ast.Call) and any(k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value
                                                  for k in node.keywords):
                found.append(f"{rel}:{node.lineno} subprocess with shell=True")
    assert found == []


def test_user_code_is_imported_only_when_named_by_preprocess() -> None:
    """importlib.import_module appears in two places: the CLI's own subcommands (trtcal.cli.cmd_*) and
    the `--preprocess package.module:function` loader."""
    users = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(REPO_ROOT))
        for _node, name in _calls(ast.parse(path.read_text())):
            if name in ("importlib.import_module", "importlib.__import__"):
                users.append(rel)
    assert sorted(set(users)) == ["trtcal/cli/__init__.py", "trtcal/workers/preprocess.py"]


# --- planted pickles --------------------------------------------------------------------------------


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_planted_as_a_stored_batch_is_never_unpickled(ray_local: Any, tmp_path: Path) -> None:
    """Someone with write access to the shared store commits a well-formed batch entry (hashes and all)
    whose batch.arrow is a pickle. The next job that hits it must refuse the batch, not run it."""
    from trtcal.config import JobConfig
    from trtcal.orchestrator.job import Job, calibrate_dataset
    from trtcal.storage import compute_cache_key

    marker = tmp_path / "EXECUTED"
    data = tmp_path / "photos"
    data.mkdir()
    model = tmp_path / "tiny224.onnx"
    model.write_bytes(tiny_cnn(side=224).SerializeToString())
    store_url = str(tmp_path / "store")
    config = JobConfig.from_options(store=store_url, num_samples=4, preprocess="imagenet", device="cpu", workers=1)
    inputs = Job.open(str(model), str(data), config).batch_inputs  # the key the job will look up
    CacheStore(store_url).publish(
        compute_cache_key(inputs), {"batch.arrow": pickle.dumps(_Planted(marker))}, key_inputs=inputs,
        extra={"fingerprint": "0" * 64, "num_rows": 4},
    )
    with pytest.raises(DataError, match="not an Arrow"):
        calibrate_dataset(str(model), str(data), config=config)
    assert not marker.exists()


# --- credentials never written ---------------------------------------------------------------------

PLANTED_KEY = "AKIDPLANTED" + secrets.token_hex(6).upper()
PLANTED_SECRET = "planted-S3-secret-" + secrets.token_urlsafe(18)
PLANTED_RAY_TOKEN = secrets.token_hex(32)
READER_KEY = "AKIDREADER" + secrets.token_hex(5).upper()
READER_SECRET = "reader-secret-" + secrets.token_urlsafe(12)


@pytest.fixture(scope="module")
def planted_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS whose writer identity has the planted credentials, plus a read-only identity."""
    base = tmp_path_factory.mktemp("planted-s3")
    with _server_with_identities(base) as server:
        yield server


class _server_with_identities:  # noqa: N801 (a context manager used like a function)
    def __init__(self, base: Path) -> None:
        self.base = base

    def __enter__(self) -> S3Server:
        from tests.fixtures.s3 import start_server

        self.server = start_server(self.base, key=PLANTED_KEY, secret=PLANTED_SECRET)
        config = json.loads((self.base / "s3.json").read_text())
        config["identities"].append(
            {"name": "consumer", "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}], "actions": ["Read", "List"]}
        )
        (self.base / "s3.json").write_text(json.dumps(config))
        self.server.restart()  # SeaweedFS reads its identities at start
        return self.server

    def __exit__(self, *exc: object) -> None:
        if self.server.process is not None and self.server.process.poll() is None:
            self.server.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ray_head_with_logs() -> Iterator[RayHead]:
    """A Ray head of our own (token auth on), so its logs outlive the calibration. Workers read the
    dataset with the cluster's own credentials (a driver's environment is not forwarded to them), as
    on a real cluster with an instance role or a Kubernetes secret."""
    with ray_head(env={"AWS_ACCESS_KEY_ID": PLANTED_KEY, "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET}, token=PLANTED_RAY_TOKEN) as head:
        yield head


def _everything_under(root: Path) -> Iterator[tuple[str, bytes]]:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                yield str(path), path.read_bytes()
            except OSError:
                continue  # sockets, vanished files


def _bucket_objects(server: S3Server, bucket: str) -> Iterator[tuple[str, bytes]]:
    client = server._new_client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            yield f"s3://{bucket}/{item['Key']}", client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()


@pytest.mark.slow
def test_full_calibration_at_debug_level_writes_no_credential_anywhere(
    planted_server: S3Server, ray_head_with_logs: RayHead, tmp_path: Path
) -> None:
    from tests.unit.workers.images import write_photo_folder

    server = planted_server
    data_bucket, store_bucket = server.create_bucket(), server.create_bucket()
    photos = tmp_path / "photos"
    write_photo_folder(photos, classes={"a": ("astronaut", "coffee", "rocket"), "b": ("camera", "coins", "moon")})
    client = server._new_client()
    for path in sorted(photos.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=data_bucket, Key=f"train/{path.relative_to(photos)}", Body=path.read_bytes())
    model = tmp_path / "tiny224.onnx"
    model.write_bytes(tiny_cnn(side=224).SerializeToString())
    cache_dir = tmp_path / "trtcal-cache"
    base_env = client_env(ray_head_with_logs)
    base_env.update(PYTHONPATH=str(REPO_ROOT), TRTCAL_CACHE_DIR=str(cache_dir), HOME=str(tmp_path))
    outputs = []
    # Once with the credentials in the environment, once on the command line (--storage-option).
    for run, (verbosity, num_samples, creds_env, creds_args) in enumerate((
        ("-vv", "6", {"AWS_ACCESS_KEY_ID": PLANTED_KEY, "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET}, []),
        ("-vv", "8", {}, ["--storage-option", f"key={PLANTED_KEY}", "--storage-option", f"secret={PLANTED_SECRET}"]),
    )):
        out_dir = tmp_path / f"out{run}"
        argv = [sys.executable, "-m", "trtcal", verbosity, "calibrate", str(model), "--data", f"s3://{data_bucket}/train/",
                "--store", f"s3://{store_bucket}/calib", "--storage-option", f"endpoint_url={server.endpoint_url}",
                *creds_args, "--address", ray_head_with_logs.address, "--num-samples", num_samples,
                "--preprocess", "imagenet", "-a", "entropy2", "-a", "minmax", "--output", str(out_dir), "--json"]
        try:
            result = subprocess.run(argv, env={**base_env, **creds_env}, capture_output=True, timeout=150, cwd=tmp_path)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"calibrate timed out; stderr: {(exc.stderr or b'').decode(errors='replace')[-4000:]}")
        assert result.returncode == 0, result.stderr.decode(errors="replace")[-4000:]
        assert json.loads(result.stdout)["published"] is True
        outputs += [(f"run{run} stdout", result.stdout), (f"run{run} stderr", result.stderr)]
    written = [
        *outputs,
        *_bucket_objects(server, store_bucket),
        *_everything_under(tmp_path / "out0"),
        *_everything_under(tmp_path / "out1"),
        *_everything_under(cache_dir),
        *_everything_under(ray_head_with_logs.temp_dir),
    ]
    assert len(written) > 20 and any("session_" in name for name, _ in written)
    leaks = [
        (name, label)
        for name, content in written
        for label, secret in (("secret", PLANTED_SECRET), ("access key", PLANTED_KEY), ("Ray token", PLANTED_RAY_TOKEN))
        if secret.encode() in content
    ]
    assert leaks == []


@pytest.mark.parametrize("where", ["entrypoint", "runtime_env"])
def test_submitting_a_job_refuses_credentials_that_would_become_job_metadata(where: str) -> None:
    from trtcal.orchestrator.jobs import submit_job

    args = ["calibrate", "m.onnx", "--data", "s3://b/x/", "--store", "s3://b/c"]
    runtime_env = None
    if where == "entrypoint":
        args += ["--storage-option", f"secret={PLANTED_SECRET}"]
    else:
        runtime_env = {"env_vars": {"AWS_SECRET_ACCESS_KEY": PLANTED_SECRET}}
    with pytest.raises(ConfigError, match="credential"):
        # The address is closed: a correct implementation refuses before ever connecting.
        submit_job(f"http://127.0.0.1:{_free_port()}", args, runtime_env=runtime_env, follow=False)


# --- read-only consumers ---------------------------------------------------------------------------


def _snapshot(server: S3Server, bucket: str) -> dict[str, bytes]:
    return dict(_bucket_objects(server, bucket))


def test_a_read_only_identity_cannot_write_and_the_bucket_is_unchanged(planted_server: S3Server, tmp_path: Path) -> None:
    from trtcal.storage import compute_cache_key

    server = planted_server
    bucket = server.create_bucket()
    writer = CacheStore(f"s3://{bucket}/calib", **server.storage_options())
    inputs = {"model_sha256": "cd" * 32, "algorithm": "minmax"}
    key = compute_cache_key(inputs)
    writer.publish(key, {"calibration.cache": b"TRT-100300-MinMaxCalibration\nx: 3c010a14\n"}, key_inputs=inputs)
    before = _snapshot(server, bucket)
    reader_options = server.storage_options(key=READER_KEY, secret=READER_SECRET)
    reader = CacheStore(f"s3://{bucket}/calib", **reader_options)
    assert reader.get(key) is not None  # consumers read
    other = {**inputs, "algorithm": "entropy2"}
    with pytest.raises(StorageError, match="denied|Forbidden|AccessDenied") as info:
        reader.publish(compute_cache_key(other), {"calibration.cache": b"TRT-100300-EntropyCalibration2\n"}, key_inputs=other)
    assert READER_SECRET not in str(info.value) and READER_KEY not in str(info.value)
    with pytest.raises(TrtcalError):
        from datetime import timedelta

        reader.gc(older_than=timedelta(0), orphan_grace=timedelta(0))
    assert _snapshot(server, bucket) == before
    # Flagged read-only, the same consumer never even tries.
    flagged = CacheStore(f"s3://{bucket}/calib", read_only=True, **reader_options)
    with pytest.raises(ReadOnlyStoreError):
        flagged.publish(compute_cache_key(other), {"calibration.cache": b"x"}, key_inputs=other)
    assert _snapshot(server, bucket) == before


def test_read_only_calibration_computes_but_leaves_the_store_byte_for_byte_unchanged(ray_local: Any, tmp_path: Path) -> None:
    from trtcal.orchestrator.job import calibrate_dataset

    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    np.save(tmp_path / "batch.npy", tiny_batch(8))
    store_url = tmp_path / "store"
    first = calibrate_dataset(str(model), str(tmp_path / "batch.npy"), store=str(store_url), device="cpu")
    assert first.published

    def snapshot() -> dict[str, tuple[bytes, int]]:
        return {str(p.relative_to(store_url)): (p.read_bytes(), p.stat().st_mtime_ns) for p in store_url.rglob("*") if p.is_file()}

    before = snapshot()
    np.save(tmp_path / "other.npy", tiny_batch(8, seed=1))  # a miss: computed, not published
    result = calibrate_dataset(str(model), str(tmp_path / "other.npy"), store=str(store_url), device="cpu", read_only=True,
                               output=str(tmp_path / "out"))
    assert result.published is False and result.cache_hit is False
    assert (tmp_path / "out" / "calibration.cache").exists()
    assert snapshot() == before
    with pytest.raises(ReadOnlyStoreError):
        CacheStore(str(store_url), read_only=True).gc()
    assert snapshot() == before
