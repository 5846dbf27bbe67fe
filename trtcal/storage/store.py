"""CacheStore: a content-addressed, verified store of calibration entries on fsspec (local, S3, memory).

Layout under the store root (see docs/storage.md):

    <root>/v1/<namespace>/entries/<key[:2]>/<key>.json                 committed manifests
    <root>/v1/<namespace>/artifacts/<key[:2]>/<key>/<stage>/<name>     artifact bytes

Publishing writes every artifact under a fresh staging directory (`<stage>`, unique per writer),
records their sha256 and sizes in the manifest, then commits with ONE create-only write of
`entries/…/<key>.json`. An entry exists exactly when its manifest does, so a half-written entry
is never visible. When several writers race on one key, one create succeeds; the others see the
manifest exists, check it, delete their own staging directory and return the winner's entry.
Readers verify the manifest (schema, key = sha256 of its inputs, location, names) and every
artifact's size and sha256 before anything is used. `gc` removes staging directories that no
manifest references (crashed or losing writers) once they are older than a grace period.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from trtcal.errors import (
    CacheFormatError,
    ConfigError,
    CorruptEntryError,
    ReadOnlyStoreError,
    StorageError,
)
from trtcal.storage._backends import (
    CHUNK_BYTES,
    Backend,
    FileInfo,
    FsspecBackend,
    LocalBackend,
    NotRegularFile,
)
from trtcal.storage._redact import Scrubber, redact_url, refuse_url_credentials, secret_values
from trtcal.storage.entry import Entry
from trtcal.storage.index import IndexRecord, index_name, parse_index_name
from trtcal.storage.keys import canonical_json, compute_cache_key, key_inputs_dict
from trtcal.storage.layout import KEEP_VERIFIED_BYTES, LAYOUT, Problem, StoreLayout
from trtcal.storage.manifest import ArtifactRecord, Manifest, parse_manifest
from trtcal.storage.names import (
    DEFAULT_NAMESPACE,
    check_artifact_name,
    check_key,
    check_namespace,
    is_key,
    is_namespace,
    is_stage_id,
    new_stage_id,
    stage_id_time,
)
from trtcal.storage.records import (
    EntryFilter,
    EntryInfo,
    GcReport,
    OnCorrupt,
    StoreConfig,
    VerifyResult,
    aware,
)
from trtcal.storage.trt_export import (
    DEFAULT_CACHE_ARTIFACT,
    method_artifacts,
    retarget_trt_cache,
    select_method_artifact,
)

__all__ = ["CacheStore", "DEFAULT_ORPHAN_GRACE", "KEEP_VERIFIED_BYTES", "LAYOUT"]

log = logging.getLogger(__name__)

DEFAULT_ORPHAN_GRACE = timedelta(hours=24)
_COMMIT_ATTEMPTS = 3

ArtifactSource = bytes | bytearray | memoryview | os.PathLike  # type: ignore[type-arg]


def _split_read_from(spec: str) -> tuple[str, str | None]:
    base, sep, fragment = spec.rpartition("#")
    if sep and base and is_namespace(fragment):
        return base, fragment
    return spec, None


def _open_backend(url: str, storage_options: Mapping[str, Any], scrub: Scrubber) -> Backend:
    import fsspec

    refuse_url_credentials(url, "store")
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    options = dict(storage_options)
    if protocol in ("s3", "s3a"):
        # Another process may publish at any time: listings must not come from a cache.
        options.setdefault("use_listings_cache", False)
        client_kwargs = options.get("client_kwargs") or {}
        if "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options["endpoint_url"] = endpoint
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise StorageError(
            f"cannot open store {redact_url(url)}: {scrub.describe(exc)}; for s3:// install trtcal[s3]", url=redact_url(url)
        ) from None
    except Exception as exc:
        raise StorageError(f"cannot open store {redact_url(url)}: {scrub.describe(exc)}", url=redact_url(url)) from None
    fs_protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if fs_protocol in ("file", "local"):
        return LocalBackend(path)
    if fs_protocol in ("s3", "s3a"):
        if not path.strip("/"):
            raise ConfigError(f"store URL {redact_url(url)} names no bucket; use s3://bucket[/prefix]")
        return FsspecBackend(fs, path, "s3")
    if fs_protocol == "memory":
        return FsspecBackend(fs, path if path.startswith("/") else "/" + path, "memory")
    return FsspecBackend(fs, path, fs_protocol)


class CacheStore:
    """A content-addressed store of calibration entries, on any fsspec URL.

    Args:
        url: store root: a local path, `file://…`, `s3://bucket/prefix`, `memory://name`
            (other fsspec protocols read-only).
        namespace: namespace for get/publish (default "default"); `ls`/`verify`/`gc` see all.
        read_only: refuse every write.
        read_from: other stores (URLs, `URL#namespace`, or CacheStore objects) searched in order
            after a miss here.
        on_corrupt: "fail" (raise CorruptEntryError) or "recompute" (log, treat as a miss, and
            let the next publish replace the entry).
        **storage_options: fsspec options (credentials, endpoint_url, ...). S3 endpoints other
            than AWS also come from the AWS_ENDPOINT_URL environment variable.

    Example:
        >>> from trtcal.storage import compute_cache_key
        >>> store = CacheStore("memory://doctest-store")
        >>> inputs = {"model_sha256": "ab" * 32, "algorithm": "minmax"}
        >>> key = compute_cache_key(inputs)
        >>> store.get(key) is None
        True
        >>> entry = store.publish(key, {"calibration.cache": b"TRT-100300-MinMaxCalibration\\n"}, key_inputs=inputs)
        >>> store.get(key).read("calibration.cache")
        b'TRT-100300-MinMaxCalibration\\n'
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str | None = None,
        read_only: bool = False,
        read_from: Sequence[str | CacheStore] = (),
        on_corrupt: OnCorrupt = "fail",
        **storage_options: Any,
    ) -> None:
        if isinstance(read_from, (str, CacheStore)):
            read_from = (read_from,)
        self._read_from_objects = [s for s in read_from if isinstance(s, CacheStore)]
        self.config = StoreConfig(
            url=url,
            namespace=DEFAULT_NAMESPACE if namespace is None else namespace,
            read_only=read_only,
            read_from=tuple(s for s in read_from if not isinstance(s, CacheStore)),
            on_corrupt=on_corrupt,
            storage_options=storage_options,
        )
        self._scrub = Scrubber(secret_values(storage_options))
        self._backend = _open_backend(url, storage_options, self._scrub)
        self._layout = StoreLayout(self._backend, self._scrub)
        self._read_from_stores: list[CacheStore] | None = None

    @classmethod
    def from_config(cls, config: StoreConfig) -> CacheStore:
        return cls(
            config.url,
            namespace=config.namespace,
            read_only=config.read_only,
            read_from=config.read_from,
            on_corrupt=config.on_corrupt,
            **dict(config.storage_options),
        )

    @property
    def url(self) -> str:
        """The store root as a URL, without credentials."""
        return self._display(self._backend.root)

    @property
    def namespace(self) -> str:
        return self.config.namespace

    @property
    def read_only(self) -> bool:
        return self.config.read_only or not self._backend.writable

    @property
    def on_corrupt(self) -> OnCorrupt:
        return self.config.on_corrupt

    def __repr__(self) -> str:
        return f"CacheStore({self.url!r}, namespace={self.namespace!r}, read_only={self.read_only})"

    # paths (see trtcal.storage.layout)

    def _display(self, path: str) -> str:
        return self._layout.display(path)

    def _check_writable(self, action: str) -> None:
        if self.config.read_only:
            raise ReadOnlyStoreError(f"cannot {action}: store {self.url} was opened read-only", url=self.url)
        if not self._backend.writable:
            raise ReadOnlyStoreError(
                f"cannot {action}: {self._backend.protocol}:// has no atomic create-only write that trtcal relies on; "
                "publish to a local path or s3:// (this store can still be read)",
                url=self.url,
            )

    def _report_corrupt(self, key: str, namespace: str, problem: Problem) -> None:
        message = f"cache entry {key} (namespace {namespace}) is corrupt at {problem.url}: {problem.reason}; it was not used"
        log.warning("%s", message)
        if self.on_corrupt == "fail":
            raise CorruptEntryError(
                message + ". Run `trtcal cache verify` on the store; `trtcal calibrate … --on-corrupt recompute` "
                "(CacheStore(on_corrupt='recompute') in Python) recomputes it and replaces it",
                url=problem.url,
                key=key,
            )

    # reading

    def _read_manifest_bytes(self, namespace: str, key: str) -> bytes | None:
        path = self._layout.manifest_path(namespace, key)
        try:
            with self._layout.io("read", path):
                return self._backend.read_bytes(path)
        except FileNotFoundError:
            return None

    def _load(self, namespace: str, key: str, *, full: bool, keep: bool) -> tuple[Entry | None, Problem | None]:
        """(entry, None) when verified, (None, None) when absent, (None, problem) when corrupt."""
        url = self._display(self._layout.manifest_path(namespace, key))
        try:
            data = self._read_manifest_bytes(namespace, key)
        except NotRegularFile as exc:
            return None, Problem(f"manifest {exc.strerror}", url)
        if data is None:
            return None, None
        try:
            manifest = parse_manifest(data, key=key, namespace=namespace)
        except CacheFormatError as exc:
            return None, Problem(f"bad manifest: {exc}", url)
        try:
            verified = self._layout.verify_artifacts(manifest, full=full, keep=keep)
        except Problem as problem:
            # An artifact vanished because the entry was removed (gc, replace) while we read: a miss.
            try:
                gone = problem.missing and self._read_manifest_bytes(namespace, key) != data
            except NotRegularFile:
                gone = False
            if gone:
                return None, None
            return None, problem
        return Entry(self._layout, manifest, store_url=self.url, verified=verified), None

    def get(self, key: str, *, lazy: bool = False) -> Entry | None:
        """The verified entry for `key`, from this store or (on a miss) a read-from store; None if absent.

        By default every artifact is read and checked against its sha256 now (artifacts up to
        64 MiB stay in memory, so `Entry.read` does not fetch them again). With `lazy=True` only the
        manifest and the artifact sizes are checked now; each artifact is checked when it is read or
        downloaded, which suits entries holding large files that the caller may not need.

        A corrupt entry raises CorruptEntryError (on_corrupt="fail") or counts as a miss
        (on_corrupt="recompute"); either way it is logged with its key and path.
        """
        key = check_key(key)
        entry, problem = self._load(self.namespace, key, full=not lazy, keep=not lazy)
        if entry is not None:
            log.debug("cache hit %s in %s", key, self.url)
            return entry
        if problem is not None:
            self._report_corrupt(key, self.namespace, problem)
        for other in self._other_stores():
            entry = other.get(key, lazy=lazy)
            if entry is not None:
                log.info("cache hit %s in read-from store %s", key, other.url)
                return entry
        return None

    def _other_stores(self) -> list[CacheStore]:
        if self._read_from_stores is None:
            stores: list[CacheStore] = []
            for spec in self.config.read_from:
                url, namespace = _split_read_from(spec)
                stores.append(
                    CacheStore(
                        url,
                        namespace=namespace or self.namespace,
                        read_only=True,
                        on_corrupt=self.on_corrupt,
                        **dict(self.config.storage_options),
                    )
                )
            self._read_from_stores = stores + self._read_from_objects
        return self._read_from_stores

    # computing once

    def compute_once(
        self, key: str, *, ttl: timedelta = timedelta(minutes=2), wait: timedelta = timedelta(hours=2), poll_s: float = 1.0
    ) -> contextlib.AbstractContextManager[Entry | None]:
        """Yield the entry if it exists (or appears while we wait), else None with a lease held.

        Concurrent jobs on one key: the one that gets the lease (`trtcal.storage.lease`) computes and
        publishes inside the block; the others wait for its entry. A holder that dies stops
        refreshing; its lease expires after `ttl` and a waiter computes. Waiting longer than `wait`
        is a StorageError. A read-only store never leases (it cannot publish): it yields `get(key)`.
        """
        from trtcal.storage.lease import compute_once

        key = check_key(key)
        return compute_once(
            self._layout, self._layout.lease_path(self.namespace, key), key, self.get,
            leasing=not self.read_only, store_url=self.url, ttl_s=ttl.total_seconds(), wait_s=wait.total_seconds(), poll_s=poll_s,
        )

    # publishing

    def publish(
        self,
        key: str,
        artifacts: Mapping[str, ArtifactSource],
        *,
        key_inputs: Mapping[str, Any] | Any,
        extra: Mapping[str, Any] | None = None,
    ) -> Entry:
        """Publish an entry; return the committed entry (ours, or the one another writer committed first).

        Args:
            key: compute_cache_key(key_inputs); checked.
            artifacts: name -> bytes, or name -> local file path (pathlib.Path) streamed without
                loading it: a regular file (its size must not change) or a FIFO the caller feeds;
                devices and directories are refused. Names: letters, digits, '.', '_', '-'.
            key_inputs: what the key was computed from (a KeyInputs or a mapping); recorded in the
                manifest so readers can re-check the key, and `ls` can filter on it.
            extra: JSON data recorded in the manifest (versions, timings).

        Raises: ConfigError (a bad key, name, input or value), ReadOnlyStoreError, StorageError;
            CorruptEntryError if a corrupt entry already holds the key and on_corrupt is "fail".
        """
        self._check_writable("publish")
        key = check_key(key)
        inputs = key_inputs_dict(key_inputs)
        computed = compute_cache_key(inputs)
        if computed != key:
            raise ConfigError(f"key {key} does not match key_inputs (they hash to {computed}); compute it with compute_cache_key")
        extra_dict = dict(extra or {})
        canonical_json(extra_dict)  # JSON values only
        if self._scrub.contains_secret(canonical_json({"key_inputs": inputs, "extra": extra_dict}).decode("utf-8")):
            raise ConfigError("key_inputs or extra contain a storage credential; it must never be written to a manifest")
        sources = self._check_artifacts(artifacts)
        namespace = self.namespace
        stage = new_stage_id()
        stage_dir = self._layout.stage_dir(namespace, key, stage)
        committed = False
        try:
            records: dict[str, ArtifactRecord] = {}
            verified: dict[str, bytes] = {}
            for name, source in sources:
                records[name] = self._write_artifact(self._layout.artifact_path(namespace, key, stage, name), source)
                if isinstance(source, bytes) and len(source) <= KEEP_VERIFIED_BYTES:
                    verified[name] = source
            manifest = Manifest(
                key=key,
                namespace=namespace,
                key_inputs=inputs,
                stage=stage,
                artifacts=records,
                created_at=datetime.now(timezone.utc),
                extra=extra_dict,
            )
            data = manifest.to_bytes()
            path = self._layout.manifest_path(namespace, key)
            for _attempt in range(_COMMIT_ATTEMPTS):
                with self._layout.io("commit", path, missing_ok=False):
                    committed = self._backend.create_only(path, data)
                if committed:
                    log.info("published %s (namespace %s) to %s", key, namespace, self.url)
                    self._write_index(manifest)
                    return Entry(self._layout, manifest, store_url=self.url, verified=verified, created=True)
                existing, problem = self._load(namespace, key, full=True, keep=True)
                if existing is not None:
                    log.info("another writer published %s first; using its entry", key)
                    return existing
                if problem is None:
                    continue  # removed between our attempt and our read: try again
                self._report_corrupt(key, namespace, problem)  # raises under on_corrupt="fail"
                log.warning("replacing corrupt entry %s (namespace %s)", key, namespace)
                with self._layout.io("remove", path):
                    self._backend.delete_file(path)
                self._delete_index(namespace, key)
            raise StorageError(
                f"could not commit {key} to {self.url} after {_COMMIT_ATTEMPTS} attempts; entries kept changing under us",
                url=self.url,
            )
        finally:
            if not committed:
                self._discard_stage(stage_dir)

    def _check_artifacts(self, artifacts: Mapping[str, ArtifactSource]) -> list[tuple[str, bytes | _LocalFile]]:
        if not isinstance(artifacts, Mapping) or not artifacts:
            raise ConfigError("artifacts must be a non-empty mapping of name -> bytes or local file path")
        out: list[tuple[str, bytes | _LocalFile]] = []
        seen: dict[str, str] = {}
        for name, source in sorted(artifacts.items()):
            check_artifact_name(name)
            if name.lower() in seen:
                raise ConfigError(f"artifact names {seen[name.lower()]!r} and {name!r} differ only in case")
            seen[name.lower()] = name
            if isinstance(source, (bytes, bytearray, memoryview)):
                out.append((name, bytes(source)))
            elif isinstance(source, os.PathLike):
                path = Path(os.fspath(source))
                try:
                    st = path.stat()  # follows a symlink to its file; never opens (a FIFO would block)
                except OSError as exc:
                    raise ConfigError(f"artifact {name!r}: cannot use local file {path}: {exc.strerror or exc}") from None
                if stat.S_ISFIFO(st.st_mode):  # a producer the caller runs: streamed until it closes
                    out.append((name, _LocalFile(path, None)))
                elif stat.S_ISREG(st.st_mode):
                    out.append((name, _LocalFile(path, st.st_size)))
                else:  # /dev/zero streamed forever: a hang and a multi-GB orphan upload
                    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device or socket)"
                    raise ConfigError(f"artifact {name!r}: {path} is {kind}; give a regular file")
            else:
                raise ConfigError(f"artifact {name!r} must be bytes or a pathlib.Path, got {type(source).__name__}")
        return out

    def _write_artifact(self, path: str, source: bytes | _LocalFile) -> ArtifactRecord:
        digest = hashlib.sha256()
        size = 0

        def chunks() -> Generator[bytes, None, None]:
            nonlocal size
            if isinstance(source, bytes):
                digest.update(source)
                size = len(source)
                yield source
                return
            with open(source.path, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
                    if source.size is not None and size > source.size:
                        break  # growing while we read: stop at once, never stream without bound
                    yield chunk
            if source.size is not None and size != source.size:
                raise ConfigError(
                    f"local file {source.path} changed size while it was published ({source.size} bytes, then {size}+); nothing was stored"
                )

        stream = chunks()
        try:
            with self._layout.io("write", path, missing_ok=False):
                self._backend.write_stream(path, stream)
        finally:
            stream.close()  # closes the source file now, even when the upload failed half-way
        return ArtifactRecord(sha256=digest.hexdigest(), size=size)

    def _discard_stage(self, stage_dir: str) -> None:
        try:
            self._backend.delete_tree(stage_dir)
            if isinstance(self._backend, LocalBackend):
                self._backend.remove_empty_dirs(os.path.dirname(stage_dir), self._layout.layout_dir())
        except Exception as exc:  # best effort: gc removes what is left
            log.warning("could not remove staging directory %s (gc will): %s", self._display(stage_dir), self._scrub.describe(exc))

    # listing, verification, gc

    def check_can_publish(self) -> None:
        """ReadOnlyStoreError now, not after all the work, when a publish here cannot succeed.

        A local store's root is created if missing and a probe file is written and removed in it
        (root runs as anyone: permissions are tested by doing). Remote stores are not probed (a
        probe would be an object write); their errors come at the first publish.
        """
        self._check_writable("publish")
        if not isinstance(self._backend, LocalBackend):
            return
        root = self._backend.root
        probe = os.path.join(root, f".probe-{new_stage_id()}")
        try:
            os.makedirs(root, exist_ok=True)
            with open(probe, "xb"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise ReadOnlyStoreError(
                f"cannot publish to store {self.url}: {exc.strerror or exc}; fix its permissions or free space, "
                "or pass --read-only to compute without publishing",
                url=self.url,
            ) from None

    def require_store(self) -> None:
        """StorageError unless the root holds a store, so a mistyped path is not "0 entries".

        A local path must be an existing directory holding `v1/` (or nothing: an empty store).
        Elsewhere there are no empty directories: the bucket must exist and the prefix must hold
        `v1/` (a store appears with its first publish).
        """
        root = self._backend.root
        if isinstance(self._backend, LocalBackend):
            if not os.path.lexists(root):
                raise StorageError(f"no store at {self.url}: the directory does not exist; is the path right?", url=self.url)
            if not os.path.isdir(root):
                raise StorageError(f"{self.url} is not a store: it is a file, not a directory; is the path right?", url=self.url)
        with self._layout.io("list", root, missing_ok=False):
            names = self._backend.list_names(root)
        if not names:
            if isinstance(self._backend, LocalBackend):
                return  # an empty directory: an empty store
            raise StorageError(
                f"nothing is stored under {self.url}: no store there (a store appears with its first publish); "
                "is the bucket and prefix right?",
                url=self.url,
            )
        layout = self._layout.layout_dir()
        if LAYOUT not in names or (isinstance(self._backend, LocalBackend) and not os.path.isdir(layout)):
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise StorageError(
                f"{self.url} is not a trtcal store: it holds {shown} but no {LAYOUT}/ directory; is the path right?",
                url=self.url,
            )

    def _namespaces(self, namespace: str | None) -> list[str]:
        if namespace is not None:
            return [check_namespace(namespace)]
        with self._layout.io("list", self._layout.layout_dir()):
            return [n for n in self._backend.list_names(self._layout.layout_dir()) if is_namespace(n)]

    def _manifest_files(self, namespace: str) -> dict[str, FileInfo]:
        """key -> file info of every committed manifest in a namespace (temp files skipped)."""
        entries_dir = self._layout.entries_dir(namespace)
        with self._layout.io("list", entries_dir):
            files = self._backend.list_files(entries_dir)
        out: dict[str, FileInfo] = {}
        for info in files:
            parts = self._layout.relative(info.path, entries_dir).replace(os.sep, "/").split("/")
            if len(parts) == 2 and parts[1].endswith(".json"):
                key = parts[1][:-5]
                if is_key(key) and parts[0] == key[:2]:
                    out[key] = info
        return out

    def _scan(self, namespace: str, keys: list[str]) -> list[tuple[EntryInfo, Manifest | None]]:
        """Read and parse the manifests of `keys` (concurrently where the backend can)."""
        paths = {key: self._layout.manifest_path(namespace, key) for key in keys}
        with self._layout.io("read", self._layout.entries_dir(namespace)):
            fetched = self._backend.read_many(list(paths.values()))
        out: list[tuple[EntryInfo, Manifest | None]] = []
        for key in keys:
            url = self._display(paths[key])
            value = fetched.get(paths[key])
            if isinstance(value, FileNotFoundError):
                continue  # removed since it was listed
            if not isinstance(value, bytes):
                problem = f"unreadable: {self._scrub.describe(value) if value is not None else 'no data'}"
                out.append((EntryInfo(key=key, namespace=namespace, url=url, problem=problem), None))
                continue
            try:
                m = parse_manifest(value, key=key, namespace=namespace)
            except CacheFormatError as exc:
                out.append((EntryInfo(key=key, namespace=namespace, url=url, problem=f"bad manifest: {exc}"), None))
                continue
            info = EntryInfo(
                key=key,
                namespace=namespace,
                url=url,
                created_at=m.created_at,
                model_sha256=_str_or_none(m.key_inputs.get("model_sha256")),
                algorithm=_str_or_none(m.key_inputs.get("algorithm")),
                size=m.total_size,
                artifact_count=len(m.artifacts),
            )
            out.append((info, m))
        return out

    def _index_files(self, namespace: str, key_prefix: str | None = None) -> dict[str, list[tuple[IndexRecord, FileInfo]]]:
        """key -> its listing-index markers (normally exactly one)."""
        index_dir = self._layout.index_dir(namespace)
        if key_prefix is not None and len(key_prefix) >= 2:
            index_dir = self._layout.index_dir(namespace, key_prefix[:2])
        with self._layout.io("list", index_dir):
            files = self._backend.list_files(index_dir)
        out: dict[str, list[tuple[IndexRecord, FileInfo]]] = {}
        for file in files:
            record = parse_index_name(file.path.replace(os.sep, "/").rsplit("/", 1)[-1])
            if record is not None:
                out.setdefault(record.key, []).append((record, file))
        return out

    def _write_index(self, manifest: Manifest) -> None:
        path = self._layout.index_marker_path(manifest.namespace, manifest.key, index_name(manifest))
        try:
            with self._layout.io("write", path, missing_ok=False):
                self._backend.write_stream(path, [b""])
        except (StorageError, FileExistsError) as exc:  # the entry is fine; `ls` reads its manifest instead
            log.warning("could not write the listing index of %s: %s", manifest.key, exc)

    def _delete_index(self, namespace: str, key: str) -> None:
        for _record, file in self._index_files(namespace, key).get(key, []):
            with self._layout.io("remove", file.path):
                self._backend.delete_file(file.path)

    def ls(self, flt: EntryFilter | None = None) -> list[EntryInfo]:
        """Committed entries matching `flt` (all namespaces unless it names one), oldest first.

        Two listings per namespace (manifests, and the listing index whose marker names carry
        each entry's time, size, model and algorithm); a manifest is read only for an entry
        whose marker is missing or malformed. Nothing is verified here; see `verify`. Entries
        whose manifest had to be read and is unreadable are listed with `problem` set, unless
        the filter needs fields they cannot show.
        """
        flt = flt or EntryFilter()
        out: list[EntryInfo] = []
        for namespace in self._namespaces(flt.namespace):
            keys = sorted(k for k in self._manifest_files(namespace) if flt.key_prefix is None or k.startswith(flt.key_prefix))
            index = self._index_files(namespace, flt.key_prefix) if keys else {}
            entries_url = self._display(self._layout.entries_dir(namespace))  # once: redacting per entry is slow
            infos: list[EntryInfo] = []
            unindexed: list[str] = []
            for key in keys:
                records = index.get(key, [])
                if len(records) != 1:
                    unindexed.append(key)
                    continue
                record = records[0][0]
                infos.append(
                    EntryInfo(
                        key=key,
                        namespace=namespace,
                        url=f"{entries_url}/{key[:2]}/{key}.json",
                        created_at=record.created_at,
                        model_sha256=record.model_sha256,
                        algorithm=record.algorithm,
                        size=record.size,
                        artifact_count=record.artifact_count,
                    )
                )
            infos.extend(info for info, _manifest in self._scan(namespace, unindexed))
            for info in infos:
                if info.problem is not None:
                    if not flt.reads_manifests:
                        out.append(info)
                elif flt.matches(info):
                    out.append(info)
        epoch = datetime.min.replace(tzinfo=timezone.utc)
        return sorted(out, key=lambda i: (i.namespace, i.created_at or epoch, i.key))

    def verify(self, flt: EntryFilter | None = None, *, workers: int = 8) -> list[VerifyResult]:
        """Fully verify every entry matching `flt` (every byte of every artifact), `workers` entries
        at a time. Nothing is changed. Results come in `ls` order."""
        from concurrent.futures import ThreadPoolExecutor

        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be a positive int, got {workers!r}")

        def check(info: EntryInfo) -> VerifyResult | None:
            if info.problem is not None:
                return VerifyResult(info.key, info.namespace, info.url, info.problem)
            entry, problem = self._load(info.namespace, info.key, full=True, keep=False)
            if entry is None and problem is None:
                return None  # removed while we worked
            return VerifyResult(info.key, info.namespace, problem.url if problem else info.url, problem.reason if problem else None)

        infos = self.ls(flt)
        with ThreadPoolExecutor(max_workers=min(workers, max(1, len(infos)))) as pool:
            return [r for r in pool.map(check, infos) if r is not None]

    def gc(
        self,
        *,
        older_than: datetime | timedelta | None = None,
        namespace: str | None = None,
        orphan_grace: timedelta = DEFAULT_ORPHAN_GRACE,
        dry_run: bool = False,
        now: datetime | None = None,
    ) -> GcReport:
        """Delete orphaned staging data and, if `older_than` is given, entries created before it.

        Orphans are staging directories no manifest references (crashed or losing writers) and
        leftover temp files, once their newest file is older than `orphan_grace` (a writer may
        still be uploading a younger one). An entry is removed manifest first, so readers never
        see it half-deleted. Entries whose manifest cannot be parsed are left alone (see `verify`).
        """
        self._check_writable("gc")
        now = aware(now, "now") or datetime.now(timezone.utc)
        if isinstance(older_than, timedelta):
            cutoff: datetime | None = now - older_than
        else:
            cutoff = aware(older_than, "older_than")
        if not isinstance(orphan_grace, timedelta) or orphan_grace < timedelta(0):
            raise ConfigError(f"orphan_grace must be a non-negative timedelta, got {orphan_grace!r}")
        report = GcReport(dry_run=dry_run)
        for ns in self._namespaces(namespace):
            self._gc_namespace(ns, cutoff, now - orphan_grace, report)
        return report

    def _gc_namespace(self, namespace: str, cutoff: datetime | None, orphan_cutoff: datetime, report: GcReport) -> None:
        referenced: dict[str, str | None] = {}  # key -> the stage it references (None: unreadable, keep all)
        for info, m in self._scan(namespace, sorted(self._manifest_files(namespace))):
            if m is None:
                referenced[info.key] = None
                report.unreadable_manifests.append(info.url)
                continue
            if cutoff is not None and m.created_at < cutoff:
                report.removed_entries.append(f"{namespace}/{info.key}")
                report.bytes_freed += m.total_size
                if not report.dry_run:
                    self._remove_entry(namespace, info.key, m.stage)
                continue
            referenced[info.key] = m.stage
        # Staging directories no manifest references.
        artifacts_dir = self._layout.artifacts_dir(namespace)
        with self._layout.io("list", artifacts_dir):
            files = self._backend.list_files(artifacts_dir)
        stages: dict[tuple[str, str], list[FileInfo]] = {}
        for file in files:
            parts = self._layout.relative(file.path, artifacts_dir).replace(os.sep, "/").split("/")
            if len(parts) >= 4 and is_key(parts[1]) and parts[0] == parts[1][:2] and is_stage_id(parts[2]):
                stages.setdefault((parts[1], parts[2]), []).append(file)
        for (key, stage), stage_files in sorted(stages.items()):
            if key in referenced and (referenced[key] is None or referenced[key] == stage):
                continue
            # Age of the newest file (a writer may still be adding files); the staging id's time if unknown.
            newest = max((f.mtime for f in stage_files if f.mtime is not None), default=None) or stage_id_time(stage)
            if newest > orphan_cutoff:
                report.kept_recent_orphans += 1
                continue
            stage_dir = self._layout.stage_dir(namespace, key, stage)
            report.removed_orphans.append(self._display(stage_dir))
            report.bytes_freed += sum(f.size for f in stage_files)
            if not report.dry_run:
                self._discard_stage(stage_dir)
        # Listing-index markers of entries that are gone (a gc interrupted between the two deletes).
        for key, markers in sorted(self._index_files(namespace).items()):
            if key in referenced:
                continue
            for _record, file in markers:
                if file.mtime is not None and file.mtime > orphan_cutoff:
                    continue  # maybe written right after a commit this scan did not see
                report.removed_orphans.append(self._display(file.path))
                if not report.dry_run:
                    with self._layout.io("remove", file.path):
                        self._backend.delete_file(file.path)
        # Temp files of interrupted local commits.
        entries_dir = self._layout.entries_dir(namespace)
        with self._layout.io("list", entries_dir):
            entry_files = self._backend.list_files(entries_dir)
        for file in entry_files:
            if os.path.basename(file.path).startswith(".tmp-") and file.mtime is not None and file.mtime <= orphan_cutoff:
                report.removed_orphans.append(self._display(file.path))
                report.bytes_freed += file.size
                if not report.dry_run:
                    with self._layout.io("remove", file.path):
                        self._backend.delete_file(file.path)

    def _remove_entry(self, namespace: str, key: str, stage: str) -> None:
        path = self._layout.manifest_path(namespace, key)
        with self._layout.io("remove", path):
            self._backend.delete_file(path)  # uncommit first: readers see a miss, never half an entry
        self._delete_index(namespace, key)
        self._discard_stage(self._layout.stage_dir(namespace, key, stage))
        if isinstance(self._backend, LocalBackend):
            self._backend.remove_empty_dirs(os.path.dirname(path), self._layout.layout_dir())

    # TensorRT export

    def export_trt_cache(
        self,
        key: str,
        *,
        trt_version: str | int | tuple[int, ...],
        algorithm: str | None = None,
        artifact: str | None = None,
    ) -> bytes:
        """The entry's TensorRT calibration cache with its header set for `trt_version` (e.g. "10.16.1").

        `algorithm` (a trtcal method, or a TensorRT header name) picks WHICH method's scales are
        exported: `calibration.<method>.cache`, or `calibration.cache` when that method came first;
        the header names its calibrator. An entry without that method's scales is a ConfigError
        listing the methods it has. None exports `artifact` (default calibration.cache) as stored.
        Raises StorageError if there is no such entry.
        """
        entry = self.get(key, lazy=True)
        if entry is None:
            where = self.url + (f" (nor in {len(self._other_stores())} read-from store(s))" if self._other_stores() else "")
            raise StorageError(f"no cache entry {key} in namespace {self.namespace} of {where}", url=self.url)
        if algorithm is not None:
            available = method_artifacts(entry.names, entry.key_inputs, lambda: _stored_header(entry))
            method, chosen = select_method_artifact(algorithm, available, entry=key, names=entry.names)
            if artifact is not None and artifact != chosen:
                raise ConfigError(f"artifact {artifact!r} of entry {key} does not hold {method} scales ({chosen} does)")
            artifact = chosen
        artifact = artifact or DEFAULT_CACHE_ARTIFACT
        data = entry.read(artifact)
        try:
            return retarget_trt_cache(data, trt_version=trt_version, algorithm=algorithm)
        except CacheFormatError as exc:
            raise CacheFormatError(f"artifact {artifact!r} of entry {key} ({entry.artifact_url(artifact)}): {exc}") from None


def _stored_header(entry: Entry) -> str | None:
    """The calibrator named in the header of an entry's calibration.cache (None if unreadable)."""
    from trtcal.core.cache_format import read_trt_cache

    try:
        return read_trt_cache(entry.read(DEFAULT_CACHE_ARTIFACT)).algorithm
    except CacheFormatError:
        return None


@dataclass(frozen=True)
class _LocalFile:
    """A local artifact file and its size when it was checked (streaming stops past it; None: a FIFO)."""

    path: Path
    size: int | None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
