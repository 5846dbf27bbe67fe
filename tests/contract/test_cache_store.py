"""The CacheStore contract, run unchanged against memory://, a local directory and S3 on a real SeaweedFS."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.contract.conftest import StoreRoot
from trtcal.core import read_trt_cache, write_trt_cache
from trtcal.errors import ConfigError, CorruptEntryError, ReadOnlyStoreError, StorageError
from trtcal.storage import CacheStore, EntryFilter, KeyInputs, compute_cache_key


def make_inputs(i: int = 0, *, algorithm: str = "entropy2", model: str = "model-a") -> KeyInputs:
    return KeyInputs(
        model_sha256=hashlib.sha256(model.encode()).hexdigest(),
        batch_fingerprint=hashlib.sha256(f"batch-{i}".encode()).hexdigest(),
        preprocessing={"preset": "imagenet", "size": 224, "mean": [0.485, 0.456, 0.406]},
        algorithm=algorithm,
        algorithm_params={"num_bins": 2048},
        runner="onnxruntime-cpu",
        runner_version="1.32.0",
    )


AMAX = {"input": 2.640625, "conv1/Conv_output_0": 6.0, "(Unnamed Layer* 22) [Constant]_output": 0.0123}


def make_artifacts(i: int = 0) -> dict[str, bytes]:
    return {
        "calibration.cache": write_trt_cache(AMAX, trt_version="10.3.0", algorithm="entropy2"),
        "ranges.json": json.dumps({"index": i, "amax": AMAX}, sort_keys=True).encode(),
        "model.qdq.onnx": hashlib.sha256(str(i).encode()).digest() * 8192,  # 256 KiB of data
    }


def publish(store: CacheStore, i: int = 0, **kwargs: Any) -> tuple[str, Any]:
    inputs = kwargs.pop("inputs", None) or make_inputs(i)
    key = compute_cache_key(inputs)
    return key, store.publish(
        key, kwargs.pop("artifacts", None) or make_artifacts(i), key_inputs=inputs, **kwargs
    )


def flip_byte(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# lookups and publishing


def test_miss_then_publish_then_hit_gives_the_same_bytes(backend: StoreRoot) -> None:
    store = backend.store()
    inputs = make_inputs()
    key = compute_cache_key(inputs)
    assert store.get(key) is None

    artifacts = make_artifacts()
    entry = store.publish(key, artifacts, key_inputs=inputs, extra={"seconds": 12.5})
    assert entry.key == key and entry.namespace == "default"
    assert sorted(entry.names) == sorted(artifacts)

    hit = backend.store().get(key)  # a fresh store object: nothing cached in memory
    assert hit is not None
    for name, data in artifacts.items():
        assert hit.read(name) == data
    assert hit.manifest["key_inputs"] == inputs.to_dict()
    assert hit.manifest["extra"] == {"seconds": 12.5}
    assert hit.manifest["artifacts"]["ranges.json"] == {
        "sha256": hashlib.sha256(artifacts["ranges.json"]).hexdigest(),
        "size": len(artifacts["ranges.json"]),
    }
    assert hit.url == entry.url and hit.url.endswith(f"/{key}.json")


def test_lazy_get_verifies_each_artifact_when_read(backend: StoreRoot) -> None:
    key, entry = publish(backend.store())
    lazy = backend.store().get(key, lazy=True)
    assert lazy is not None
    assert lazy.read("calibration.cache") == make_artifacts()["calibration.cache"]
    lazy.verify()


def test_publishing_an_existing_key_returns_the_committed_entry(backend: StoreRoot) -> None:
    store = backend.store()
    key, first = publish(store, extra={"writer": "first"})
    again = store.publish(key, make_artifacts(), key_inputs=make_inputs(), extra={"writer": "second"})
    assert again.manifest == first.manifest  # the first writer's entry; no error
    assert again.manifest["extra"] == {"writer": "first"}
    staged = [p for p in backend.files() if "/artifacts/" in f"/{p}"]
    assert len({p.rsplit("/", 2)[0] for p in staged}) == 1, staged  # the loser removed its staging directory


def test_large_file_artifact_is_streamed_and_downloaded_verified(backend: StoreRoot, tmp_path: Path) -> None:
    big = tmp_path / "batch.arrow"
    payload = os.urandom(1 << 20) * 12  # 12 MiB: several 5 MiB parts on S3
    big.write_bytes(payload)
    store = backend.store()
    inputs = make_inputs(7)
    key = compute_cache_key(inputs)
    entry = store.publish(
        key,
        {"batch.arrow": big, "calibration.cache": make_artifacts()["calibration.cache"]},
        key_inputs=inputs,
    )
    assert entry.manifest["artifacts"]["batch.arrow"] == {
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
    }

    hit = backend.store().get(key, lazy=True)
    assert hit is not None
    out = hit.download("batch.arrow", tmp_path / "out")
    assert out == tmp_path / "out"
    assert out.read_bytes() == payload
    into_dir = hit.download("calibration.cache", tmp_path)
    assert into_dir == tmp_path / "calibration.cache"


def test_key_must_match_its_inputs_and_nothing_is_written_otherwise(backend: StoreRoot) -> None:
    store = backend.store()
    with pytest.raises(ConfigError, match="does not match key_inputs"):
        store.publish(compute_cache_key(make_inputs(1)), make_artifacts(), key_inputs=make_inputs(2))
    with pytest.raises(ConfigError, match="artifact name"):
        store.publish(compute_cache_key(make_inputs()), {"../escape": b"x"}, key_inputs=make_inputs())
    with pytest.raises(ConfigError, match="bytes or a pathlib.Path"):
        store.publish(
            compute_cache_key(make_inputs()), {"a.txt": "text, not bytes"}, key_inputs=make_inputs()
        )  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="differ only in case"):
        store.publish(
            compute_cache_key(make_inputs()), {"A.bin": b"1", "a.bin": b"2"}, key_inputs=make_inputs()
        )
    assert backend.files() == []


def test_unknown_artifact_name_is_a_clear_error(backend: StoreRoot) -> None:
    _, entry = publish(backend.store())
    with pytest.raises(ConfigError, match="has no artifact 'nope'"):
        entry.read("nope")


# corruption: detected on read, reported with key and path, never used


def _artifact_url(entry: Any, name: str) -> str:
    return entry.artifact_url(name)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "append"])
def test_damaged_artifact_is_reported_and_never_used(
    backend: StoreRoot, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    key, entry = publish(backend.store())
    url = _artifact_url(entry, "model.qdq.onnx")
    data = backend.read(url)
    if damage == "flip":
        backend.write(url, flip_byte(data, len(data) // 2))
    elif damage == "truncate":
        backend.write(url, data[: len(data) // 3])
    elif damage == "append":
        backend.write(url, data + b"\0")
    else:
        backend.delete(url)

    with pytest.raises(CorruptEntryError) as info:
        backend.store().get(key)
    assert info.value.key == key
    assert info.value.url == url
    assert key in str(info.value) and url in str(info.value)

    with caplog.at_level(logging.WARNING, logger="trtcal.storage"):
        assert backend.store(on_corrupt="recompute").get(key) is None
    assert any(key in r.getMessage() and url in r.getMessage() for r in caplog.records)

    if damage != "flip":  # size changes are caught without reading the bytes
        with pytest.raises(CorruptEntryError):
            backend.store().get(key, lazy=True)


def test_flipped_byte_found_by_lazy_read_and_download(backend: StoreRoot, tmp_path: Path) -> None:
    key, entry = publish(backend.store())
    url = _artifact_url(entry, "ranges.json")
    backend.write(url, flip_byte(backend.read(url)))
    lazy = backend.store().get(key, lazy=True)  # sizes still match
    assert lazy is not None
    with pytest.raises(CorruptEntryError, match="sha256"):
        lazy.read("ranges.json")
    dest = tmp_path / "downloads"
    with pytest.raises(CorruptEntryError):
        lazy.download("ranges.json", dest / "ranges.json")
    assert list(dest.iterdir()) == []  # nothing half-written or corrupt appears at the destination
    with pytest.raises(CorruptEntryError):
        lazy.verify()


def test_recompute_policy_replaces_a_corrupt_entry_on_publish(backend: StoreRoot) -> None:
    key, entry = publish(backend.store())
    url = _artifact_url(entry, "calibration.cache")
    backend.write(url, flip_byte(backend.read(url), 5))

    with pytest.raises(CorruptEntryError):  # "fail" will not publish over it either
        publish(backend.store())
    store = backend.store(on_corrupt="recompute")
    assert store.get(key) is None
    _, replaced = publish(store, extra={"run": 2})
    assert replaced.manifest["extra"] == {"run": 2}
    hit = backend.store().get(key)
    assert hit is not None and hit.read("calibration.cache") == make_artifacts()["calibration.cache"]


def _tamper_manifest(backend: StoreRoot, entry: Any, change: Any) -> None:
    manifest = json.loads(backend.read(entry.url))
    change(manifest)
    backend.write(entry.url, json.dumps(manifest).encode())


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda m: m["key_inputs"].update(algorithm="minmax"), id="key-inputs-changed"),
        pytest.param(lambda m: m.update(stage="../../../../../../etc"), id="stage-dotdot"),
        pytest.param(lambda m: m.update(stage="/etc"), id="stage-absolute"),
        pytest.param(
            lambda m: m["artifacts"].update({"../../../../passwd": m["artifacts"]["ranges.json"]}),
            id="name-dotdot",
        ),
        pytest.param(
            lambda m: m["artifacts"].update({"/etc/passwd": m["artifacts"]["ranges.json"]}),
            id="name-absolute",
        ),
        pytest.param(
            lambda m: m["artifacts"].update({"s3://other-bucket/x": m["artifacts"]["ranges.json"]}),
            id="name-url",
        ),
        pytest.param(lambda m: m.update(path="/etc/passwd"), id="extra-path-field"),
        pytest.param(lambda m: m.update(namespace="other"), id="namespace"),
        pytest.param(lambda m: m["artifacts"]["ranges.json"].update(size=-1), id="negative-size"),
        pytest.param(lambda m: m.update(schema="trtcal.cache-entry/99"), id="schema"),
    ],
)
def test_tampered_manifest_is_corrupt(backend: StoreRoot, change: Any) -> None:
    key, entry = publish(backend.store())
    _tamper_manifest(backend, entry, change)
    with pytest.raises(CorruptEntryError, match="bad manifest"):
        backend.store().get(key)
    assert backend.store(on_corrupt="recompute").get(key) is None


def test_manifest_pointing_at_a_real_file_outside_the_root_is_rejected(backend: StoreRoot) -> None:
    """The attacker plants a file outside the store and a manifest whose hash matches it: still corrupt."""
    key, entry = publish(backend.store())
    secret_data = b"outside the store root"
    outside = backend.url.rstrip("/") + "-outside/secret.txt"
    backend.write(outside, secret_data)
    record = {"sha256": hashlib.sha256(secret_data).hexdigest(), "size": len(secret_data)}

    def point_outside(m: dict[str, Any]) -> None:
        m["artifacts"] = {
            "../../../../../../../"
            + backend.url.rstrip("/").rsplit("/", 1)[-1]
            + "-outside/secret.txt": record
        }

    _tamper_manifest(backend, entry, point_outside)
    with pytest.raises(CorruptEntryError, match="not a safe name"):
        backend.store().get(key)


def test_manifest_copied_to_another_key_is_corrupt(backend: StoreRoot) -> None:
    key_a, entry_a = publish(backend.store(), 1)
    key_b, entry_b = publish(backend.store(), 2)
    backend.write(entry_b.url, backend.read(entry_a.url))
    with pytest.raises(CorruptEntryError, match="does not match its location"):
        backend.store().get(key_b)


@pytest.mark.parametrize("data", [b"", b"{not json", b"[1, 2]", b"\xff\xfe", b'{"schema": NaN}'])
def test_unparseable_manifest_is_corrupt(backend: StoreRoot, data: bytes) -> None:
    key, entry = publish(backend.store())
    backend.write(entry.url, data)
    with pytest.raises(CorruptEntryError):
        backend.store().get(key)


# sharing: namespaces, read-through, read-only


def test_namespaces_are_separate_and_read_from_finds_other_teams(backend: StoreRoot) -> None:
    team_a = backend.store(namespace="team-a")
    key, _ = publish(team_a)
    team_b = backend.store(namespace="team-b")
    assert team_b.get(key) is None
    reader = backend.store(namespace="team-b", read_from=[f"{backend.url}#team-a"], read_only=True)
    hit = reader.get(key)
    assert hit is not None and hit.namespace == "team-a"
    assert hit.read("calibration.cache") == make_artifacts()["calibration.cache"]
    via_object = backend.store(
        namespace="team-b", read_from=[backend.store(namespace="team-a", read_only=True)]
    )
    assert via_object.get(key) is not None


def test_read_only_store_reads_but_never_writes(backend: StoreRoot) -> None:
    key, _ = publish(backend.store())
    before = backend.files()
    reader = backend.store(read_only=True)
    assert reader.get(key) is not None
    with pytest.raises(ReadOnlyStoreError):
        publish(reader, 3)
    with pytest.raises(ReadOnlyStoreError):
        reader.gc()
    assert backend.files() == before


# ls, verify, gc


def test_ls_lists_every_namespace_and_filters(backend: StoreRoot) -> None:
    a = backend.store(namespace="team-a")
    b = backend.store(namespace="team-b")
    key1, _ = publish(a, inputs=make_inputs(1, algorithm="entropy2", model="m1"))
    key2, _ = publish(a, inputs=make_inputs(2, algorithm="minmax", model="m1"))
    key3, _ = publish(b, inputs=make_inputs(3, algorithm="minmax", model="m2"))
    store = backend.store()
    assert {i.key for i in store.ls()} == {key1, key2, key3}
    assert {i.key for i in store.ls(EntryFilter(namespace="team-a"))} == {key1, key2}
    assert {i.key for i in store.ls(EntryFilter(algorithm="minmax"))} == {key2, key3}
    m1 = hashlib.sha256(b"m1").hexdigest()
    assert {i.key for i in store.ls(EntryFilter(model_sha256=m1[:8]))} == {key1, key2}
    assert {i.key for i in store.ls(EntryFilter(key_prefix=key3[:6]))} == {key3}
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    assert len(store.ls(EntryFilter(created_before=future))) == 3
    assert store.ls(EntryFilter(created_after=future)) == []
    info = store.ls(EntryFilter(key_prefix=key1))[0]
    assert info.algorithm == "entropy2" and info.model_sha256 == m1 and info.problem is None
    assert info.size == sum(len(v) for v in make_artifacts(1).values())


def test_ls_reads_manifests_when_the_listing_index_is_missing_or_odd(backend: StoreRoot) -> None:
    store = backend.store()
    keys = [publish(store, i, inputs=make_inputs(i, algorithm=("entropy2", "minmax")[i % 2]))[0] for i in range(4)]
    expected = {(i.key, i.created_at, i.algorithm, i.model_sha256, i.size, i.artifact_count) for i in store.ls()}
    assert len(expected) == 4
    markers = [p for p in backend.files() if "/index/" in f"/{p}"]
    assert sorted(m.split("/")[-1].split("~")[0] for m in markers) == sorted(keys)
    # The markers of keys 0, 1, 2 in that order (keys[3]'s stays intact: gc must remove it below).
    markers = sorted(markers, key=lambda m: keys.index(m.split("/")[-1].split("~")[0]))
    root = backend.url.rstrip("/") + "/"
    backend.delete(root + markers[0])  # missing
    parts = markers[1].split("~")
    backend.write(root + "~".join([parts[0], "20200101T000000000000Z", *parts[2:]]), b"")  # two markers, one stale
    backend.write(root + markers[2].rsplit("/", 1)[0] + "/" + keys[2] + "~garbage", b"")  # malformed extra name
    again = {(i.key, i.created_at, i.algorithm, i.model_sha256, i.size, i.artifact_count) for i in store.ls()}
    assert again == expected
    assert {i.key for i in store.ls(EntryFilter(algorithm="minmax"))} == {keys[1], keys[3]}
    # gc leaves markers of live entries alone and removes those of entries that are gone.
    report = store.gc(orphan_grace=timedelta(0))
    assert report.removed_orphans == []
    backend.delete(store.get(keys[3]).url)
    report = store.gc(orphan_grace=timedelta(0))
    assert len(report.removed_orphans) == 2  # the staging directory and the index marker of keys[3]
    assert not any(keys[3] in p for p in backend.files())


def test_ls_shows_unreadable_manifests_and_verify_reports_every_problem(backend: StoreRoot) -> None:
    store = backend.store()
    good, _ = publish(store, 1)
    bad_bytes, entry_bytes = publish(store, 2)
    bad_manifest, entry_manifest = publish(store, 3)
    url = entry_bytes.artifact_url("model.qdq.onnx")
    backend.write(url, flip_byte(backend.read(url)))
    backend.write(entry_manifest.url, b"garbage")

    # ls trusts the listing index for display: the entry is listed as before.
    listed = {i.key: i for i in store.ls()}
    assert set(listed) == {good, bad_bytes, bad_manifest}
    assert all(i.problem is None for i in listed.values())
    # Without its index marker ls reads the manifest, and says it is unreadable.
    for marker in [p for p in backend.files() if p.split("/")[-1].startswith(bad_manifest + "~")]:
        backend.delete(backend.url.rstrip("/") + "/" + marker)
    listed = {i.key: i for i in store.ls()}
    assert set(listed) == {good, bad_bytes, bad_manifest}
    assert listed[bad_manifest].problem is not None and listed[good].problem is None
    assert [i.key for i in store.ls(EntryFilter(algorithm="entropy2"))] == [good, bad_bytes]  # needs fields it lacks

    results = {r.key: r for r in store.verify()}
    assert results[good].ok
    assert (
        not results[bad_bytes].ok
        and results[bad_bytes].url == url
        and "sha256" in (results[bad_bytes].problem or "")
    )
    assert not results[bad_manifest].ok


def test_gc_removes_orphans_after_the_grace_period_and_old_entries(backend: StoreRoot) -> None:
    store = backend.store()
    key, entry = publish(store)
    # A writer that crashed after staging its artifacts: files under a staging id, no manifest.
    crashed_key = compute_cache_key(make_inputs(99))
    stage_url = (
        entry.artifact_url("ranges.json").rsplit("/", 4)[0]
        + f"/{crashed_key[:2]}/{crashed_key}/s20200101T000000Z-00000000000000aa"
    )
    backend.write(stage_url + "/ranges.json", b"partial")
    assert store.get(crashed_key) is None  # never visible

    report = store.gc()  # default grace: files just written are kept (a writer may be uploading)
    assert report.removed_orphans == [] and report.kept_recent_orphans == 1
    report = store.gc(orphan_grace=timedelta(0), dry_run=True)
    assert len(report.removed_orphans) == 1 and any(crashed_key in p for p in backend.files())
    report = store.gc(orphan_grace=timedelta(0))
    assert report.removed_orphans == [stage_url] and report.removed_entries == []
    assert not any(crashed_key in p for p in backend.files())
    assert store.get(key) is not None  # committed entries untouched

    report = store.gc(older_than=datetime.now(timezone.utc) + timedelta(seconds=1))
    assert report.removed_entries == [f"default/{key}"]
    assert store.get(key) is None
    assert [p for p in backend.files() if key in p] == []


def test_gc_leaves_entries_with_unreadable_manifests_alone(backend: StoreRoot) -> None:
    store = backend.store()
    key, entry = publish(store)
    backend.write(entry.url, b"garbage")
    report = store.gc(orphan_grace=timedelta(0), older_than=timedelta(0))
    assert report.unreadable_manifests == [entry.url]
    assert report.removed_entries == [] and report.removed_orphans == []
    assert any(p.endswith("model.qdq.onnx") for p in backend.files())


# TensorRT export


def test_export_sets_the_header_for_any_tensorrt_version_and_keeps_scale_bits(backend: StoreRoot) -> None:
    key, _ = publish(backend.store())
    stored = read_trt_cache(make_artifacts()["calibration.cache"])
    for version, header in [
        ("10.16.1", "TRT-101601-EntropyCalibration2"),
        ("8.6.1", "TRT-8601-EntropyCalibration2"),
    ]:
        data = backend.store(read_only=True).export_trt_cache(key, trt_version=version)
        assert data.split(b"\n", 1)[0].decode() == header
        assert read_trt_cache(data).scale == stored.scale  # exact floats, same order
        assert data.split(b"\n", 1)[1] == make_artifacts()["calibration.cache"].split(b"\n", 1)[1]
    with pytest.raises(ConfigError, match="no minmax scales.*entropy2"):  # never entropy2's scales under a MinMax header
        backend.store().export_trt_cache(key, trt_version="10.3.0", algorithm="minmax")
    assert backend.store().export_trt_cache(key, trt_version="10.3.0", algorithm="EntropyCalibration2").startswith(
        b"TRT-100300-EntropyCalibration2\n"
    )
    with pytest.raises(StorageError, match="no cache entry"):
        backend.store().export_trt_cache(compute_cache_key(make_inputs(42)), trt_version="10.16.1")
    with pytest.raises(ConfigError):
        backend.store().export_trt_cache(key, trt_version="ten")


# hostile names at the API


@pytest.mark.parametrize(
    "key",
    [
        "..",
        "../" + "0" * 61,
        "/" + "0" * 63,
        "0" * 63 + "\x00",
        "0" * 63 + "\n",
        "%2e%2e" + "0" * 58,
        "s3://bucket/" + "0" * 52,
        "A" * 64,
        "0" * 63,
    ],
)
def test_hostile_keys_are_rejected_before_any_io(backend: StoreRoot, key: str) -> None:
    store = backend.store()
    with pytest.raises(ConfigError, match="cache key"):
        store.get(key)
    with pytest.raises(ConfigError, match="cache key"):
        store.publish(key, make_artifacts(), key_inputs=make_inputs())
    assert backend.files() == []


@pytest.mark.parametrize(
    "namespace", ["..", ".", "a/b", "/abs", "Team", "a\nb", "a\x00", "team#x", "~root", "", "x" * 65, "é"]
)
def test_hostile_namespaces_are_rejected(backend: StoreRoot, namespace: str) -> None:
    with pytest.raises(ConfigError, match="namespace"):
        backend.store(namespace=namespace)
    with pytest.raises(ConfigError, match="namespace"):
        backend.store().ls(EntryFilter(namespace=namespace))
