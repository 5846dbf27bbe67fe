"""The calibration batch format: layout, sorting, fingerprint, atomic writes, readers, bad input."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trtcal._version import FORMAT_VERSION
from trtcal.batch import (
    FINGERPRINT_SCHEME,
    BatchWriter,
    batch_from_arrays,
    batch_from_numpy,
    compute_fingerprint,
    open_batch,
    write_batch,
)
from trtcal.errors import ConfigError, DataError

SPEC = {"resize_shorter": 256, "center_crop": 224, "mean": 127.0}


def _data(n: int = 10, seed: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    arrays = {
        "image": rng.standard_normal((n, 3, 4, 5)).astype(np.float32),
        "mask": rng.integers(0, 255, (n, 7)).astype(np.uint8),
    }
    return arrays, [f"img-{i:03d}" for i in range(n)]


def _shuffled(arrays: dict[str, np.ndarray], ids: list[str], seed: int) -> tuple[dict[str, np.ndarray], list[str]]:
    perm = np.random.default_rng(seed).permutation(len(ids))
    return {k: v[perm] for k, v in arrays.items()}, [ids[i] for i in perm]


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- layout ---------------------------------------------------------------------------------------


def test_file_is_one_record_batch_sorted_by_id_with_tensor_columns_and_metadata(tmp_path: Path) -> None:
    arrays, ids = _data()
    info = write_batch(tmp_path / "b.arrow", *_shuffled(arrays, ids, 1), spec=SPEC)

    reader = pa.ipc.open_file(pa.memory_map(str(tmp_path / "b.arrow")))  # plain pyarrow, no trtcal
    assert reader.num_record_batches == 1
    batch = reader.get_batch(0)
    assert batch.schema.names == ["sample_id", "image", "mask"]
    assert batch.column("sample_id").to_pylist() == ids
    image_type = batch.schema.field("image").type
    assert isinstance(image_type, pa.FixedShapeTensorType)
    assert image_type.extension_name == "arrow.fixed_shape_tensor"
    assert list(image_type.shape) == [3, 4, 5] and image_type.value_type == pa.float32()
    np.testing.assert_array_equal(batch.column("image").to_numpy_ndarray(), arrays["image"])
    np.testing.assert_array_equal(batch.column("mask").to_numpy_ndarray(), arrays["mask"])
    meta = batch.schema.metadata
    assert json.loads(meta[b"trtcal.spec"]) == SPEC
    assert meta[b"trtcal.format_version"] == str(FORMAT_VERSION).encode()
    assert meta[b"trtcal.fingerprint"].decode() == info.fingerprint
    assert info.num_rows == 10 and info.nbytes == (tmp_path / "b.arrow").stat().st_size


def test_fingerprint_follows_the_documented_procedure() -> None:
    """An independent re-statement of compute_fingerprint's docstring."""
    arrays, ids = _data(4)
    header = {
        "num_rows": 4,
        "inputs": [
            {"name": "image", "shape": [3, 4, 5], "dtype": "float32"},
            {"name": "mask", "shape": [7], "dtype": "uint8"},
        ],
    }
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert FINGERPRINT_SCHEME == "trtcal-batch-sha256-v2"
    h = hashlib.sha256(b"trtcal-batch-sha256-v2\n")
    h.update(struct.pack("<Q", len(header_bytes)) + header_bytes)
    for s in ids:
        h.update(struct.pack("<Q", len(s.encode())) + s.encode())
    for name in ("image", "mask"):
        for row in arrays[name]:
            h.update(hashlib.sha256(row.astype(row.dtype.newbyteorder("<")).tobytes()).digest())
    assert compute_fingerprint(ids, arrays) == "sha256:" + h.hexdigest()

    # Format 2 files: the values as one stream.
    v1 = hashlib.sha256(b"trtcal-batch-sha256-v1\n")
    v1.update(struct.pack("<Q", len(header_bytes)) + header_bytes)
    for s in ids:
        v1.update(struct.pack("<Q", len(s.encode())) + s.encode())
    v1.update(arrays["image"].astype("<f4").tobytes())
    v1.update(arrays["mask"].tobytes())
    assert compute_fingerprint(ids, arrays, scheme="trtcal-batch-sha256-v1") == "sha256:" + v1.hexdigest()


