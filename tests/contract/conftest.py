"""The `backend` fixture: one fresh store root per test on memory://, a local directory, and S3 (SeaweedFS)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pytest

from trtcal.storage import CacheStore

BACKENDS = ["memory", "local", "s3"]


@dataclass
class StoreRoot:
    """A store root plus raw file access that bypasses the store (to tamper with entries)."""

    kind: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def store(self, **kwargs: Any) -> CacheStore:
        return CacheStore(self.url, **kwargs, **self.options)

    def _fs(self, url: str) -> tuple[Any, str]:
        return fsspec.core.url_to_fs(url, **self.options)

    def read(self, url: str) -> bytes:
        fs, path = self._fs(url)
        return bytes(fs.cat_file(path))

    def write(self, url: str, data: bytes) -> None:
        fs, path = self._fs(url)
        if self.kind == "local":
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe_file(path, data)

    def delete(self, url: str) -> None:
        fs, path = self._fs(url)
        fs.rm(path, recursive=True)

    def files(self, url: str | None = None) -> list[str]:
        """Every file below `url` (default: the root), as paths relative to the root."""
        fs, root = self._fs(self.url)
        _, path = self._fs(url or self.url)
        try:
            found = fs.find(path)
        except FileNotFoundError:
            return []
        root = root.rstrip("/")
        return sorted(p[len(root) :].lstrip("/") for p in found)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[StoreRoot]:
    kind = request.param
    if kind == "memory":
        root = StoreRoot(kind, f"memory://trtcal-{uuid.uuid4().hex[:12]}")
        yield root
        fs, path = fsspec.core.url_to_fs(root.url)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    elif kind == "local":
        yield StoreRoot(kind, str(tmp_path / "store"))
    else:
        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("contract_bucket")
        # 5 MiB parts, so an artifact of a few MiB already goes through a multipart upload.
        yield StoreRoot(
            kind,
            f"s3://{bucket}/{uuid.uuid4().hex[:12]}/calib",
            server.storage_options(default_block_size=5 << 20),
        )


@pytest.fixture(scope="session")
def contract_bucket(s3_server: Any) -> str:
    # One bucket, a fresh prefix per test: SeaweedFS takes ~0.2 s to set up each new bucket.
    return str(s3_server.create_bucket())
