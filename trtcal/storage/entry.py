"""Entry: a committed cache entry whose bytes are checked against its manifest before they are handed out."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from trtcal.errors import ConfigError, CorruptEntryError, StorageError
from trtcal.storage._backends import NotRegularFile
from trtcal.storage.layout import Problem, StoreLayout, check_bytes
from trtcal.storage.manifest import ArtifactRecord, Manifest

__all__ = ["Entry", "Problem", "check_bytes"]


class Entry:
    """A committed, verified cache entry. Every byte handed out has been checked against the manifest.

    Attributes:
        key, namespace: where it lives.
        manifest: the parsed manifest as a dict (see trtcal.storage.manifest).
        url: URL of its manifest (no credentials).
        store_url: URL of the store that holds it (a read-from store on a read-through hit).
        created: True when the `publish` that returned it committed it; False when the key was
            already taken (by an earlier or a concurrent writer) and this is that entry.
    """

    def __init__(
        self,
        layout: StoreLayout,
        manifest: Manifest,
        *,
        store_url: str,
        verified: Mapping[str, bytes] | None = None,
        created: bool = False,
    ) -> None:
        self._layout = layout
        self._manifest = manifest
        self._verified = dict(verified or {})
        self.key = manifest.key
        self.namespace = manifest.namespace
        self.url = layout.display(layout.manifest_path(manifest.namespace, manifest.key))
        self.store_url = store_url
        self.created = created

    def __repr__(self) -> str:
        return f"Entry(key={self.key!r}, namespace={self.namespace!r}, artifacts={self.names!r}, url={self.url!r})"

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest.to_dict()

    @property
    def names(self) -> list[str]:
        return sorted(self._manifest.artifacts)

    @property
    def key_inputs(self) -> dict[str, Any]:
        return dict(self._manifest.key_inputs)

    @property
    def extra(self) -> dict[str, Any]:
        return dict(self._manifest.extra)

    @property
    def created_at(self) -> datetime:
        return self._manifest.created_at

    @property
    def size(self) -> int:
        return self._manifest.total_size

    def artifact_url(self, name: str) -> str:
        return self._layout.display(self._path(name))

    def _record(self, name: str) -> ArtifactRecord:
        record = self._manifest.artifacts.get(name)
        if record is None:
            raise ConfigError(f"cache entry {self.key} has no artifact {name!r}; it has {self.names}")
        return record

    def _path(self, name: str) -> str:
        m = self._manifest
        return self._layout.artifact_path(m.namespace, m.key, m.stage, name)

    def _corrupt_error(self, problem: Problem) -> CorruptEntryError:
        return CorruptEntryError(
            f"cache entry {self.key} (namespace {self.namespace}) is corrupt at {problem.url}: {problem.reason}; "
            "it was not used. Run `trtcal cache verify` on the store; `trtcal calibrate … --on-corrupt recompute` "
            "(CacheStore(on_corrupt='recompute') in Python) recomputes it and replaces it",
            url=problem.url,
            key=self.key,
        )

    def read(self, name: str) -> bytes:
        """The bytes of one artifact, verified against its sha256. Raises CorruptEntryError on mismatch."""
        record = self._record(name)
        if name in self._verified:
            return self._verified[name]
        path = self._path(name)
        try:
            with self._layout.io("read", path):
                data = self._layout.backend.read_bytes(path)
        except FileNotFoundError:
            raise self._corrupt_error(Problem("artifact is missing", self._layout.display(path), missing=True)) from None
        except NotRegularFile as exc:
            raise self._corrupt_error(Problem(f"artifact {exc.strerror}", self._layout.display(path))) from None
        try:
            check_bytes(data, record, self._layout.display(path))
        except Problem as problem:
            raise self._corrupt_error(problem) from None
        return data

    def download(self, name: str, dest: str | os.PathLike[str]) -> Path:
        """Stream one artifact to a local file (or into a directory), verified before it appears there.

        The bytes go to a temporary file next to the destination; only a file whose sha256 matches
        is renamed into place, so a corrupt artifact never shows up at `dest`.
        """
        record = self._record(name)
        target = Path(dest)
        if target.is_dir():
            target = target / name
        path = self._path(name)
        url = self._layout.display(path)
        temp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            out = open(temp, "xb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}", url=str(target)) from None
        digest, size = hashlib.sha256(), 0
        try:
            with out:
                source = iter([self._verified[name]]) if name in self._verified else self._layout.backend.iter_chunks(path)
                while True:
                    try:
                        with self._layout.io("read", path):
                            chunk = next(source, None)
                    except FileNotFoundError:
                        raise self._corrupt_error(Problem("artifact is missing", url, missing=True)) from None
                    except NotRegularFile as exc:
                        raise self._corrupt_error(Problem(f"artifact {exc.strerror}", url)) from None
                    if chunk is None:
                        break
                    digest.update(chunk)
                    size += len(chunk)
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise StorageError(f"cannot write {target}: {exc.strerror or exc}", url=str(target)) from None
                out.flush()
                os.fsync(out.fileno())
            if size != record.size or digest.hexdigest() != record.sha256:
                raise self._corrupt_error(
                    Problem(f"{size} bytes with sha256 {digest.hexdigest()}; manifest says {record.size} bytes with {record.sha256}", url)
                )
            os.replace(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        return target

    def verify(self) -> None:
        """Re-read every artifact and check it. Raises CorruptEntryError naming the first bad one."""
        try:
            self._layout.verify_artifacts(self._manifest, full=True, keep=False)
        except Problem as problem:
            raise self._corrupt_error(problem) from None