def test_fingerprint_is_the_same_on_one_thread_and_many(monkeypatch: pytest.MonkeyPatch) -> None:
    """Big enough for several hashing chunks: the threaded path must fold digests in row order."""
    import trtcal.batch.format as bf

    monkeypatch.setattr(bf, "_HASH_CHUNK", 4096)
    arrays, ids = _data(300)
    many = compute_fingerprint(ids, arrays)
    monkeypatch.setattr(bf, "_hash_threads", lambda: 1)
    assert compute_fingerprint(ids, arrays) == many


def test_format_2_batches_are_still_read_and_verified(tmp_path: Path) -> None:
    import pyarrow as pa

    from trtcal.batch.format import record_batch

    arrays, ids = _data(6)
    v1 = compute_fingerprint(ids, arrays, scheme="trtcal-batch-sha256-v1")
    batch = record_batch(ids, arrays, "{}", v1)
    meta = dict(batch.schema.metadata)
    meta[b"trtcal.format_version"] = b"2"
    batch = batch.replace_schema_metadata(meta)
    for name, fingerprint in (("ok.arrow", v1), ("bad.arrow", compute_fingerprint(ids, arrays))):
        batch = batch.replace_schema_metadata({**meta, b"trtcal.fingerprint": fingerprint.encode()})
        with pa.OSFile(str(tmp_path / name), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
    with open_batch(tmp_path / "ok.arrow") as opened:
        assert opened.fingerprint == v1
        opened.slice(1, 3).verify()
    with pytest.raises(DataError, match="corrupt or was modified"):
        open_batch(tmp_path / "bad.arrow")


def test_same_rows_in_any_order_give_identical_bytes(tmp_path: Path) -> None:
    arrays, ids = _data(12)
    write_batch(tmp_path / "a.arrow", arrays, ids, spec=SPEC)
    write_batch(tmp_path / "b.arrow", *_shuffled(arrays, ids, 7), spec=dict(reversed(list(SPEC.items()))))
    with BatchWriter(tmp_path / "c.arrow", spec=SPEC) as writer:
        shuffled, shuffled_ids = _shuffled(arrays, ids, 3)
        for part in np.array_split(np.arange(12), 4)[::-1]:
            writer.write({k: v[part] for k, v in shuffled.items()}, [shuffled_ids[i] for i in part])
    a = (tmp_path / "a.arrow").read_bytes()
    assert (tmp_path / "b.arrow").read_bytes() == a
    assert (tmp_path / "c.arrow").read_bytes() == a
    assert _files(tmp_path) == ["a.arrow", "b.arrow", "c.arrow"]  # no temp or spool files left


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(0, 9), max_size=5))
def test_writer_bytes_do_not_depend_on_arrival_order_or_grouping(tmp_path_factory: pytest.TempPathFactory,
                                                                 seed: int, cuts: list[int]) -> None:
    directory = tmp_path_factory.mktemp("prop")
    arrays, ids = _data(9, seed=1)
    reference = directory / "ref.arrow"
    write_batch(reference, arrays, ids, spec=SPEC)
    shuffled, shuffled_ids = _shuffled(arrays, ids, seed)
    bounds = [0, *sorted(set(cuts)), 9]
    with BatchWriter(directory / "w.arrow", spec=SPEC) as writer:
        for lo, hi in zip(bounds, bounds[1:]):
            writer.write({k: v[lo:hi] for k, v in shuffled.items()}, shuffled_ids[lo:hi])
    assert (directory / "w.arrow").read_bytes() == reference.read_bytes()


def test_spec_is_metadata_not_content(tmp_path: Path) -> None:
    arrays, ids = _data()
    a = write_batch(tmp_path / "a.arrow", arrays, ids, spec={"v": 1})
    b = write_batch(tmp_path / "b.arrow", arrays, ids, spec={"v": 2})
    c = write_batch(tmp_path / "c.arrow", {**arrays, "mask": arrays["mask"] + 1}, ids, spec={"v": 1})
    assert a.fingerprint == b.fingerprint != c.fingerprint


# -- reading --------------------------------------------------------------------------------------


