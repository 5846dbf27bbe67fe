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
