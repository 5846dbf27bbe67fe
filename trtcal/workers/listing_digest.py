"""A digest of what a dataset URL holds now: the content half of a content-addressed batch key.

One listing of the dataset with each object's stamp: relative path, size, and what changes when
its bytes change — `mtime_ns` on a local disk, the ETag (and version id where the bucket keeps
versions) on S3, the modification time elsewhere. Only dataset files count (the same extension
and hidden-name rules as the build's listing), so a README added next to the images does not
invalidate a batch; a changed, added, removed or renamed image does.

Cost: local, one `scandir` + `stat` per file; S3, the ListObjectsV2 pages the listing needs anyway
(1,000 objects a page) and no HEAD. A list file (.txt/.lst/.csv) adds its own bytes and a stat
(remote: a HEAD) per listed file. Measured in bench/bench_listing.py.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any

from trtcal.errors import StorageError
from trtcal.workers.sources import (
    IMAGE_EXTENSIONS,
    NPY_EXTENSIONS,
    NPZ_EXTENSIONS,
    PARQUET_EXTENSIONS,
    Dataset,
    kind_of,
)

__all__ = ["ListingDigest", "listing_digest"]

_VERSION = "trtcal-listing-v1"
_DATASET_SUFFIXES = IMAGE_EXTENSIONS + PARQUET_EXTENSIONS + NPY_EXTENSIONS + NPZ_EXTENSIONS  # what kind_of() accepts


@dataclass(frozen=True)
class ListingDigest:
    """sha256 (hex) of the dataset's sorted (path, size, stamp) lines, and what went into it."""

    sha256: str
    files: int
    total_bytes: int
    seconds: float


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _remote_stamp(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag") or info.get("md5_hash") or info.get("md5")
    version = info.get("VersionId") or info.get("version_id") or info.get("generation")
    if etag:
        return f"etag={str(etag).strip(chr(34))}" + (f";version={version}" if version and version != "null" else "")
    for name in ("LastModified", "mtime", "last_modified", "updated", "created"):
        if info.get(name) is not None:
            return f"mtime={info[name]}"
    return "unstamped"


def _local_lines(root: str) -> list[str]:
    """`rel\0size\0stamp\n` of every dataset file below a local root; symlinked folders not followed.

    The hot loop of the digest (one stat per file): kept to a few operations per entry."""
    root_real = os.path.realpath(root)
    suffixes = _DATASET_SUFFIXES
    out: list[str] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        prefix = f"{rel_dir}/" if rel_dir else ""
        try:
            entries = list(os.scandir(os.path.join(root, rel_dir) if rel_dir else root))
        except OSError as exc:
            raise StorageError(f"cannot list {os.path.join(root, rel_dir)!r}: {exc.strerror or exc}", url=root) from None
        for entry in entries:
            name = entry.name
            if name[0] == ".":
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(prefix + name)
                continue
            if not name.lower().endswith(suffixes):
                continue
            try:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if os.path.commonpath([target, root_real]) != root_real or os.path.isdir(target):
                        continue  # refused / not followed by the build as well
                    st = os.stat(target)
                    stamp = f"mtime_ns={st.st_mtime_ns};link={os.path.relpath(target, root_real)}"
                else:
                    st = entry.stat(follow_symlinks=False)
                    stamp = f"mtime_ns={st.st_mtime_ns}"
                out.append(f"{prefix}{name}\0{st.st_size}\0{stamp}\n")
            except OSError:
                out.append(f"{prefix}{name}\0-1\0unreadable\n")
    return out


def _remote_lines(dataset: Dataset, fs: Any) -> list[str]:
    try:
        found = fs.find(dataset.root, withdirs=False, detail=True)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot list {dataset.display_url}: {exc}", url=dataset.display_url) from None
    out = []
    for name, info in found.items():
        if name.endswith("/") or info.get("type", "file") != "file":
            continue
        rel = dataset.relative(name)
        if _hidden(rel) or kind_of(posixpath.basename(rel)) is None:
            continue
        out.append(_line(rel, int(info.get("size") or 0), _remote_stamp(info)))
    return out


def _line(rel: str, size: int, stamp: str) -> str:
    return f"{rel}\0{size}\0{stamp}\n"


def _one_stamp(dataset: Dataset, fs: Any, path: str) -> tuple[int, str]:
    if dataset.is_local:
        try:
            st = os.stat(path)
        except OSError:
            return -1, "missing"
        return st.st_size, f"mtime_ns={st.st_mtime_ns}"
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return -1, "missing"
    return int(info.get("size") or 0), _remote_stamp(info)


def listing_digest(dataset: Dataset) -> ListingDigest:
    """The digest of what `dataset` holds now (see the module docstring). Raises StorageError."""
    started = time.perf_counter()
    fs = dataset.filesystem()
    digest = hashlib.sha256(f"{_VERSION}\n{dataset.layout}\n".encode())
    if dataset.layout == "folder":
        lines = _local_lines(dataset.root) if dataset.is_local else _remote_lines(dataset, fs)
    elif dataset.layout == "file":
        lines = [_line(posixpath.basename(dataset.target), *_one_stamp(dataset, fs, dataset.target))]
    else:  # a list file: its bytes, and the stamp of every file it names
        from trtcal.workers.sources import _read_list

        with fs.open(dataset.target, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
        relpaths, paths, _labels, _refused = _read_list(dataset, fs)
        lines = [_line(rel, *_one_stamp(dataset, fs, path)) for rel, path in zip(relpaths, paths)]
    # Sorted by relative path ("\0" after it sorts below every path character); hashed in one go.
    lines.sort()
    digest.update("".join(lines).encode("utf-8", "surrogateescape"))
    return ListingDigest(
        sha256=digest.hexdigest(),
        files=len(lines),
        total_bytes=sum(max(int(line.split("\0", 2)[1]), 0) for line in lines),
        seconds=time.perf_counter() - started,
    )