def test_open_is_zero_copy_and_read_only(tmp_path: Path) -> None:
    arrays, ids = _data(50)
    write_batch(tmp_path / "b.arrow", arrays, ids, spec=SPEC)
    before = pa.total_allocated_bytes()
    with open_batch(tmp_path / "b.arrow") as batch:
        image = batch.array("image")
        assert pa.total_allocated_bytes() == before  # tensors are views of the mapped file
        assert not image.flags.writeable
        np.testing.assert_array_equal(image, arrays["image"])
        assert batch.sample_ids == ids and batch.spec == SPEC and batch.num_rows == 50
        assert batch.input_names == ("image", "mask")
        assert batch.inputs["mask"].shape == (7,) and batch.inputs["mask"].dtype == "uint8"


def test_micro_batches_and_slices_cover_the_rows_exactly(tmp_path: Path) -> None:
    arrays, ids = _data(23)
    write_batch(tmp_path / "b.arrow", arrays, ids, spec=SPEC)
    batch = open_batch(tmp_path / "b.arrow")
    chunks = list(batch.iter_micro_batches(5))
    assert [c["image"].shape[0] for c in chunks] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate([c["image"] for c in chunks]), arrays["image"])
    shards = [batch.slice(0, 8), batch.slice(8, 16), batch.slice(16, 23)]
    assert [s.num_rows for s in shards] == [8, 8, 7]
    assert sum((s.sample_ids for s in shards), []) == ids
    assert all(s.fingerprint == batch.fingerprint for s in shards)
    np.testing.assert_array_equal(np.concatenate([s.array("mask") for s in shards]), arrays["mask"])
    inner = shards[1].slice(2, 4)
    assert inner.row_range == (10, 12) and inner.sample_ids == ids[10:12]
    with pytest.raises(ConfigError, match="outside"):
        batch.slice(5, 30)
    with pytest.raises(ConfigError, match="micro-batch"):
        list(batch.iter_micro_batches(0))


def test_remote_url_round_trip_through_fsspec(tmp_path: Path) -> None:
    import fsspec

    arrays, ids = _data()
    url = "memory://trtcal-test/batches/b.arrow"
    info = write_batch(url, *_shuffled(arrays, ids, 2), spec=SPEC)
    try:
        batch = open_batch(url)
        assert batch.fingerprint == info.fingerprint
        np.testing.assert_array_equal(batch.array("image"), arrays["image"])
        local = write_batch(tmp_path / "b.arrow", arrays, ids, spec=SPEC)
        assert fsspec.filesystem("memory").cat_file("/trtcal-test/batches/b.arrow") == (tmp_path / "b.arrow").read_bytes()
        assert local.fingerprint == info.fingerprint
    finally:
        fsspec.filesystem("memory").rm("/trtcal-test", recursive=True)


def test_corrupted_content_fails_the_fingerprint_check(tmp_path: Path) -> None:
    arrays, ids = _data()
    write_batch(tmp_path / "b.arrow", arrays, ids, spec=SPEC)
    raw = bytearray((tmp_path / "b.arrow").read_bytes())
    at = raw.find(arrays["image"][3].tobytes())
    assert at > 0
    raw[at + 9] ^= 0x10
    (tmp_path / "bad.arrow").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt or was modified"):
        open_batch(tmp_path / "bad.arrow")
    open_batch(tmp_path / "bad.arrow", verify=False)  # explicit opt-out reads it


def _write_raw(path: Path, batches: list[pa.RecordBatch], metadata: dict[bytes, bytes] | None) -> None:
    schema = batches[0].schema.with_metadata(metadata) if metadata else batches[0].schema
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, schema) as w:
        for b in batches:
            w.write_batch(b.replace_schema_metadata(metadata))


def _raw_batch(ids: list[str], values: np.ndarray) -> pa.RecordBatch:
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(values)
    return pa.RecordBatch.from_arrays([pa.array(ids, pa.string()), tensor], names=["sample_id", "x"])


def _meta(ids: list[str], values: np.ndarray) -> dict[bytes, bytes]:
    return {
        b"trtcal.spec": b"{}",
        b"trtcal.format_version": str(FORMAT_VERSION).encode(),
        b"trtcal.fingerprint": compute_fingerprint(ids, {"x": values}).encode(),
    }


