"""`trtcal cache …` end to end on a local store and on S3 (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from trtcal.cli import main
from trtcal.cli.cmd_cache import parse_duration, parse_moment, parse_storage_options
from trtcal.core import read_trt_cache, write_trt_cache
from trtcal.errors import ConfigError
from trtcal.storage import compute_cache_key

CACHE = write_trt_cache({"input": 2.0, "conv1": 5.5}, trt_version="10.3.0", algorithm="entropy2")
INPUTS = {"model_sha256": hashlib.sha256(b"model").hexdigest(), "algorithm": "entropy2", "batch_fingerprint": "b1"}
KEY = compute_cache_key(INPUTS)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    (d / "calibration.cache").write_bytes(CACHE)
    (d / "ranges.json").write_text(json.dumps({"input": 2.0}))
    (d / "inputs.json").write_text(json.dumps(INPUTS))
    (d / "extra.json").write_text(json.dumps({"seconds": 3.5}))
    return d


def test_put_ls_show_get_export_verify_gc_on_a_local_store(capsys: pytest.CaptureFixture[str], files: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    rc, out, _ = run(capsys, "cache", "put", store, "--namespace", "team-a", "--key-inputs", str(files / "inputs.json"),
                     "--extra", str(files / "extra.json"), str(files / "calibration.cache"), f"ranges.json={files / 'ranges.json'}")
    assert rc == 0 and out.strip() == KEY

    rc, out, _ = run(capsys, "cache", "ls", store)
    assert rc == 0 and "team-a" in out and KEY[:16] in out and "entropy2" in out
    rc, out, _ = run(capsys, "cache", "ls", store, "--json", "--algorithm", "entropy2", "--model", INPUTS["model_sha256"][:10])
    listed = json.loads(out)
    assert [e["key"] for e in listed] == [KEY] and listed[0]["artifact_count"] == 2
    rc, out, _ = run(capsys, "cache", "ls", store, "--json", "--namespace", "team-b")
    assert json.loads(out) == []
    rc, out, _ = run(capsys, "cache", "ls", store, "--json", "--older-than", "1h")
    assert json.loads(out) == []

    rc, out, _ = run(capsys, "cache", "show", store, "--namespace", "team-a", KEY[:12])  # a unique prefix is enough
    assert rc == 0 and KEY in out and "verified" in out and "seconds" in out
    rc, out, _ = run(capsys, "cache", "show", store, "--namespace", "team-a", KEY, "--json")
    shown = json.loads(out)
    assert shown["ok"] and shown["manifest"]["extra"] == {"seconds": 3.5}

    rc, out, _ = run(capsys, "cache", "get", store, "--namespace", "team-a", KEY, "-o", str(tmp_path / "got"))
    assert rc == 0 and (tmp_path / "got" / "calibration.cache").read_bytes() == CACHE

    target = tmp_path / "model.cache"
    rc, _, err = run(capsys, "cache", "export", store, "--namespace", "team-a", "--key", KEY, "--method", "entropy2",
                     "--trt-version", "10.16.1", "-o", str(target))
    assert rc == 0 and "TRT-101601-EntropyCalibration2" in err
    assert target.read_bytes().startswith(b"TRT-101601-EntropyCalibration2\n")
    assert read_trt_cache(target.read_bytes()).scale == read_trt_cache(CACHE).scale
    # The entry holds entropy2 scales only: --method minmax must not relabel them (issue 15 item 2).
    rc, _, err = run(capsys, "cache", "export", store, "--namespace", "team-a", "--key", KEY, "--method", "minmax",
                     "--trt-version", "10.16.1", "-o", str(tmp_path / "minmax.cache"))
    assert rc == 2 and "no minmax scales" in err and "entropy2" in err and not (tmp_path / "minmax.cache").exists()

    rc, out, _ = run(capsys, "cache", "verify", store, "--json")
    assert rc == 0 and json.loads(out)["corrupt"] == 0
    # Flip a byte: verify and show report it (exit 1), get refuses it (exit 2), nothing is written.
    artifact = next((tmp_path / "store").rglob("ranges.json"))
    data = artifact.read_bytes()
    artifact.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    rc, out, _ = run(capsys, "cache", "verify", store)
    assert rc == 1 and "CORRUPT" in out and str(artifact) in out
    rc, out, _ = run(capsys, "cache", "show", store, "--namespace", "team-a", KEY)
    assert rc == 1 and "CORRUPT" in out
    rc, _, err = run(capsys, "cache", "get", store, "--namespace", "team-a", KEY, "-o", str(tmp_path / "got2"))
    assert rc == 2 and "corrupt" in err and not (tmp_path / "got2" / "ranges.json").exists()

    rc, out, err = run(capsys, "cache", "gc", store, "--older-than", "2999-01-01", "--dry-run")
    assert rc == 0 and f"would remove entry team-a/{KEY}" in out
    rc, out, _ = run(capsys, "cache", "gc", store, "--older-than", "2999-01-01", "--json")
    assert json.loads(out)["removed_entries"] == [f"team-a/{KEY}"]
    rc, out, _ = run(capsys, "cache", "ls", store, "--json")
    assert json.loads(out) == []


def test_cli_errors_are_clear(capsys: pytest.CaptureFixture[str], files: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    rc, _, err = run(capsys, "cache", "put", store, "--key-inputs", str(files / "inputs.json"), "--key", "0" * 64, str(files / "calibration.cache"))
    assert rc == 2 and "does not match --key-inputs" in err
    rc, _, err = run(capsys, "cache", "show", store, "zz")
    assert rc == 2 and "hex digits" in err
    rc, _, err = run(capsys, "cache", "export", store, "--key", KEY, "--trt-version", "10.16.1", "-o", str(tmp_path / "x"))
    assert rc == 2 and "no cache entry" in err
    rc, _, err = run(capsys, "cache", "put", store, "--namespace", "../up", "--key-inputs", str(files / "inputs.json"), str(files / "calibration.cache"))
    assert rc == 2 and "namespace" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_on_s3_never_shows_credentials(s3_server: Any, files: Path, tmp_path: Path) -> None:
    """A real subprocess with -vv: the credentials appear nowhere in its output, nor in the store."""
    bucket = s3_server.create_bucket()
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    env.pop("AWS_ACCESS_KEY_ID", None)
    env.pop("AWS_SECRET_ACCESS_KEY", None)
    creds = ["--storage-option", f"key={s3_server.key}", "--storage-option", f"secret={s3_server.secret}"]
    trtcal = [sys.executable, "-m", "trtcal", "-vv", "cache"]
    url = f"s3://{bucket}/calib"
    outputs = []
    for argv in (
        ["put", url, *creds, "--key-inputs", str(files / "inputs.json"), str(files / "calibration.cache")],
        ["ls", url, *creds],
        ["show", url, *creds, KEY],
        ["export", url, *creds, "--key", KEY, "--trt-version", "8.6.1", "-o", "-"],
        ["ls", url, "--storage-option", f"key={s3_server.key}", "--storage-option", "secret=WRONG-secret-1234"],
    ):
        proc = subprocess.run(trtcal + argv, capture_output=True, env=env, timeout=120)
        outputs.append((argv[0], proc.returncode, proc.stdout.decode(), proc.stderr.decode()))
    assert [o[1] for o in outputs] == [0, 0, 0, 0, 2], outputs
    assert outputs[0][2].strip() == KEY
    assert outputs[3][2].startswith("TRT-8601-EntropyCalibration2\n")
    assert "permission denied" in outputs[4][3]
    for _, _, out, err in outputs:
        for secret in (s3_server.secret, s3_server.key, "WRONG-secret-1234"):
            assert secret not in out and secret not in err
    store_files = s3_server._botocore_client().list_objects_v2(Bucket=bucket)["Contents"]
    for obj in store_files:
        body = s3_server._botocore_client().get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        assert s3_server.secret.encode() not in body and s3_server.key.encode() not in body


# option parsing


def test_parse_storage_options() -> None:
    assert parse_storage_options(["endpoint_url=http://127.0.0.1:9000", "client_kwargs.region_name=eu-west-1",
                                  "anon=false", "default_block_size=5242880", "secret=0123", "config_kwargs={\"retries\": {\"max_attempts\": 1}}"]) == {
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
        "anon": False,
        "default_block_size": 5242880,
        "secret": "0123",  # credentials stay strings, even when they look like numbers
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    for bad in (["novalue"], ["=x"], ["a..b=1"], ["x={bad"]):
        with pytest.raises(ConfigError):
            parse_storage_options(bad)


def test_parse_ages_and_dates() -> None:
    now = datetime(2026, 6, 1, tzinfo=timezone.utc)
    assert parse_duration("90s") == timedelta(seconds=90) and parse_duration("2w") == timedelta(days=14)
    assert parse_moment("7d", now) == now - timedelta(days=7)
    assert parse_moment("2026-01-31", now) == datetime(2026, 1, 31, tzinfo=timezone.utc)
    assert parse_moment("2026-01-31T12:00:00Z", now) == datetime(2026, 1, 31, 12, tzinfo=timezone.utc)
    for bad in ("yesterday", "7 days", "-1d"):
        with pytest.raises(ConfigError):
            parse_moment(bad, now)
