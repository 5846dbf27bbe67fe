"""Hostile input, fuzzed (hypothesis) and hand-written: only trtcal's own errors, never a crash,
a hang, unbounded memory or a write outside where trtcal writes.

Not repeated here (already covered): the TensorRT cache reader fuzz (tests/unit/core/
test_cache_format.py), truncated/zero-byte/non-image/bomb images and symlinked dataset files
(tests/integration/test_batch_build.py, tests/unit/workers/test_sources.py), hostile keys and
namespaces on every store backend (tests/contract/), the .pth reader (tests/unit/test_pth_reader.py).
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.tiny_cnn import tiny_batch, tiny_cnn, write_tiny_cnn
from trtcal.errors import CacheFormatError, ConfigError, DataError, ModelError, TrtcalError
from trtcal.storage import CacheStore, compute_cache_key
from trtcal.storage.index import parse_index_name
from trtcal.storage.manifest import parse_manifest
from trtcal.storage.names import check_artifact_name, check_key, check_namespace
from trtcal.storage.trt_export import retarget_trt_cache

REPO_ROOT = Path(__file__).resolve().parents[2]
INPUTS = {"model_sha256": "ab" * 32, "algorithm": "entropy2"}
KEY = compute_cache_key(INPUTS)
CACHE = b"TRT-100300-EntropyCalibration2\ninput: 3c010a14\nconv1: 3d4ccccd\n"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _peak_rss_mib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


@pytest.fixture(scope="module")
def manifest_bytes() -> bytes:
    store = CacheStore("memory://reliability-manifest")
    entry = store.publish(KEY, {"calibration.cache": CACHE, "ranges.json": b"{}"}, key_inputs=INPUTS, extra={"n": 1})
    return json.dumps(entry.manifest, sort_keys=True).encode()


# --- manifests ---------------------------------------------------------------------------------


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 overwrite a byte, 1 delete one, 2 insert one."""
    out = bytearray(data)
    for kind, position, value in edits:
        if not out:
            break
        i = position % len(out)
        if kind == 0:
            out[i] = value
        elif kind == 1:
            del out[i]
        else:
            out.insert(i, value)
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(edits=EDITS)
def test_fuzzed_manifest_bytes_parse_or_raise_cache_format_error(manifest_bytes: bytes, edits: list[Any]) -> None:
    data = _mutate(manifest_bytes, edits)
    try:
        manifest = parse_manifest(data, key=KEY, namespace="default")
    except CacheFormatError:
        return
    # Whatever got through is still a manifest of this key whose names are safe path components.
    assert manifest.key == KEY
    for name in manifest.artifacts:
        check_artifact_name(name)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(field=st.sampled_from(["schema", "key", "namespace", "key_inputs", "stage", "artifacts", "created_at", "extra",
                              "trtcal_version", "unknown"]), value=JSON_VALUES)
def test_manifest_fields_replaced_by_any_json_value(manifest_bytes: bytes, field: str, value: Any) -> None:
    obj = json.loads(manifest_bytes)
    obj[field] = value
    try:
        parse_manifest(json.dumps(obj).encode(), key=KEY, namespace="default")
    except CacheFormatError:
        pass


@FUZZ
@given(name=st.text(max_size=60), path=st.sampled_from(["../../etc/passwd", "/etc/passwd", "a/../../b", "x\x00y", "ok.bin"]))
def test_artifact_records_with_hostile_names_are_refused(manifest_bytes: bytes, name: str, path: str) -> None:
    obj = json.loads(manifest_bytes)
    record = next(iter(obj["artifacts"].values()))
    for hostile in (name, path):
        obj["artifacts"] = {hostile: record}
        try:
            manifest = parse_manifest(json.dumps(obj).encode(), key=KEY, namespace="default")
        except CacheFormatError:
            continue
        assert set(manifest.artifacts) == {hostile}
        assert "/" not in hostile and "\\" not in hostile and ".." not in hostile and "\x00" not in hostile


def test_deeply_nested_or_huge_manifests_are_refused_without_a_crash_or_memory_blowup() -> None:
    before = _peak_rss_mib()
    cases = [
        b"[" * 200_000 + b"]" * 200_000,  # recursion bomb for a naive parser
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'"' + b"x" * (64 << 20) + b'"',  # 64 MiB string
        b"\xff\xfe" + "{}".encode("utf-16-le"),
        b"{}" + b"\x00" * 10,
    ]
    for data in cases:
        with pytest.raises(CacheFormatError):
            parse_manifest(data, key=KEY, namespace="default")
    assert _peak_rss_mib() - before < 512


