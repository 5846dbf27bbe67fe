"""Keys (canonical JSON, sha256), safe names, manifest parsing, credential scrubbing."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trtcal._secrets import Scrubber, redact_url, secret_values
from trtcal._version import FORMAT_VERSION
from trtcal.errors import CacheFormatError, ConfigError
from trtcal.storage.keys import KeyInputs, canonical_json, compute_cache_key, key_inputs_dict
from trtcal.storage.manifest import ArtifactRecord, Manifest, parse_manifest
from trtcal.storage.names import (
    check_artifact_name,
    check_key,
    check_namespace,
    is_stage_id,
    new_stage_id,
    stage_id_time,
)

GOLDEN_INPUTS = KeyInputs(
    model_sha256="0" * 64,
    batch_fingerprint="f" * 64,
    preprocessing={"preset": "imagenet", "size": 224, "mean": [0.485, 0.456, 0.406]},
    algorithm="percentile",
    algorithm_params={"percentile": 99.99, "num_bins": 2048},
    runner="onnxruntime-cpu",
    runner_version="1.32.0",
    format_version=1,  # explicit: the golden bytes must not move when trtcal's FORMAT_VERSION does
)
GOLDEN_JSON = (
    b'{"algorithm":"percentile","algorithm_params":{"num_bins":2048,"percentile":99.99},'
    b'"batch_fingerprint":"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff","extra":{},'
    b'"format_version":1,"model_sha256":"0000000000000000000000000000000000000000000000000000000000000000",'
    b'"preprocessing":{"mean":[0.485,0.456,0.406],"preset":"imagenet","size":224},'
    b'"runner":"onnxruntime-cpu","runner_version":"1.32.0"}'
)
GOLDEN_KEY = "30dc23b681716c20a11f2281379dbeb5b945fcd02c1098458b407b6d0c0043ec"


# keys


def test_key_is_sha256_of_golden_canonical_json_bytes() -> None:
    assert canonical_json(GOLDEN_INPUTS.to_dict()) == GOLDEN_JSON
    assert hashlib.sha256(GOLDEN_JSON).hexdigest() == GOLDEN_KEY
    assert compute_cache_key(GOLDEN_INPUTS) == GOLDEN_KEY
    assert compute_cache_key(GOLDEN_INPUTS.to_dict()) == GOLDEN_KEY  # the mapping form gives the same key


def test_key_ignores_mapping_order_but_not_values_or_types() -> None:
    a = {"x": {"b": 1, "a": 2}, "y": [1, 2]}
    b = {"y": [1, 2], "x": {"a": 2, "b": 1}}
    assert compute_cache_key(a) == compute_cache_key(b)
    assert compute_cache_key(a) != compute_cache_key({**a, "y": [2, 1]})  # list order matters
    assert compute_cache_key({"v": 1}) != compute_cache_key({"v": 1.0})  # documented: types matter
    assert compute_cache_key({"v": 1}) != compute_cache_key({"v": True})


def test_every_key_input_field_changes_the_key() -> None:
    base = GOLDEN_INPUTS.to_dict()
    changes = {
        "model_sha256": "1" * 64,
        "batch_fingerprint": "e" * 64,
        "preprocessing": {"preset": "imagenet", "size": 256},
        "algorithm": "entropy2",
        "algorithm_params": {"percentile": 99.9, "num_bins": 2048},
        "runner": "onnxruntime-cuda",
        "runner_version": "1.33.0",
        "extra": {"micro_batch": 8},
        "format_version": base["format_version"] + 1,
    }
    assert set(changes) == set(base)
    keys = {compute_cache_key(KeyInputs.from_dict({**base, name: value})) for name, value in changes.items()}
    assert len(keys) == len(changes) and GOLDEN_KEY not in keys


def test_mapping_inputs_get_the_format_version() -> None:
    assert key_inputs_dict({"a": 1}) == {"a": 1, "format_version": FORMAT_VERSION}
    assert compute_cache_key({"a": 1}) == compute_cache_key({"a": 1, "format_version": FORMAT_VERSION})


@pytest.mark.parametrize(
    "value, match",
    [
        ({"x": float("nan")}, "finite"),
        ({"x": float("inf")}, "finite"),
        ({1: "a"}, "not a string"),
        ({"x": {1, 2}}, "set is not a JSON value"),
        ({"x": b"bytes"}, "bytes is not a JSON value"),
        ({"x": "\ud800"}, "surrogate"),
        ({}, "empty"),
    ],
)
def test_non_json_inputs_are_rejected(value: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        compute_cache_key(value)


def test_numpy_scalars_must_be_converted() -> None:
    np = pytest.importorskip("numpy")
    with pytest.raises(ConfigError, match=r"inputs\.x.*\.item\(\)"):
        compute_cache_key({"x": np.float32(1.5)})


@pytest.mark.parametrize(
    "field, value",
    [("model_sha256", "ABC"), ("model_sha256", "0" * 63), ("algorithm", ""), ("runner", None), ("preprocessing", [1]), ("format_version", 0)],
)
def test_key_inputs_validate_each_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        KeyInputs.from_dict({**GOLDEN_INPUTS.to_dict(), field: value})
    with pytest.raises(ConfigError, match="unknown key input"):
        KeyInputs.from_dict({**GOLDEN_INPUTS.to_dict(), "surprise": 1})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=6))
def test_canonical_json_round_trips_and_is_stable(value: dict[str, Any]) -> None:
    encoded = canonical_json(value)
    assert canonical_json(json.loads(encoded)) == encoded
    shuffled = dict(reversed(list(value.items())))
    assert canonical_json(shuffled) == encoded


# names


@pytest.mark.parametrize(
    "key",
    ["", "..", "0" * 63, "0" * 65, "A" * 64, "g" * 64, "../" + "0" * 61, "/" + "0" * 63, "0" * 63 + "\n", "0" * 63 + "\x00", "%2e" + "0" * 61, None, 7],
)
def test_bad_keys(key: Any) -> None:
    with pytest.raises(ConfigError):
        check_key(key)


@pytest.mark.parametrize(
    "name",
    ["..", ".", "", "/etc/passwd", "a/b", "a\\b", ".hidden", "a..b", "a\x00b", "a\nb", "a b", "%2e%2e", "x?y", "x#y",
     "C:x", "~x", "s3://b/k", "é.bin", "x" * 129, "-rf", "file:x"],
)
def test_bad_artifact_names(name: str) -> None:
    with pytest.raises(ConfigError, match="artifact name"):
        check_artifact_name(name)


@pytest.mark.parametrize("name", ["calibration.cache", "model.qdq.onnx", "ranges.json", "batch.arrow", "A_b-1.txt", "x" * 128])
def test_good_artifact_names(name: str) -> None:
    assert check_artifact_name(name) == name


@pytest.mark.parametrize("namespace", ["..", ".", "a/b", "A", "-x", "_x", "", "a.b", "x" * 65, "a\x00", "a\nb", "tëam", "a b"])
def test_bad_namespaces(namespace: str) -> None:
    with pytest.raises(ConfigError, match="namespace"):
        check_namespace(namespace)


def test_stage_ids_are_unique_and_carry_their_time() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    ids = {new_stage_id(moment) for _ in range(1000)}
    assert len(ids) == 1000 and all(is_stage_id(i) for i in ids)
    assert stage_id_time(next(iter(ids))) == moment
    assert not is_stage_id("../s20260102T030405Z-0000000000000000")


# manifests


def _manifest(**overrides: Any) -> Manifest:
    key = compute_cache_key(GOLDEN_INPUTS)
    values: dict[str, Any] = {
        "key": key,
        "namespace": "team-a",
        "key_inputs": GOLDEN_INPUTS.to_dict(),
        "stage": new_stage_id(),
        "artifacts": {"calibration.cache": ArtifactRecord(sha256="a" * 64, size=10)},
        "created_at": datetime(2026, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc),
        "extra": {"seconds": 1.5},
    }
    values.update(overrides)
    return Manifest(**values)


def test_manifest_round_trip() -> None:
    m = _manifest()
    parsed = parse_manifest(m.to_bytes(), key=m.key, namespace="team-a")
    assert parsed == m
    assert parsed.to_bytes() == m.to_bytes()
    assert json.loads(m.to_bytes())["created_at"] == "2026-05-06T07:08:09.123456Z"


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(unknown=1), "unknown"),
        (lambda d: d.pop("stage"), "missing"),
        (lambda d: d.update(created_at="yesterday"), "created_at"),
        (lambda d: d["artifacts"].clear(), "non-empty"),
        (lambda d: d["artifacts"]["calibration.cache"].update(sha256="XYZ"), "sha256"),
        (lambda d: d["artifacts"]["calibration.cache"].update(size=True), "size"),
        (lambda d: d["artifacts"]["calibration.cache"].update(extra=1), "sha256, size"),
        (lambda d: d["artifacts"].update({"Calibration.cache": d["artifacts"]["calibration.cache"]}), "only in case"),
        (lambda d: d.update(extra=[]), "extra"),
    ],
)
def test_manifest_strictness(mutate: Any, match: str) -> None:
    m = _manifest()
    data = json.loads(m.to_bytes())
    mutate(data)
    with pytest.raises(CacheFormatError, match=match):
        parse_manifest(json.dumps(data).encode(), key=m.key, namespace="team-a")


def test_manifest_rejects_duplicate_fields_and_oversize() -> None:
    m = _manifest()
    text = m.to_bytes().decode()
    duplicated = text.replace('"namespace": "team-a"', '"namespace": "team-a", "namespace": "team-a"')
    with pytest.raises(CacheFormatError, match="repeats"):
        parse_manifest(duplicated.encode(), key=m.key, namespace="team-a")
    with pytest.raises(CacheFormatError, match="limit"):
        parse_manifest(b" " * (16 << 20) + b"{}", key=m.key, namespace="team-a")


def test_manifest_refuses_non_json_extra() -> None:
    with pytest.raises(ConfigError, match="finite"):
        _manifest(extra={"t": float("nan")}).to_bytes()


# credentials


def test_redact_url_and_scrubber() -> None:
    assert redact_url("s3://AKIAXXXX:topsecret@bucket/p") == "s3://***@bucket/p"
    assert redact_url("https://h/x?X-Amz-Signature=abc&X-Amz-Credential=AK%2F1&part=2") == (
        "https://h/x?X-Amz-Signature=***&X-Amz-Credential=***&part=2"
    )
    options = {"key": "AKIAEXAMPLE", "secret": "wJalrXUtnFEMI", "client_kwargs": {"aws_session_token": "tok-123456"}, "anon": False}
    secrets = secret_values(options, environ={"AWS_SECRET_ACCESS_KEY": "envsecret1"})
    assert secrets == {"AKIAEXAMPLE", "wJalrXUtnFEMI", "tok-123456", "envsecret1"}
    scrub = Scrubber(secrets)
    text = scrub("failed with key AKIAEXAMPLE and secret wJalrXUtnFEMI at s3://u:p@b/k")
    assert "AKIAEXAMPLE" not in text and "wJalrXUtnFEMI" not in text and "u:p@" not in text
    assert scrub.describe(OSError("denied for tok-123456")) == "OSError: denied for ***"


# store configuration


def test_store_config_validates_and_round_trips() -> None:
    from trtcal.storage import CacheStore, StoreConfig

    config = StoreConfig(url="memory://cfg", namespace="team-a", read_from=("memory://other#team-b",), on_corrupt="recompute",
                         storage_options={"secret": "s3cr3t-value"})
    assert StoreConfig.from_dict(config.to_dict()) == config
    assert "s3cr3t-value" not in repr(config)
    store = CacheStore.from_config(config)
    assert store.config == config and store.namespace == "team-a" and store.on_corrupt == "recompute"
    for bad, match in [
        ({"on_corrupt": "ignore"}, "on_corrupt"),
        ({"namespace": "../x"}, "namespace"),
        ({"read_from": "memory://x"}, "read_from"),
        ({"read_only": "yes"}, "read_only"),
        ({"url": ""}, "url"),
        ({"url": "memory://a\nb"}, "url"),
    ]:
        with pytest.raises(ConfigError, match=match):
            StoreConfig(**{"url": "memory://cfg", **bad})