def test_files_not_written_by_the_writer_are_refused(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids = ["a", "b", "c", "d"]
    _write_raw(tmp_path / "two.arrow", [_raw_batch(ids[:2], x[:2]), _raw_batch(ids[2:], x[2:])], _meta(ids, x))
    with pytest.raises(DataError, match="2 record batches"):
        open_batch(tmp_path / "two.arrow")
    _write_raw(tmp_path / "nometa.arrow", [_raw_batch(ids, x)], None)
    with pytest.raises(DataError, match="lacks the schema metadata"):
        open_batch(tmp_path / "nometa.arrow")
    unsorted = ["b", "a", "c", "d"]
    _write_raw(tmp_path / "unsorted.arrow", [_raw_batch(unsorted, x)], _meta(unsorted, x))
    with pytest.raises(DataError, match="not sorted"):
        open_batch(tmp_path / "unsorted.arrow")
    newer = {**_meta(ids, x), b"trtcal.format_version": b"999"}
    _write_raw(tmp_path / "newer.arrow", [_raw_batch(ids, x)], newer)
    with pytest.raises(DataError, match="format version '999'"):
        open_batch(tmp_path / "newer.arrow")
    plain = pa.RecordBatch.from_arrays([pa.array(ids), pa.array([1.0, 2.0, 3.0, 4.0])], names=["sample_id", "x"])
    _write_raw(tmp_path / "plain.arrow", [plain], _meta(ids, x))
    with pytest.raises(DataError, match="not an arrow.fixed_shape_tensor"):
        open_batch(tmp_path / "plain.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="not an Arrow IPC file"):
        open_batch(tmp_path / "junk.arrow")
    with pytest.raises(DataError, match="does not exist"):
        open_batch(tmp_path / "missing.arrow")


# -- bad input to the writers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (["a", "b", "a"], "more than once"),
        (["a", "", "c"], "empty"),
        (["a", "b\nc", "d"], "control character"),
        (["a", "b\x00", "d"], "control character"),
        (["a", "evil\u202etxt.exe", "d"], "control character"),
        (["a", 7, "d"], "not a string"),
        (["a", "x" * 2000, "d"], "UTF-8 bytes"),
        (["a", "\ud800", "d"], "not valid Unicode"),
    ],
)
def test_hostile_or_duplicate_ids_are_refused_and_nothing_is_written(tmp_path: Path, ids: list, match: str) -> None:
    with pytest.raises(DataError, match=match):
        write_batch(tmp_path / "b.arrow", {"x": np.zeros((3, 2), np.float32)}, ids, spec={})
    assert _files(tmp_path) == []


def test_bad_arrays_and_specs_are_refused(tmp_path: Path) -> None:
    ids = ["a", "b"]
    with pytest.raises(DataError, match="at least one row"):
        write_batch(tmp_path / "b.arrow", {"x": np.zeros((0, 2), np.float32)}, [], spec={})
    with pytest.raises(DataError, match="3 rows but there are 2"):
        write_batch(tmp_path / "b.arrow", {"x": np.zeros((3, 2), np.float32)}, ids, spec={})
    with pytest.raises(DataError, match="dtype bool"):
        write_batch(tmp_path / "b.arrow", {"x": np.zeros((2, 2), bool)}, ids, spec={})
    with pytest.raises(DataError, match="dtype object"):
        write_batch(tmp_path / "b.arrow", {"x": np.array([[None], [1]], dtype=object)}, ids, spec={})
    with pytest.raises(DataError, match="cannot be a column"):
        write_batch(tmp_path / "b.arrow", {"sample_id": np.zeros((2, 2), np.float32)}, ids, spec={})
    with pytest.raises(ConfigError, match="JSON"):
        write_batch(tmp_path / "b.arrow", {"x": np.zeros((2, 2), np.float32)}, ids, spec={"bad": float("nan")})
    assert _files(tmp_path) == []