@FUZZ
@given(name=st.text(max_size=300))
def test_index_marker_names_never_raise(name: str) -> None:
    record = parse_index_name(name)
    assert record is None or len(record.key) == 64


@FUZZ
@given(edits=EDITS, version=st.sampled_from(["10.16.1", "8.6.1", 100300]))
def test_fuzzed_caches_retarget_or_raise_cache_format_error(edits: list[Any], version: Any) -> None:
    try:
        out = retarget_trt_cache(_mutate(CACHE, edits), trt_version=version)
    except CacheFormatError:
        return
    assert out.startswith(b"TRT-")


# --- names and paths ---------------------------------------------------------------------------

HOSTILE_NAMES = [
    "..", "../x", "a/../../b", "/etc/passwd", "C:\\x", "x\x00y", "x\ny", "x\rname", " ", "", "a" * 5000,
    "ü", "名前", "\u202etxt.exe", "x%2f..", "x?y", "x#y", "~root", ".hidden", "-rf",
]


@FUZZ
@given(value=st.one_of(st.text(max_size=200), st.sampled_from(HOSTILE_NAMES), st.binary(max_size=80).map(lambda b: b.decode("latin-1"))))
def test_name_checks_accept_only_safe_path_components(value: str) -> None:
    for check in (check_key, check_namespace, check_artifact_name):
        try:
            accepted = check(value)
        except ConfigError:
            continue
        assert accepted == value
        assert value not in ("", ".", "..") and not value.startswith(("/", ".", "-"))
        assert not any(c in value for c in "/\\\x00\n\r:%?#") and ".." not in value
        assert value.isascii() and len(value) <= 128


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_artifact_names_and_namespaces_never_reach_the_file_system(tmp_path: Path, name: str) -> None:
    root = tmp_path / "store"
    outside = tmp_path / "outside-marker"
    with pytest.raises(ConfigError):
        CacheStore(str(root)).publish(KEY, {name: b"x"}, key_inputs=INPUTS)
    with pytest.raises(ConfigError):
        CacheStore(str(root), namespace=name).publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS)
    assert not outside.exists()
    assert not root.exists() or [p for p in root.rglob("*") if p.is_file()] == []


def test_symlinked_stage_directory_in_a_local_store_never_lets_gc_delete_outside(tmp_path: Path) -> None:
    """Someone with write access to a shared store points an entry's staging directory at a victim's
    folder; `gc` (removing that entry as old) must delete the link, never what it points to."""
    from datetime import timedelta

    root = tmp_path / "store"
    store = CacheStore(str(root))
    entry = store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS)
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "calibration.cache").write_bytes(CACHE)  # same bytes: the entry even verifies through the link
    (victim / "thesis.tex").write_text("years of work")
    (victim / "sub" / "data.bin").write_bytes(b"1234")
    stage_dir = root / "v1" / "default" / "artifacts" / KEY[:2] / KEY / entry.manifest["stage"]
    for f in stage_dir.iterdir():
        f.unlink()
    stage_dir.rmdir()
    stage_dir.symlink_to(victim, target_is_directory=True)
    report = store.gc(older_than=timedelta(0))
    assert report.removed_entries == [f"default/{KEY}"]
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert (victim / "sub" / "data.bin").exists() and (victim / "calibration.cache").exists()
    assert not stage_dir.is_symlink() and not stage_dir.exists()
    assert store.get(KEY) is None


def test_symlinks_planted_in_a_local_store_are_never_followed(tmp_path: Path) -> None:
    """A manifest linked to a private file, an artifact linked to /dev/zero (an endless read) or to a
    FIFO (a read that blocks forever): clear errors, no hang, no private content in any message."""
    from trtcal.errors import StorageError

    root = tmp_path / "store"
    store = CacheStore(str(root))
    entry = store.publish(KEY, {"calibration.cache": CACHE}, key_inputs=INPUTS)
    private = tmp_path / "private.json"
    private.write_text('{"api_token": "PRIVATE-CONTENT-3141"}')
    manifest = root / "v1" / "default" / "entries" / KEY[:2] / f"{KEY}.json"
    saved = manifest.read_bytes()
    manifest.unlink()
    manifest.symlink_to(private)
    with pytest.raises((StorageError, CacheFormatError)) as info:
        store.get(KEY)
    assert "PRIVATE-CONTENT" not in str(info.value) and "symbolic link" in str(info.value)
    assert all("PRIVATE-CONTENT" not in str(r.problem) for r in store.verify())
    manifest.unlink()
    manifest.write_bytes(saved)
    artifact = root / "v1" / "default" / "artifacts" / KEY[:2] / KEY / entry.manifest["stage"] / "calibration.cache"
    os.mkfifo(tmp_path / "fifo")
    for target in ("/dev/zero", str(tmp_path / "fifo")):
        artifact.unlink()
        artifact.symlink_to(target)
        for lazy in (False, True):
            with pytest.raises(TrtcalError):
                hit = store.get(KEY, lazy=lazy)
                assert hit is not None
                hit.read("calibration.cache")
        results = store.verify()
        assert [r.ok for r in results] == [False]


