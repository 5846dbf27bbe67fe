"""Memory-mapped .npy/.npz readers against a slow reference (np.load of every member, batch_from_arrays)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from trtcal.batch import batch_from_arrays
from trtcal.batch._numpy_files import _aligned, _stored_data_offset, map_npz
from trtcal.batch.reader import _FileMapping, batch_from_numpy
from trtcal.errors import DataError


def _reference(path: Path):
    """The old reader: every member read whole by np.load, then an in-memory batch."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    ids = arrays.pop("sample_id", None)
    return batch_from_arrays(arrays, None if ids is None else [str(s) for s in ids], source=str(path))


def _assert_same(batch, reference) -> None:
    assert batch.fingerprint == reference.fingerprint
    assert batch.sample_ids == reference.sample_ids
    assert batch.input_names == reference.input_names
    for name in reference.input_names:
        np.testing.assert_array_equal(batch.array(name), reference.array(name))
        assert batch.array(name).dtype == reference.array(name).dtype


def _write_zip(path: Path, members: dict[str, np.ndarray], compression: int) -> None:
    """An .npz written member by member (names chosen by the test shift the data offsets)."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, arr in members.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, arr, allow_pickle=False)
            zf.writestr(name + ".npy", buffer.getvalue())


RNG = np.random.default_rng(7)
IMAGES = RNG.standard_normal((9, 3, 5, 4)).astype(np.float32)
TOKENS = RNG.integers(0, 1000, (9, 6)).astype(np.int64)


@pytest.mark.parametrize("writer", [np.savez, np.savez_compressed])
def test_npz_members_are_mapped_and_equal_the_reference(tmp_path: Path, writer) -> None:
    path = tmp_path / "data.npz"
    writer(path, images=IMAGES, tokens=TOKENS)
    batch = batch_from_numpy(path)
    assert batch._mapping is not None  # views of file mappings, not arrays read into memory
    _assert_same(batch, _reference(path))
    assert [int(a.size) for a in batch.rows(2, 5).values()] == [3 * 60, 3 * 6]
    batch.close()


def test_sorted_and_unsorted_ids_equal_the_reference(tmp_path: Path) -> None:
    sorted_path, shuffled_path = tmp_path / "sorted.npz", tmp_path / "shuffled.npz"
    ids = np.array([f"s{i:02d}" for i in range(9)])
    np.savez(sorted_path, images=IMAGES, sample_id=ids)
    order = RNG.permutation(9)
    np.savez(shuffled_path, images=IMAGES[order], sample_id=ids[order])
    for path in (sorted_path, shuffled_path):
        _assert_same(batch_from_numpy(path), _reference(path))
    assert batch_from_numpy(sorted_path).fingerprint == batch_from_numpy(shuffled_path).fingerprint


@pytest.mark.parametrize("prefix", ["a", "ab", "abc", "abcd"])
def test_stored_members_at_any_alignment_equal_the_reference(tmp_path: Path, prefix: str) -> None:
    """A stored member's data starts wherever the zip header puts it: mapped in place when aligned for
    its dtype, copied to a mapped temp file when not; the same values either way."""
    path = tmp_path / "odd.npz"
    _write_zip(path, {prefix: IMAGES, prefix + "_t": TOKENS}, zipfile.ZIP_STORED)
    _assert_same(batch_from_numpy(path), _reference(path))


def test_both_member_paths_are_taken(tmp_path: Path) -> None:
    """The alignment test above covers a mapped and a copied member (not one path twice)."""
    seen = set()
    for prefix in ("a", "ab", "abc", "abcd"):
        path = tmp_path / f"{prefix}.npz"
        _write_zip(path, {prefix: IMAGES}, zipfile.ZIP_STORED)
        archive = _FileMapping(str(path))
        with zipfile.ZipFile(path) as zf:
            info = zf.infolist()[0]
        seen.add(_aligned(archive, _stored_data_offset(archive, info), str(path)))
        archive.close()
    assert seen == {True, False}


def test_fortran_order_members_equal_the_reference(tmp_path: Path) -> None:
    path = tmp_path / "layouts.npz"
    np.savez(path, f=np.asfortranarray(IMAGES), c=IMAGES)
    batch = batch_from_numpy(path)
    _assert_same(batch, _reference(path))
    assert batch.array("f").flags.c_contiguous


def test_npy_is_mapped_and_equals_the_reference(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, IMAGES)
    batch = batch_from_numpy(path, input_name="images")
    assert batch._mapping is not None
    _assert_same(batch, batch_from_arrays({"images": IMAGES}))


def test_released_pages_are_read_again_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez_compressed(path, images=IMAGES)
    batch = batch_from_numpy(path)
    before = batch.array("images").copy()
    for chunk in batch.iter_micro_batches(2):
        assert chunk["images"].shape[0] <= 2  # each chunk's pages are released after use
    np.testing.assert_array_equal(batch.array("images"), before)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"a": IMAGES, "b": IMAGES[:4]}, "different numbers of rows"),
        ({"a": np.zeros((0, 3), np.float32)}, "no rows"),
        ({"a": np.array([b"x"], dtype=object)}, "Python objects"),
    ],
)
def test_bad_members_are_data_errors_naming_the_file(tmp_path: Path, members, message: str) -> None:
    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in members.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, arr, allow_pickle=True)
            zf.writestr(name + ".npy", buffer.getvalue())
    with pytest.raises(DataError, match=message) as info:
        batch_from_numpy(path)
    assert str(path) in str(info.value)


def test_a_truncated_archive_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.npz"
    np.savez(path, a=IMAGES)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match="not a readable .npz"):
        batch_from_numpy(path)


def test_map_npz_returns_ids_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "ids.npz"
    np.savez(path, a=IMAGES, sample_id=np.array([f"{i}" for i in range(9)]))
    arrays, ids, mappings = map_npz(str(path), "sample_id")
    assert list(arrays) == ["a"] and ids is not None and ids.tolist() == [f"{i}" for i in range(9)]
    mappings.close()
