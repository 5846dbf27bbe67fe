"""Issue 15 item 1 (content half of the batch key): the listing digest changes exactly when the data does."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from trtcal.workers.listing_digest import listing_digest
from trtcal.workers.sources import open_dataset


def _tree(root: Path) -> Path:
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            (root / label / f"{i}.jpg").write_bytes(f"{label}-{i}".encode())
    return root


def _digest(path: Path | str, **options: Any) -> str:
    return listing_digest(open_dataset(str(path), options or None)).sha256


def test_local_digest_is_stable_and_follows_every_change(tmp_path: Path) -> None:
    root = _tree(tmp_path / "images")
    first = listing_digest(open_dataset(str(root)))
    assert first.files == 6 and first.total_bytes == sum(len(f"{a}-{i}") for a in ("cat", "dog") for i in range(3))
    assert _digest(root) == first.sha256
    (root / "README.txt").write_text("not data")  # neither a dataset file nor hidden data: ignored
    (root / ".DS_Store").write_bytes(b"x")
    assert _digest(root) == first.sha256
    (root / "cat" / "0.jpg").write_bytes(b"cat-X")  # same size, new bytes: a new mtime_ns
    os.utime(root / "cat" / "0.jpg", ns=(time.time_ns(), time.time_ns() + 1_000_000))
    changed = _digest(root)
    (root / "dog" / "3.jpg").write_bytes(b"new")
    added = _digest(root)
    (root / "dog" / "3.jpg").rename(root / "dog" / "4.jpg")
    renamed = _digest(root)
    assert len({first.sha256, changed, added, renamed}) == 4
    (root / "dog" / "4.jpg").unlink()  # removed again: the same files as before the addition
    assert _digest(root) == changed


def test_same_files_in_another_folder_give_the_same_digest_the_url_tells_them_apart(tmp_path: Path) -> None:
    a = _tree(tmp_path / "a" / "images")
    b = tmp_path / "b" / "images"
    b.parent.mkdir()
    os.system(f"cp -a {a} {b}")  # noqa: S605 (keeps mtimes)
    assert _digest(a) == _digest(b)


def test_a_single_file_and_a_list_file(tmp_path: Path) -> None:
    root = _tree(tmp_path / "images")
    one = _digest(root / "cat" / "1.jpg")
    (root / "list.txt").write_text("cat/0.jpg\ndog/1.jpg\n")
    listed = _digest(root / "list.txt")
    (root / "dog" / "1.jpg").write_bytes(b"dog-1-changed")
    assert _digest(root / "list.txt") != listed and _digest(root / "cat" / "1.jpg") == one
    (root / "list.txt").write_text("cat/0.jpg\n")
    assert _digest(root / "list.txt") != listed


@pytest.mark.slow
def test_s3_digest_follows_etags(s3_server: Any, tmp_path: Path) -> None:
    bucket = s3_server.create_bucket()
    client = s3_server._botocore_client()
    for i in range(5):
        client.put_object(Bucket=bucket, Key=f"images/cls/{i}.jpg", Body=f"img-{i}".encode())
    client.put_object(Bucket=bucket, Key="images/index.html", Body=b"ignored")
    options = s3_server.storage_options()
    first = listing_digest(open_dataset(f"s3://{bucket}/images", options))
    assert first.files == 5 and _digest(f"s3://{bucket}/images", **options) == first.sha256
    client.put_object(Bucket=bucket, Key="images/cls/2.jpg", Body=b"img-X")  # same size, new ETag
    assert _digest(f"s3://{bucket}/images", **options) != first.sha256
