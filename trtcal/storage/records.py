"""Small records of the store: its configuration, the `ls` filter, listing/verify/gc results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from trtcal.errors import ConfigError
from trtcal.storage._redact import redact_url
from trtcal.storage.names import DEFAULT_NAMESPACE, check_namespace

__all__ = ["ON_CORRUPT", "OnCorrupt", "StoreConfig", "EntryFilter", "EntryInfo", "VerifyResult", "GcReport", "aware"]

ON_CORRUPT = ("fail", "recompute")
OnCorrupt = Literal["fail", "recompute"]


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """Everything needed to open a CacheStore (e.g. to ship it to a Ray worker).

    Args:
        url: store root: a local path, `file://…`, `s3://bucket/prefix` or `memory://name`.
        namespace: the namespace entries are read from and published to (e.g. a team name).
        read_only: refuse every write (publish, gc).
        read_from: other store roots searched, in order, after a miss here. `URL#namespace`
            picks a namespace there (default: the same namespace).
        on_corrupt: "fail" raises CorruptEntryError for a corrupt entry; "recompute" logs it,
            treats it as a miss, and lets the next publish replace it.
        storage_options: passed to fsspec (credentials, endpoint_url, ...). Never logged.
    """

    url: str
    namespace: str = DEFAULT_NAMESPACE
    read_only: bool = False
    read_from: tuple[str, ...] = ()
    on_corrupt: OnCorrupt = "fail"
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.strip():
            raise ConfigError("url must be a non-empty store URL or path")
        if any(c in self.url for c in "\x00\n\r"):
            raise ConfigError("url must not contain NUL or newline characters")
        check_namespace(self.namespace)
        if not isinstance(self.read_only, bool):
            raise ConfigError(f"read_only must be True or False, got {self.read_only!r}")
        if self.on_corrupt not in ON_CORRUPT:
            raise ConfigError(f"on_corrupt must be one of {list(ON_CORRUPT)}, got {self.on_corrupt!r}")
        if isinstance(self.read_from, str) or not all(isinstance(u, str) and u for u in self.read_from):
            raise ConfigError("read_from must be a sequence of store URLs")
        object.__setattr__(self, "read_from", tuple(self.read_from))
        if not isinstance(self.storage_options, Mapping):
            raise ConfigError("storage_options must be a mapping")

    def __repr__(self) -> str:  # storage_options hold credentials: never show them
        return (
            f"StoreConfig(url={redact_url(self.url)!r}, namespace={self.namespace!r}, read_only={self.read_only}, "
            f"read_from={tuple(redact_url(u) for u in self.read_from)!r}, on_corrupt={self.on_corrupt!r}, "
            f"storage_options=<{len(self.storage_options)} hidden>)"
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything, storage_options (credentials) included: for shipping to a worker, never for logs."""
        return {
            "url": self.url,
            "namespace": self.namespace,
            "read_only": self.read_only,
            "read_from": list(self.read_from),
            "on_corrupt": self.on_corrupt,
            "storage_options": dict(self.storage_options),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoreConfig:
        values = dict(data)
        values["read_from"] = tuple(values.get("read_from", ()))
        return cls(**values)


def aware(moment: datetime | None, name: str) -> datetime | None:
    if moment is not None and (not isinstance(moment, datetime) or moment.tzinfo is None):
        raise ConfigError(f"{name} must be a timezone-aware datetime, got {moment!r}")
    return moment


def _hex_prefix(value: str | None, name: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value or any(c not in "0123456789abcdef" for c in value) or len(value) > 64):
        raise ConfigError(f"{name} must be 1-64 lower-case hex digits, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class EntryFilter:
    """Which entries `ls`, `verify` and `gc` look at. A field left None does not filter.

    model_sha256 and key_prefix match prefixes; created_before/after compare the manifest's
    `created_at` (timezone-aware datetimes).
    """

    namespace: str | None = None
    key_prefix: str | None = None
    model_sha256: str | None = None
    algorithm: str | None = None
    created_before: datetime | None = None
    created_after: datetime | None = None

    def __post_init__(self) -> None:
        if self.namespace is not None:
            check_namespace(self.namespace)
        _hex_prefix(self.key_prefix, "key_prefix")
        _hex_prefix(self.model_sha256, "model_sha256")
        if self.algorithm is not None and (not isinstance(self.algorithm, str) or not self.algorithm):
            raise ConfigError(f"algorithm must be a non-empty string, got {self.algorithm!r}")
        aware(self.created_before, "created_before")
        aware(self.created_after, "created_after")

    def matches(self, info: EntryInfo) -> bool:
        if self.namespace is not None and info.namespace != self.namespace:
            return False
        if self.key_prefix is not None and not info.key.startswith(self.key_prefix):
            return False
        if self.model_sha256 is not None and not (info.model_sha256 or "").startswith(self.model_sha256):
            return False
        if self.algorithm is not None and info.algorithm != self.algorithm:
            return False
        if self.created_before is not None and (info.created_at is None or info.created_at >= self.created_before):
            return False
        if self.created_after is not None and (info.created_at is None or info.created_at <= self.created_after):
            return False
        return True

    @property
    def reads_manifests(self) -> bool:
        return any(v is not None for v in (self.model_sha256, self.algorithm, self.created_before, self.created_after))


@dataclass(frozen=True)
class EntryInfo:
    """One line of `ls`: what the listing index (or, failing it, the manifest) says; nothing verified."""

    key: str
    namespace: str
    url: str
    created_at: datetime | None = None
    model_sha256: str | None = None
    algorithm: str | None = None
    size: int | None = None
    artifact_count: int | None = None
    problem: str | None = None  # set when the manifest had to be read and is unreadable or malformed

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "namespace": self.namespace,
            "url": self.url,
            "created_at": None if self.created_at is None else self.created_at.isoformat(),
            "model_sha256": self.model_sha256,
            "algorithm": self.algorithm,
            "size": self.size,
            "artifact_count": self.artifact_count,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class VerifyResult:
    key: str
    namespace: str
    url: str
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "namespace": self.namespace, "url": self.url, "ok": self.ok, "problem": self.problem}


@dataclass
class GcReport:
    removed_entries: list[str] = field(default_factory=list)  # "<namespace>/<key>"
    removed_orphans: list[str] = field(default_factory=list)  # staging directory / temp file URLs
    kept_recent_orphans: int = 0  # unreferenced but younger than the grace period (maybe being written)
    unreadable_manifests: list[str] = field(default_factory=list)  # left alone; see `verify`
    bytes_freed: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed_entries": self.removed_entries,
            "removed_orphans": self.removed_orphans,
            "kept_recent_orphans": self.kept_recent_orphans,
            "unreadable_manifests": self.unreadable_manifests,
            "bytes_freed": self.bytes_freed,
            "dry_run": self.dry_run,
        }