def test_writer_refuses_duplicates_across_writes_and_mismatched_rows(tmp_path: Path) -> None:
    with BatchWriter(tmp_path / "b.arrow", spec={}) as writer:
        writer.write({"x": np.zeros((2, 3), np.float32)}, ["a", "b"])
        with pytest.raises(DataError, match="already written"):
            writer.write({"x": np.zeros((1, 3), np.float32)}, ["a"])
        with pytest.raises(DataError, match="do not match"):
            writer.write({"x": np.zeros((1, 4), np.float32)}, ["c"])
        with pytest.raises(DataError, match="do not match"):
            writer.write({"x": np.zeros((1, 3), np.float64)}, ["c"])
        writer.write({"x": np.ones((1, 3), np.float32)}, ["c"])
    batch = open_batch(tmp_path / "b.arrow")
    assert batch.sample_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(batch.array("x")[2], [1, 1, 1])


def test_writer_aborted_by_an_exception_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="worker died"), BatchWriter(tmp_path / "b.arrow", spec={}) as writer:
        writer.write({"x": np.zeros((2, 3), np.float32)}, ["a", "b"])
        raise RuntimeError("worker died")
    assert _files(tmp_path) == []
    with pytest.raises(DataError, match="no rows"), BatchWriter(tmp_path / "e.arrow", spec={}):
        pass
    assert _files(tmp_path) == []


def test_replacing_a_batch_is_atomic(tmp_path: Path) -> None:
    arrays, ids = _data()
    write_batch(tmp_path / "b.arrow", arrays, ids, spec=SPEC)
    old = open_batch(tmp_path / "b.arrow")  # a reader holding the old file keeps seeing it whole
    write_batch(tmp_path / "b.arrow", {k: v[:5] for k, v in arrays.items()}, ids[:5], spec=SPEC)
    np.testing.assert_array_equal(old.array("image"), arrays["image"])
    old.verify()
    assert open_batch(tmp_path / "b.arrow").num_rows == 5
    assert _files(tmp_path) == ["b.arrow"]


# -- numpy readers --------------------------------------------------------------------------------


def test_npy_is_memory_mapped_and_rows_keep_file_order(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    batch = batch_from_numpy(tmp_path / "x.npy", input_name="input")
    np.testing.assert_array_equal(batch.array("input"), x)
    assert batch.sample_ids == sorted(batch.sample_ids) and len(batch.sample_ids) == 5
    assert not batch.array("input").flags.writeable
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    np.testing.assert_array_equal(batch_from_numpy(tmp_path / "f.npy", input_name="input").array("input"), x)
    assert batch_from_arrays({"input": x}).fingerprint == batch.fingerprint
    with pytest.raises(ConfigError, match="input_name"):
        batch_from_numpy(tmp_path / "x.npy")


def test_npz_names_inputs_and_may_carry_sample_ids(tmp_path: Path) -> None:
    arrays, ids = _data(6)
    shuffled, shuffled_ids = _shuffled(arrays, ids, 4)
    np.savez(tmp_path / "d.npz", **shuffled, sample_id=np.array(shuffled_ids))
    batch = batch_from_numpy(tmp_path / "d.npz")
    assert batch.sample_ids == ids
    np.testing.assert_array_equal(batch.array("image"), arrays["image"])
    assert batch.fingerprint == compute_fingerprint(ids, arrays)


def test_bad_numpy_files_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="Python objects"):
        batch_from_numpy(tmp_path / "obj.npy", input_name="x")
    np.save(tmp_path / "ok.npy", np.zeros((10, 4), np.float32))
    (tmp_path / "short.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:-20])
    with pytest.raises(DataError, match="truncated"):
        batch_from_numpy(tmp_path / "short.npy", input_name="x")
    (tmp_path / "junk.npz").write_bytes(b"PK junk")
    with pytest.raises(DataError, match="npz"):
        batch_from_numpy(tmp_path / "junk.npz")
    np.savez(tmp_path / "uneven.npz", a=np.zeros((2, 3), np.float32), b=np.zeros((3, 3), np.float32))
    with pytest.raises(DataError, match="different numbers of rows"):
        batch_from_numpy(tmp_path / "uneven.npz")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="unsupported"):
        batch_from_numpy(tmp_path / "x.csv")
    with pytest.raises(DataError, match="does not exist"):
        batch_from_numpy(tmp_path / "none.npy", input_name="x")
