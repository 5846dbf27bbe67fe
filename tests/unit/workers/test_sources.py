"""Dataset sources on local disk (S3 is covered in tests/integration/test_batch_build.py)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.unit.workers.images import encode, photo, write_photo_folder
from trtcal.errors import DataError
from trtcal.workers import sources
from trtcal.workers.selection import path_sort_key, select_samples
from trtcal.workers.sources import (
    list_shard,
    open_dataset,
    plan_shards,
    read_container_rows,
    read_images,
    resolve_selection,
)


def _listing(url, **kwargs):
    dataset = open_dataset(str(url))
    plan = plan_shards(dataset, **kwargs)
    shards, refused = plan.shards, plan.refused
    listings = [list_shard(dataset, shard) for shard in shards]
    return dataset, shards, refused, listings


def _all_relpaths(listings):
    return [rel for listing in listings for rel in listing.relpaths]


def test_open_dataset_kinds(tmp_path):
    write_photo_folder(tmp_path / "ds")
    assert open_dataset(str(tmp_path / "ds")).layout == "folder"
    (tmp_path / "list.txt").write_text("ds/n01/coffee.JPEG\n")
    assert open_dataset(str(tmp_path / "list.txt")).layout == "list"
    assert open_dataset(str(tmp_path / "ds" / "n01" / "coffee.JPEG")).layout == "file"
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(str(tmp_path / "missing"))
    (tmp_path / "notes.doc").write_text("x")
    with pytest.raises(DataError, match="unknown type"):
        open_dataset(str(tmp_path / "notes.doc"))


def test_imagenet_layout_listing_sorted_and_filtered(tmp_path):
    root = tmp_path / "train"
    written = write_photo_folder(root)
    (root / "n01" / "README.txt").write_text("not an image")
    (root / "n01" / ".DS_Store").write_bytes(b"\0")
    (root / "n02" / "._coffee.JPEG").write_bytes(b"appledouble")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(b"")
    dataset, shards, refused, listings = _listing(root, target_shards=3)
    assert refused == []
    assert [(s.kind, s.prefix) for s in shards] == [("find", "n01"), ("find", "n02"), ("find", "n03")]
    assert _all_relpaths(listings) == sorted(written, key=path_sort_key)
    assert sum(listing.ignored for listing in listings) == 3  # README, .DS_Store, ._coffee.JPEG
    assert plan_shards(dataset, target_shards=3).ignored == 1  # the .hidden folder, seen while planning
    assert listings[0].labels[0] == "n01" and listings[0].kind == "image"


def test_many_levels_and_global_order_equal_a_global_sort(tmp_path):
    rng = random.Random(0)
    names = []
    for i in range(40):
        rel = f"{rng.choice(['a', 'a-b', 'b'])}/{rng.choice(['x', 'y'])}/img{i:03d}.png"
        names.append(rel)
    names += ["top.png", "a.png", "zz/deep/er/most/img.bmp"]
    for rel in names:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    for target in (1, 2, 64):
        _dataset, shards, _refused, listings = _listing(tmp_path, target_shards=target)
        assert _all_relpaths(listings) == sorted(names, key=path_sort_key), target


def test_symlinks_outside_the_root_are_refused(tmp_path):
    root = tmp_path / "root"
    write_photo_folder(root, classes={"c": ("coffee",)})
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(encode(photo("rocket"), "JPEG"))
    (root / "c" / "leak.jpg").symlink_to(outside)
    (root / "c" / "alias.png").symlink_to(root / "c" / "coffee.png")
    (root / "outdir").symlink_to(tmp_path)
    (root / "c" / "loop").symlink_to(root)
    _dataset, _shards, refused, listings = _listing(root)
    refused_all = refused + [r for listing in listings for r in listing.refused]
    assert sorted(rel for rel, _ in refused_all) == ["c/leak.jpg", "outdir"]
    assert all(reason.startswith("outside-root") for _, reason in refused_all)
    assert _all_relpaths(listings) == ["c/alias.png", "c/coffee.JPEG", "c/coffee.png"]


def test_read_refuses_a_link_swapped_after_listing(tmp_path):
    root = tmp_path / "root"
    write_photo_folder(root, classes={"c": ("coffee",)})
    dataset, _shards, _refused, listings = _listing(root)
    refs = resolve_selection(listings[0], {"": np.arange(2)}, stratify=False)
    target = Path(refs[0].path)
    target.unlink()
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"secret")
    target.symlink_to(secret)
    result = read_images(dataset, dataset.filesystem(), refs)
    assert result[refs[0].sample_id].reason == "outside-root"
    assert isinstance(result[refs[1].sample_id], bytes)


def test_hostile_names(tmp_path):
    root = tmp_path / "root"
    (root / "c").mkdir(parents=True)
    data = encode(photo("coffee"), "PNG")
    names = ["sp ace.png", "new\nline.png", "ünï.png", "back\\slash.png", "hash#1.png", "q?.png", "pct%20.png"]
    for name in names:
        (root / "c" / name).write_bytes(data)
    os.makedirs(os.fsencode(root / "c"), exist_ok=True)
    with open(os.path.join(os.fsencode(root / "c"), b"bad\xffbyte.png"), "wb") as f:
        f.write(data)
    dataset, _shards, _refused, listings = _listing(root)
    refs = resolve_selection(listings[0], {"": np.arange(len(names) + 1)}, stratify=False)
    ids = [r.sample_id for r in refs]
    from trtcal.batch import validate_sample_ids

    validate_sample_ids(ids)
    assert "c/new\\x0aline.png" in ids and "c/bad\\xffbyte.png" in ids and "c/back\\\\slash.png" in ids
    read = read_images(dataset, dataset.filesystem(), refs)
    assert all(value == data for value in read.values())


def test_list_files(tmp_path):
    write_photo_folder(tmp_path / "ds")
    (tmp_path / "list.txt").write_text(
        "# calibration list\nds/n02/rocket.JPEG\n\nds/n01/coffee.png\nds/./n01/../n01/coffee.png\n" + f"{tmp_path}/ds/n03/moon.png\n"
    )
    dataset, shards, _refused, listings = _listing(tmp_path / "list.txt")
    assert [s.kind for s in shards] == ["list"]
    listing = listings[0]
    assert listing.relpaths == [f"{tmp_path}/ds/n03/moon.png", "ds/n01/coffee.png", "ds/n02/rocket.JPEG"]
    assert listing.refused == [("ds/n01/coffee.png", "duplicate: listed more than once")]
    (tmp_path / "labels.csv").write_text("label,path\ncat,ds/n01/chelsea.png\ndog,ds/n02/cat.png\n")
    _d, _s, _r, (csv_listing,) = _listing(tmp_path / "labels.csv")
    assert csv_listing.relpaths == ["ds/n01/chelsea.png", "ds/n02/cat.png"]
    assert csv_listing.labels == ["cat", "dog"]
    (tmp_path / "plain.csv").write_text("ds/n01/chelsea.png,x\nds/n03/coins.JPEG,y\n")
    _d, _s, _r, (plain,) = _listing(tmp_path / "plain.csv")
    assert plain.labels == ["x", "y"]


def test_parquet_rows(tmp_path):
    images = [encode(photo(n), "PNG") for n in ("coffee", "rocket", "chelsea")]
    table = pa.table({"label": [1, 2, 3], "image": images})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    hf = pa.table({"image": pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)])})
    pq.write_table(hf, tmp_path / "b.parquet")
    dataset, _shards, _refused, listings = _listing(tmp_path)
    assert _all_relpaths(listings) == ["a.parquet", "b.parquet"] and listings[0].rows == [3, 3]
    fs = dataset.filesystem()
    for name in ("a.parquet", "b.parquet"):
        got = dict(read_container_rows(fs, str(tmp_path / name), "parquet", [2, 0], "input"))
        assert got == {2: images[2], 0: images[0]}
    selection = select_samples([listings[0].class_counts(False)], num_samples=None, seed=0)
    refs = resolve_selection(listings[0], selection.per_shard[0], stratify=False)
    assert [r.sample_id for r in refs] == [f"{f}#{i:09d}" for f in ("a.parquet", "b.parquet") for i in range(3)]


def test_bad_parquet_is_refused(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "noimg.parquet")
    _dataset, _shards, _refused, listings = _listing(tmp_path)
    reasons = dict(listings[0].refused)
    assert reasons["bad.parquet"].startswith("corrupt") and reasons["noimg.parquet"].startswith("non-image")
    assert listings[0].relpaths == []


def test_npy_and_npz_rows(tmp_path):
    rng = np.random.default_rng(0)
    single = rng.standard_normal((5, 3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", single)
    ids = np.arange(5 * 7, dtype=np.int64).reshape(5, 7)
    np.savez(tmp_path / "y.npz", input_ids=ids, mask=np.ones((5, 7), dtype=np.int8))
    np.savez_compressed(tmp_path / "z.npz", input_ids=ids + 1, mask=np.zeros((5, 7), dtype=np.int8))
    dataset, _shards, _refused, listings = _listing(tmp_path / "x.npy")
    assert listings[0].rows == [5]
    fs = dataset.filesystem()
    rows = dict(read_container_rows(fs, str(tmp_path / "x.npy"), "npy", [4, 1], "input"))
    assert np.array_equal(rows[4]["input"], single[4]) and np.array_equal(rows[1]["input"], single[1])
    for name, offset in (("y.npz", 0), ("z.npz", 1)):
        rows = dict(read_container_rows(fs, str(tmp_path / name), "npz", [3], "ignored"))
        assert sorted(rows[3]) == ["input_ids", "mask"] and np.array_equal(rows[3]["input_ids"], ids[3] + offset)
    (tmp_path / "x.npy").unlink()
    _d, _s, _r, npz_listings = _listing(tmp_path)
    assert npz_listings[0].inputs == {"input_ids": ((7,), "int64"), "mask": ((7,), "int8")}
    np.save(tmp_path / "w.npy", single)
    with pytest.raises(DataError, match="mixes"):
        _listing(tmp_path)


def test_images_and_tensors_do_not_mix(tmp_path):
    write_photo_folder(tmp_path, classes={"c": ("coffee",)})
    np.save(tmp_path / "c" / "t.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(DataError, match="mixes images with tensor"):
        _listing(tmp_path)


def test_listing_independent_of_directory_order(tmp_path, monkeypatch):
    root = tmp_path / "root"
    write_photo_folder(root)
    _d, _s, _r, listings = _listing(root)
    baseline = _all_relpaths(listings)
    real_scandir = os.scandir

    def shuffled(path):
        entries = list(real_scandir(path))
        random.Random(str(path)).shuffle(entries)
        return iter(entries[::-1])

    monkeypatch.setattr(sources.os, "scandir", shuffled)
    _d, _s, _r, listings = _listing(root)
    assert _all_relpaths(listings) == baseline


def test_remote_code_paths_on_an_in_memory_filesystem():
    """The fsspec (non-local) branches: ls/find listing, hidden keys, concurrent `cat`, a vanished object."""
    import uuid

    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/ds-{uuid.uuid4().hex[:8]}"
    data = encode(photo("coffee"), "PNG")
    for rel in ("train/n01/a.png", "train/n01/b.png", "train/n02/c.png", "train/n02/.hidden.png", "train/readme.txt"):
        fs.pipe_file(f"{root}/{rel}", data)
    try:
        dataset, shards, refused, listings = _listing(f"memory://{root}/train", target_shards=2)
        assert dataset.protocol == "memory" and not dataset.is_local and refused == []
        assert [(s.kind, s.prefix or s.files) for s in shards] == [("find", "n01"), ("find", "n02"), ("files", ("readme.txt",))]
        assert _all_relpaths(listings) == ["n01/a.png", "n01/b.png", "n02/c.png"]
        assert sum(listing.ignored for listing in listings) == 2  # .hidden.png, readme.txt
        refs = resolve_selection(listings[0], {"": np.arange(2)}, stratify=False)
        fs.rm(f"{root}/train/n01/b.png")
        read = read_images(dataset, dataset.filesystem(), refs)
        assert read["n01/a.png"] == data and read["n01/b.png"].reason == "unreadable"
    finally:
        fs.rm(root, recursive=True)
