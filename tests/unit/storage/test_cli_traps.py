"""Issue 15: CLI traps that gave wrong results without a word (each test failed before its fix)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from trtcal.cli import main
from trtcal.core import read_trt_cache, write_trt_cache
from trtcal.storage import CacheStore, compute_cache_key

ENTROPY2 = {"input": 2.0, "conv1": 5.5}
MINMAX = {"input": 2.5, "conv1": 9.25}
INPUTS = {"model_sha256": hashlib.sha256(b"model").hexdigest(), "algorithm": "entropy2+minmax", "batch_fingerprint": "b1"}
KEY = compute_cache_key(INPUTS)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture()
def two_method_store(tmp_path: Path) -> str:
    """An entry as `trtcal calibrate --algorithm entropy2 --algorithm minmax` publishes it."""
    store = str(tmp_path / "store")
    e2 = write_trt_cache(ENTROPY2, trt_version="10.3.0", algorithm="entropy2")
    mm = write_trt_cache(MINMAX, trt_version="10.3.0", algorithm="minmax")
    files = {"calibration.cache": e2, "calibration.entropy2.cache": e2, "calibration.minmax.cache": mm}
    CacheStore(store).publish(KEY, files, key_inputs=INPUTS)
    return store


@pytest.mark.parametrize(("method", "header", "amax"), [
    ("minmax", "MinMaxCalibration", MINMAX),
    ("MinMaxCalibration", "MinMaxCalibration", MINMAX),
    ("entropy2", "EntropyCalibration2", ENTROPY2),
])
def test_cache_export_method_exports_that_methods_scales(
    capsys: pytest.CaptureFixture[str], two_method_store: str, tmp_path: Path, method: str, header: str, amax: dict[str, float]
) -> None:
    target = tmp_path / "out.cache"
    rc, _, err = run(capsys, "cache", "export", two_method_store, "--key", KEY[:10], "--method", method,
                     "--trt-version", "10.16.1", "-o", str(target))
    assert rc == 0, err
    cache = read_trt_cache(target.read_bytes())
    assert cache.header == f"TRT-101601-{header}"
    assert cache.scale == read_trt_cache(write_trt_cache(amax, trt_version="10.3.0", algorithm="entropy2")).scale


def test_cache_export_of_a_method_the_entry_lacks_lists_what_it_has(
    capsys: pytest.CaptureFixture[str], two_method_store: str, tmp_path: Path
) -> None:
    target = tmp_path / "out.cache"
    rc, _, err = run(capsys, "cache", "export", two_method_store, "--key", KEY, "--method", "percentile",
                     "--trt-version", "10.16.1", "-o", str(target))
    assert rc == 2 and "no percentile scales" in err and "entropy2, minmax" in err and not target.exists()
    rc, _, err = run(capsys, "cache", "export", two_method_store, "--key", KEY, "--method", "minmax",
                     "--artifact", "calibration.entropy2.cache", "--trt-version", "10.16.1", "-o", str(target))
    assert rc == 2 and "does not hold minmax scales" in err and not target.exists()
    json.dumps(INPUTS)


# item 4: `cache put` onto a taken key


def test_cache_put_onto_an_existing_key_says_so_and_never_claims_published(
    capsys: pytest.CaptureFixture[str], two_method_store: str, tmp_path: Path
) -> None:
    (tmp_path / "inputs.json").write_text(json.dumps(INPUTS))
    (tmp_path / "calibration.cache").write_bytes(write_trt_cache(MINMAX, trt_version="10.3.0", algorithm="minmax"))
    rc, out, err = run(capsys, "cache", "put", two_method_store, "--key-inputs", str(tmp_path / "inputs.json"),
                       str(tmp_path / "calibration.cache"))
    assert rc == 1 and out.strip() == KEY
    assert "already exists" in err and "nothing was stored" in err and "published" not in err
    assert "differ: calibration.cache, calibration.entropy2.cache, calibration.minmax.cache" in err
    rc, out, _ = run(capsys, "cache", "put", two_method_store, "--json", "--key-inputs", str(tmp_path / "inputs.json"),
                     str(tmp_path / "calibration.cache"))
    assert rc == 1 and json.loads(out)["created"] is False and json.loads(out)["identical"] is False
    # The store still holds the first entry's bytes.
    entry = CacheStore(two_method_store).get(KEY)
    assert entry is not None and read_trt_cache(entry.read("calibration.cache")).scale == read_trt_cache(
        write_trt_cache(ENTROPY2, trt_version="10.3.0", algorithm="entropy2")).scale


def test_publish_reports_whether_it_created_the_entry(tmp_path: Path) -> None:
    store = CacheStore(str(tmp_path / "s"))
    first = store.publish(KEY, {"a": b"1"}, key_inputs=INPUTS)
    second = store.publish(KEY, {"a": b"2"}, key_inputs=INPUTS)  # a writer that lost the race
    assert first.created and not second.created and second.read("a") == b"1"


# item 5: ls / verify on a path that is not a store


@pytest.mark.parametrize("command", ["ls", "verify", "gc"])
def test_ls_verify_gc_on_a_missing_or_foreign_path_fail(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str) -> None:
    rc, _, err = run(capsys, "cache", command, str(tmp_path / "typo"))
    assert rc == 2 and "does not exist" in err
    (tmp_path / "file").write_text("x")
    rc, _, err = run(capsys, "cache", command, str(tmp_path / "file"))
    assert rc == 2 and "not a directory" in err
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    rc, _, err = run(capsys, "cache", command, str(foreign))
    assert rc == 2 and "not a trtcal store" in err and "cat.jpg" in err
    assert not (foreign / "v1").exists() and not (tmp_path / "typo").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(capsys, "cache", command, str(empty))
    assert rc == 0


def test_ls_on_an_empty_existing_store_says_0_entries(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = run(capsys, "cache", "ls", str(tmp_path))
    assert rc == 0 and "0 entries" in err


def test_a_manifest_replaced_by_a_symlink_fails_verify(capsys: pytest.CaptureFixture[str], two_method_store: str, tmp_path: Path) -> None:
    manifest = next(Path(two_method_store).rglob(f"{KEY}.json"))
    copy = tmp_path / "elsewhere.json"
    copy.write_bytes(manifest.read_bytes())
    manifest.unlink()
    manifest.symlink_to(copy)  # same bytes, but a store holds only regular files
    rc, out, err = run(capsys, "cache", "verify", two_method_store)
    assert rc == 1 and "CORRUPT" in out and "symbolic link" in out and "1 checked, 1 corrupt" in err


def test_an_artifact_replaced_by_a_fifo_fails_verify_without_hanging(capsys: pytest.CaptureFixture[str], two_method_store: str) -> None:
    import os

    artifact = next(Path(two_method_store).rglob("calibration.minmax.cache"))
    artifact.unlink()
    os.mkfifo(artifact)
    rc, out, _ = run(capsys, "cache", "verify", two_method_store)
    assert rc == 1 and "not a regular file" in out


# item 9: `cache put` of a device or a FIFO


@pytest.mark.parametrize("source", ["/dev/zero", "fifo", "dir"])
def test_cache_put_refuses_non_regular_files_and_leaves_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path, source: str) -> None:
    import os

    (tmp_path / "inputs.json").write_text(json.dumps(INPUTS))
    if source == "fifo":
        source = str(tmp_path / "pipe")
        os.mkfifo(source)
    elif source == "dir":
        source = str(tmp_path / "a-dir")
        os.mkdir(source)
    store = tmp_path / "store"
    rc, _, err = run(capsys, "cache", "put", str(store), "--key-inputs", str(tmp_path / "inputs.json"), f"x={source}")
    assert rc == 2 and "give a regular file" in err and "published" not in err
    assert not store.exists() or not [p for p in store.rglob("*") if p.is_file()]


# item 9: credentials inside a URL


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("command", [["ls"], ["verify"], ["show", "abcdef"]])
def test_credentials_inside_a_store_url_are_refused_and_never_printed(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    url = f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@team-bucket/calib"
    rc = main(["-vv", "cache", command[0], url, *command[1:]])
    out, err = capsys.readouterr()
    assert rc == 2 and "credentials in the URL" in err and "--storage-option" in err
    assert SECRET not in out + err and "AKIAIOSFODNN7EXAMPLE" not in out + err


def test_credentials_inside_a_dataset_url_are_refused_and_never_printed() -> None:
    from trtcal.errors import ConfigError
    from trtcal.workers.sources import open_dataset

    with pytest.raises(ConfigError) as info:
        open_dataset(f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@images/train/")
    assert SECRET not in str(info.value) and "s3://***@images/train/" in str(info.value)


def test_botocore_bucket_name_errors_are_scrubbed() -> None:
    """botocore's own text for a bucket named `KEY:SECRET@bucket` (raised before any request)."""
    import botocore.exceptions
    import botocore.session

    from trtcal.storage._redact import Scrubber

    client = botocore.session.get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9", aws_access_key_id="x", aws_secret_access_key="y"
    )
    with pytest.raises(botocore.exceptions.ParamValidationError) as info:
        client.list_objects_v2(Bucket=f"AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket")
    assert SECRET in str(info.value)  # botocore prints it
    assert SECRET not in Scrubber()(str(info.value)) and "AKIAIOSFODNN7EXAMPLE" not in Scrubber()(str(info.value))
