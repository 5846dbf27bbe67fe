"""Where a store keeps things, how its paths read in messages, and the checks of an entry's bytes.

Shared by CacheStore (which writes, lists and collects) and Entry (which reads one committed
entry), so neither reaches into the other's private members:

    <root>/v1/<namespace>/entries/<key[:2]>/<key>.json                 committed manifests
    <root>/v1/<namespace>/index/<key[:2]>/<marker>                     listing-index markers
    <root>/v1/<namespace>/artifacts/<key[:2]>/<key>/<stage>/<name>     artifact bytes
    <root>/v1/<namespace>/leases/<key[:2]>/<key>.json                  "computing it now" (trtcal.storage.lease)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

from trtcal.errors import StorageError, TrtcalError
from trtcal.storage._backends import CHUNK_BYTES, Backend, NotRegularFile
from trtcal.storage._redact import Scrubber, redact_url
from trtcal.storage.manifest import ArtifactRecord, Manifest

__all__ = ["KEEP_VERIFIED_BYTES", "LAYOUT", "Problem", "StoreLayout", "check_bytes"]

LAYOUT = "v1"
# Verified artifacts up to this size stay in memory, so Entry.read does not fetch them twice.
KEEP_VERIFIED_BYTES = 64 << 20


class Problem(Exception):
    """An entry failed verification (`missing`: an artifact is absent). Internal; users see CorruptEntryError."""

    def __init__(self, reason: str, url: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.url = url
        self.missing = missing


def check_bytes(data: bytes, record: ArtifactRecord, url: str) -> None:
    if len(data) != record.size:
        raise Problem(f"{len(data)} bytes, manifest says {record.size} (truncated or replaced)", url)
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.sha256:
        raise Problem(f"sha256 {digest} does not match the manifest's {record.sha256}", url)


class StoreLayout:
    """The v1 layout on one backend; every message path goes through `display` (no credentials)."""

    def __init__(self, backend: Backend, scrub: Scrubber) -> None:
        self.backend = backend
        self.scrub = scrub

    # paths

    def display(self, path: str) -> str:
        return self.scrub(redact_url(self.backend.url(path)))

    def layout_dir(self) -> str:
        return self.backend.join(LAYOUT)

    def entries_dir(self, namespace: str) -> str:
        return self.backend.join(LAYOUT, namespace, "entries")

    def index_dir(self, namespace: str, shard: str | None = None) -> str:
        return self.backend.join(LAYOUT, namespace, "index", *([shard] if shard else []))

    def lease_path(self, namespace: str, key: str) -> str:
        return self.backend.join(LAYOUT, namespace, "leases", key[:2], f"{key}.json")

    def index_marker_path(self, namespace: str, key: str, marker: str) -> str:
        return self.backend.join(LAYOUT, namespace, "index", key[:2], marker)

    def artifacts_dir(self, namespace: str) -> str:
        return self.backend.join(LAYOUT, namespace, "artifacts")

    def manifest_path(self, namespace: str, key: str) -> str:
        return self.backend.join(LAYOUT, namespace, "entries", key[:2], f"{key}.json")

    def stage_dir(self, namespace: str, key: str, stage: str) -> str:
        return self.backend.join(LAYOUT, namespace, "artifacts", key[:2], key, stage)

    def artifact_path(self, namespace: str, key: str, stage: str, name: str) -> str:
        return self.backend.join(LAYOUT, namespace, "artifacts", key[:2], key, stage, name)

    def relative(self, path: str, directory: str) -> str:
        prefix = directory.rstrip("/").rstrip(os.sep)
        rest = path[len(prefix) :] if path.startswith(prefix) else path
        return rest.lstrip("/").lstrip(os.sep)

    # errors

    @contextlib.contextmanager
    def io(self, action: str, path: str, *, missing_ok: bool = True) -> Iterator[None]:
        """Turn backend exceptions into StorageError with scrubbed text; FileNotFoundError passes if missing_ok."""
        try:
            yield
        except (TrtcalError, Problem, NotRegularFile):
            raise
        except FileNotFoundError as exc:
            if missing_ok:
                raise
            raise StorageError(
                f"cannot {action} {self.display(path)}: not found ({self.scrub.describe(exc)}); does the bucket/directory exist?",
                url=self.display(path),
            ) from None
        except PermissionError as exc:
            raise StorageError(
                f"cannot {action} {self.display(path)}: permission denied ({self.scrub.describe(exc)}); "
                "check the credentials and permissions, or open the store read-only",
                url=self.display(path),
            ) from None
        except NotADirectoryError as exc:
            raise StorageError(
                f"cannot {action} {self.display(path)}: a file is in the way of a directory ({self.scrub.describe(exc)}); "
                "is the store URL right?",
                url=self.display(path),
            ) from None
        except Exception as exc:
            raise StorageError(f"cannot {action} {self.display(path)}: {self.scrub.describe(exc)}", url=self.display(path)) from None

    # verification

    def verify_artifacts(self, manifest: Manifest, *, full: bool, keep: bool) -> dict[str, bytes]:
        """Check the artifacts of `manifest`; return the verified bytes kept in memory. Raises Problem.

        `full=False` checks presence, regularity and sizes from one listing; `full=True` reads every
        byte and checks each sha256."""
        ns, key, stage = manifest.namespace, manifest.key, manifest.stage
        paths = {name: self.artifact_path(ns, key, stage, name) for name in manifest.artifacts}
        if not full:
            stage_dir = self.stage_dir(ns, key, stage)
            with self.io("list", stage_dir):
                listed = {self.relative(info.path, stage_dir): info for info in self.backend.list_files(stage_dir)}
            for name, record in manifest.artifacts.items():
                info = listed.get(name)
                if info is None:
                    raise Problem("artifact is missing", self.display(paths[name]), missing=True)
                if not info.regular:
                    raise Problem("artifact is not a regular file (a symbolic link, FIFO or device)", self.display(paths[name]))
                if info.size != record.size:
                    raise Problem(f"{info.size} bytes, manifest says {record.size} (truncated or replaced)", self.display(paths[name]))
            return {}
        kept: dict[str, bytes] = {}
        small = [n for n, r in sorted(manifest.artifacts.items()) if r.size <= KEEP_VERIFIED_BYTES]
        with self.io("read", paths[small[0]] if small else self.stage_dir(ns, key, stage)):
            fetched = self.backend.read_many([paths[n] for n in small])
        for name in small:
            value = fetched[paths[name]]
            if isinstance(value, FileNotFoundError):
                raise Problem("artifact is missing", self.display(paths[name]), missing=True)
            if isinstance(value, NotRegularFile):
                raise Problem(f"artifact {value.strerror}", self.display(paths[name]))
            if isinstance(value, BaseException):
                with self.io("read", paths[name]):
                    raise value
            assert isinstance(value, bytes)
            check_bytes(value, manifest.artifacts[name], self.display(paths[name]))
            if keep:
                kept[name] = value
        for name, record in sorted(manifest.artifacts.items()):
            if record.size > KEEP_VERIFIED_BYTES:
                self._check_streamed(paths[name], record)
        return kept

    def _check_streamed(self, path: str, record: ArtifactRecord) -> None:
        digest, size = hashlib.sha256(), 0
        try:
            with self.io("read", path):
                for chunk in self.backend.iter_chunks(path, CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise Problem("artifact is missing", self.display(path), missing=True) from None
        except NotRegularFile as exc:
            raise Problem(f"artifact {exc.strerror}", self.display(path)) from None
        if size != record.size:
            raise Problem(f"{size} bytes, manifest says {record.size} (truncated or replaced)", self.display(path))
        if digest.hexdigest() != record.sha256:
            raise Problem(f"sha256 {digest.hexdigest()} does not match the manifest's {record.sha256}", self.display(path))