# --- batches and tensor files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trtcal.batch import write_batch

    path = tmp_path_factory.mktemp("batch") / "b.arrow"
    write_batch(path, {"input": tiny_batch(4)}, [f"s{i}" for i in range(4)], spec={"preset": "raw"})
    return path


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(max_size=120), dims=st.lists(st.integers(0, 2**20), min_size=0, max_size=3),
       dtype=st.sampled_from(["<f4", "|O", "<f8", "|V8", "<U4", "|b1", "<i8", "bogus"]))
def test_fuzzed_npy_headers_are_refused_without_allocating(tmp_path: Path, header: bytes, dims: list[int], dtype: str) -> None:
    from trtcal.batch import batch_from_numpy

    text = f"{{'descr': {dtype!r}, 'fortran_order': False, 'shape': {tuple(dims)!r}, }}"
    raw = text.encode("latin-1")
    raw += b" " * (63 - (len(raw) + 10) % 64) + b"\n"
    variants = [b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw + b"\x00" * 64, b"\x93NUMPY\x01\x00" + header]
    before = _peak_rss_mib()
    for i, data in enumerate(variants):
        path = tmp_path / f"f{i}.npy"
        path.write_bytes(data)
        try:
            batch = batch_from_numpy(str(path), input_name="input")
            assert batch.num_rows * int(np.prod(dims[1:], dtype=np.int64)) * 8 <= len(data)
        except TrtcalError:
            pass
    assert _peak_rss_mib() - before < 512


