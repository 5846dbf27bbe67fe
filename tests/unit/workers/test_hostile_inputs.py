"""Issue 15 item 9: hostile data files are refused with a clear reason, within bounded memory."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trtcal.workers import sources
from trtcal.workers.preprocess import InputRejected, decode_image
from trtcal.workers.sources import list_shard, open_dataset, plan_shards, read_container_rows


def _listing(url: Path) -> list:
    dataset = open_dataset(str(url))
    return [list_shard(dataset, shard) for shard in plan_shards(dataset).shards]


def _zip_bomb(path: Path, rows: int, row_bytes: int) -> None:
    """A real deflated .npz of zeros: a few hundred KB that inflate to rows * row_bytes."""
    np.savez_compressed(path, input=np.zeros((rows, row_bytes), dtype=np.uint8))


def test_a_zip_bomb_npz_is_refused_at_listing_with_the_row_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = tmp_path / "bomb.npz"
    _zip_bomb(bomb, 8, 16 << 20)  # 128 MiB of zeros
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setattr(sources, "MAX_ROW_BYTES", 8 << 20)  # the real limit scaled down with the bomb
    listing = _listing(bomb)[0]
    assert listing.paths == [] and len(listing.refused) == 1
    assert "bomb.npz:input.npy" in listing.refused[0][1] and "16777216 bytes, over the 8388608-byte limit" in listing.refused[0][1]
    with pytest.raises(InputRejected, match="over the 8388608-byte limit"):
        list(read_container_rows(open_dataset(str(bomb)).filesystem(), str(bomb), "npz", [0], "input"))


def test_reading_rows_of_an_npz_inflates_only_up_to_the_last_row_within_a_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = tmp_path / "bomb.npz"
    _zip_bomb(bomb, 64, 2 << 20)  # 128 MiB of zeros, 2 MiB rows
    fs = open_dataset(str(bomb)).filesystem()
    monkeypatch.setattr(sources, "MAX_NPZ_INFLATE_BYTES", 32 << 20)
    tracemalloc.start()
    try:
        rows = dict(read_container_rows(fs, str(bomb), "npz", [3, 1, 7], "input"))  # 16 MiB inflated: within the bound
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(rows) == [1, 3, 7] and all(rows[r]["input"].shape == (2 << 20,) for r in rows)
    assert peak < 24 << 20, f"{peak} bytes held: more than the 3 rows asked (6 MiB) plus inflate buffers"
    with pytest.raises(InputRejected, match="reaching row 40 means inflating .* over the 33554432-byte limit"):
        list(read_container_rows(fs, str(bomb), "npz", [2, 40], "input"))


def test_an_npz_whose_header_lies_about_its_size_is_refused(tmp_path: Path) -> None:
    honest = io.BytesIO()
    np.save(honest, np.zeros((2, 4), dtype=np.float32))
    header = honest.getvalue()[: -32].replace(b"(2, 4)", b"(9, 4)")  # claims 9 rows, holds 2
    with zipfile.ZipFile(tmp_path / "liar.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input.npy", header + bytes(32))
    listing = _listing(tmp_path / "liar.npz")[0]
    assert listing.paths == [] and "9 rows of 16 bytes, but the member inflates to" in listing.refused[0][1]


def _forged_jpeg(claimed: int) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", claimed, claimed)
    return bytes(data)


def test_a_jpeg_claiming_9000x9000_over_a_few_kb_is_truncated_not_a_grey_sample() -> None:
    data = _forged_jpeg(9000)
    assert len(data) < 50_000
    with pytest.raises(InputRejected) as info:
        decode_image(data)
    assert info.value.reason == "truncated" and "9000x9000" in info.value.detail


@pytest.mark.parametrize(("mode", "progressive"), [("L", False), ("RGB", False), ("RGB", True)])
def test_flat_but_real_jpegs_still_decode(mode: str, progressive: bool) -> None:
    buffer = io.BytesIO()  # the most compressible real JPEGs: one flat colour, optimized Huffman tables
    Image.new(mode, (3000, 3000), 128 if mode == "L" else (10, 200, 30)).save(
        buffer, "JPEG", quality=1, optimize=True, progressive=progressive
    )
    image = decode_image(buffer.getvalue())
    assert image.size == (3000, 3000)