def test_npy_header_whose_shape_product_overflows_int64_is_a_data_error(tmp_path: Path) -> None:
    from trtcal.batch import batch_from_numpy

    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (1114, 178, 46517843999549), }"
    raw = text.encode("latin-1")
    raw += b" " * (63 - (len(raw) + 10) % 64) + b"\n"
    path = tmp_path / "overflow.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw + b"\x00" * 64)
    with pytest.raises(DataError):
        batch_from_numpy(str(path), input_name="input")


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_pickles_planted_as_tensor_files_or_batches_are_never_unpickled(tmp_path: Path) -> None:
    from trtcal.orchestrator.calibrate import calibrate

    marker = tmp_path / "EXECUTED"
    model = write_tiny_cnn(tmp_path / "m.onnx")
    np.save(tmp_path / "obj.npy", np.array([_Planted(marker), 1], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "obj.npz", input=np.array([_Planted(marker)], dtype=object))
    import pickle

    (tmp_path / "pickle.arrow").write_bytes(pickle.dumps(_Planted(marker)))
    (tmp_path / "pickle.npy").write_bytes(pickle.dumps(_Planted(marker)))  # np.load(allow_pickle=True) would run it
    for name in ("obj.npy", "obj.npz", "pickle.arrow", "pickle.npy"):
        with pytest.raises(DataError):
            calibrate(str(model), str(tmp_path / name), output_dir=tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists()
    assert not marker.exists()


# --- models ------------------------------------------------------------------------------------


def _with_external_weight(location: str) -> Any:
    from onnx import TensorProto

    model = tiny_cnn()
    init = model.graph.initializer[0]
    nbytes = len(init.raw_data)
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(nbytes))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    init.ClearField("raw_data")
    return model


@pytest.mark.parametrize("location", ["../../../../../../etc/passwd", "/etc/passwd", "../secret.bin", "sub/../../secret.bin"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path, location: str) -> None:
    from trtcal.orchestrator.calibrate import calibrate

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "secret.bin").write_bytes(np.ones(216, np.float32).tobytes())  # the right size, outside
    model = folder / "m.onnx"
    model.write_bytes(_with_external_weight(location).SerializeToString())
    np.save(tmp_path / "b.npy", tiny_batch(4))
    with pytest.raises(ModelError, match="external data"):
        calibrate(str(model), str(tmp_path / "b.npy"), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


_EXTERNAL_PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.reliability.test_bad_input import _with_external_weight
    from trtcal.errors import ModelError
    from trtcal.model import load_model
    folder = Path({folder!r})
    (folder / "m.onnx").write_bytes(_with_external_weight({location!r}).SerializeToString())
    try:
        load_model(str(folder / "m.onnx"))
        print("LOADED")
    except ModelError as exc:
        print("REFUSED", exc)
    """
)


@pytest.mark.parametrize("location", ["/dev/zero", "../outside.fifo"])
def test_external_data_location_never_makes_trtcal_read_a_device_or_fifo(tmp_path: Path, location: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(tmp_path / "outside.fifo")  # opening it for reading blocks until a writer comes: none will
    code = _EXTERNAL_PROBE.format(root=str(REPO_ROOT), folder=str(folder), location=location)
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_model hung on external data location {location!r}")
    assert result.stdout.startswith("REFUSED"), result.stdout + result.stderr


def test_tensor_names_that_cannot_be_written_to_a_cache_are_a_clear_error(tmp_path: Path) -> None:
    from trtcal.orchestrator.calibrate import calibrate

    names = {"r1": "evil\nname: 7f000000", "c2": "../../etc/x", "pool": "ü" * 300, "flat": "a:b c"}
    model = tmp_path / "hostile.onnx"
    model.write_bytes(tiny_cnn(names=names).SerializeToString())
    np.save(tmp_path / "b.npy", tiny_batch(4))
    with pytest.raises(TrtcalError, match="evil") as info:
        calibrate(str(model), str(tmp_path / "b.npy"), output_dir=tmp_path / "out")
    assert isinstance(info.value, (ConfigError, CacheFormatError, ModelError))
    assert not (tmp_path / "out").exists() and not (tmp_path / "etc").exists()
    # Names that are odd but writable go through, and never become paths.
    ok = tmp_path / "odd.onnx"
    ok.write_bytes(tiny_cnn(names={"c2": "../../etc/x", "pool": "ü" * 300, "flat": "a b\tc"}).SerializeToString())
    result = calibrate(str(ok), str(tmp_path / "b.npy"), output_dir=tmp_path / "out2")
    assert "../../etc/x" in result.tensor_names
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == sorted(p.name for p in (tmp_path / "out2").iterdir() if "/" not in p.name)
    assert not (tmp_path / "etc").exists() and not (tmp_path.parent / "etc" / "x").exists()


@pytest.mark.parametrize("content", [b"", b"\x08\x07" * 10, os.urandom(4096), b"ir_version: 8", b"\x0a\xff\xff\xff\xff\x0f"])
def test_invalid_onnx_models_are_a_model_error(tmp_path: Path, content: bytes) -> None:
    from trtcal.orchestrator.calibrate import calibrate

    model = tmp_path / "bad.onnx"
    model.write_bytes(content)
    np.save(tmp_path / "b.npy", tiny_batch(4))
    with pytest.raises(ModelError):
        calibrate(str(model), str(tmp_path / "b.npy"), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_batch_missing_a_model_input_names_it(tmp_path: Path) -> None:
    from trtcal.orchestrator.calibrate import calibrate

    model = write_tiny_cnn(tmp_path / "m.onnx")
    np.savez(tmp_path / "wrong.npz", other=tiny_batch(4))
    with pytest.raises(DataError, match="missing input.*'input'"):
        calibrate(str(model), str(tmp_path / "wrong.npz"), output_dir=tmp_path / "out")
    np.save(tmp_path / "shape.npy", np.zeros((4, 3, 16, 16), np.float32))
    with pytest.raises(DataError, match="shape"):
        calibrate(str(model), str(tmp_path / "shape.npy"), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- images ------------------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_images_with_wrong_extensions_are_decoded_by_content_or_refused() -> None:
    from PIL import Image

    from trtcal.workers.preprocess import InputRejected, preprocess_image_bytes, preset

    spec = preset("imagenet")
    png = _png(300, 260)
    assert preprocess_image_bytes(png, spec)["input"].shape == (3, 224, 224)  # a PNG named .jpg is still a PNG
    for fmt in ("GIF", "TIFF", "ICO", "PDF"):  # formats a calibration set has no business holding
        buffer = io.BytesIO()
        Image.new("RGB", (300, 260)).save(buffer, fmt)
        with pytest.raises(InputRejected) as info:
            preprocess_image_bytes(buffer.getvalue(), spec)
        assert info.value.args and "non-image" in str(info.value.args[0]) + str(info.value)
    for data in (b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"#!/bin/sh\nrm -rf /\n", b"PK\x03\x04" + b"\x00" * 100):
        with pytest.raises(InputRejected):
            preprocess_image_bytes(data, spec)


def test_huge_declared_dimensions_are_refused_before_decoding() -> None:
    import struct
    import zlib

    from trtcal.workers.preprocess import InputRejected, preprocess_image_bytes, preset

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    def png_header_only(width: int, height: int) -> bytes:  # a few dozen bytes claiming a gigantic image
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")

    before = _peak_rss_mib()
    for width, height in ((2**31 - 1, 2**31 - 1), (1_000_000, 1_000_000), (65_535, 65_535)):
        with pytest.raises(InputRejected) as info:
            preprocess_image_bytes(png_header_only(width, height), preset("imagenet"))
        assert "bomb" in str(info.value) or info.value.args[0] == "bomb"
    assert _peak_rss_mib() - before < 256


_ASPECT_PROBE = textwrap.dedent(
    """
    import resource, sys
    sys.path.insert(0, {root!r})
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from tests.reliability.test_bad_input import _png
    from trtcal.errors import TrtcalError
    from trtcal.workers.preprocess import preprocess_image_bytes, preset
    try:
        preprocess_image_bytes(_png({width}, 1), preset("imagenet"))
        print("DECODED")
    except TrtcalError as exc:
        print("REFUSED", type(exc).__name__, exc)
    except BaseException as exc:
        print("CRASH", type(exc).__name__, exc)
    """
)


@pytest.mark.parametrize("width", [100_000, 20_000_000])
def test_extreme_aspect_ratio_is_refused_not_resized_into_gigabytes(width: int) -> None:
    code = _ASPECT_PROBE.format(root=str(REPO_ROOT), width=width)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("REFUSED"), result.stdout + result.stderr[-2000:]


_BATCH_EDIT_SCAN = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from trtcal.errors import TrtcalError
    from trtcal.batch import open_batch
    valid = Path({batch!r}).read_bytes()
    folder = Path({folder!r})
    escaped = {{}}
    for offset in [*range(0, 1024), *range(len(valid) - 1024, len(valid))]:
        for edit in (b"\\x00", b"\\xff", None):
            path = folder / f"edit-{{offset}}-{{edit.hex() if edit else 'cut'}}.arrow"  # never rewrite a mapped file
            path.write_bytes(valid[:offset] + edit + valid[offset + 1 :] if edit is not None else valid[:offset])
            print(path.name, flush=True)  # the last name printed is the culprit if this process dies
            try:
                with open_batch(path) as batch:
                    batch.verify()
            except TrtcalError:
                pass
            except Exception as exc:
                escaped.setdefault(f"{{type(exc).__name__}}: {{str(exc)[:60]}}", path.name)
            path.unlink()
    print("ESCAPED " + json.dumps(escaped))
    """
)


@pytest.mark.slow
def test_every_single_byte_edit_of_a_batch_header_or_footer_is_a_trtcal_error(batch_file: Path, tmp_path: Path) -> None:
    """Exhaustive and deterministic, in a child process (a crash must not take pytest down): each byte of
    the first and last KiB set to 0x00 and to 0xFF, and the file cut there. Only trtcal's errors (or a
    valid batch) may come out."""
    code = _BATCH_EDIT_SCAN.format(root=str(REPO_ROOT), batch=str(batch_file), folder=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"the reader crashed (exit {result.returncode}) on {last}: {result.stderr[-1500:]}"
    assert last == "ESCAPED {}", last


@pytest.mark.parametrize("shape", [(0, 2**62, 2**40), (2**40, 7, 2**40, 0)])
def test_npy_with_a_zero_dimension_beside_huge_ones_is_a_data_error(tmp_path: Path, shape: tuple[int, ...]) -> None:
    from trtcal.batch import batch_from_numpy

    raw = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}".encode("latin-1")
    raw += b" " * (63 - (len(raw) + 10) % 64) + b"\n"
    path = tmp_path / "zero.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw + b"\x00" * 64)
    with pytest.raises(DataError):
        batch_from_numpy(str(path), input_name="input")
