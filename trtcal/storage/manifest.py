"""manifest.json: the commit record of a cache entry.

    {
      "schema": "trtcal.cache-entry/1",
      "key": "<sha256 of the canonical key inputs>",
      "namespace": "team-a",
      "key_inputs": {...},                       # what the key was computed from (hashes to "key")
      "stage": "s20261126T034116Z-0123456789abcdef",
      "artifacts": {"calibration.cache": {"sha256": "...", "size": 1234}, ...},
      "created_at": "2026-11-26T03:41:16.123456Z",
      "trtcal_version": "0.1.0",
      "extra": {...}                             # versions, timings, anything JSON
    }

A manifest names artifacts only by validated names; it never holds a path. The reader builds each
path from the store root, the namespace, the key, `stage` and the name, so a tampered manifest
cannot point outside the store. Parsing is strict: unknown fields, a key that does not match its
inputs or its location, and bad names all make the entry corrupt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from trtcal._version import __version__
from trtcal.errors import CacheFormatError, ConfigError
from trtcal.storage.keys import canonical_json, compute_cache_key
from trtcal.storage.names import is_artifact_name, is_key, is_namespace, is_stage_id

__all__ = ["SCHEMA", "MAX_MANIFEST_BYTES", "ArtifactRecord", "Manifest", "parse_manifest", "format_time", "parse_time"]

SCHEMA = "trtcal.cache-entry/1"
MAX_MANIFEST_BYTES = 16 << 20  # refuse to parse absurd manifests
_FIELDS = frozenset({"schema", "key", "namespace", "key_inputs", "stage", "artifacts", "created_at", "trtcal_version", "extra"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    if not isinstance(text, str) or _TIME.fullmatch(text) is None:
        raise CacheFormatError(f"created_at {text!r} is not YYYY-MM-DDTHH:MM:SS.ffffffZ")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class ArtifactRecord:
    sha256: str
    size: int


@dataclass(frozen=True, kw_only=True)
class Manifest:
    key: str
    namespace: str
    key_inputs: Mapping[str, Any]
    stage: str
    artifacts: Mapping[str, ArtifactRecord]
    created_at: datetime
    trtcal_version: str = __version__
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "key": self.key,
            "namespace": self.namespace,
            "key_inputs": dict(self.key_inputs),
            "stage": self.stage,
            "artifacts": {name: {"sha256": r.sha256, "size": r.size} for name, r in sorted(self.artifacts.items())},
            "created_at": format_time(self.created_at),
            "trtcal_version": self.trtcal_version,
            "extra": dict(self.extra),
        }

    def to_bytes(self) -> bytes:
        """Sorted, indented JSON (readable with `cat`), validated like a reader would."""
        data = self.to_dict()
        canonical_json(data)  # raises ConfigError for non-JSON values in key_inputs/extra
        text = json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
        encoded = text.encode("utf-8")
        if len(encoded) > MAX_MANIFEST_BYTES:
            raise ConfigError(f"manifest would be {len(encoded)} bytes; keep `extra` under {MAX_MANIFEST_BYTES} bytes")
        return encoded

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.artifacts.values())


def _reject_constant(name: str) -> Any:
    raise CacheFormatError(f"manifest holds {name}, which is not JSON")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CacheFormatError(f"manifest repeats the field {k!r}")
        out[k] = v
    return out


def parse_manifest(data: bytes, *, key: str, namespace: str) -> Manifest:
    """Parse and check a manifest read from `<namespace>/<key>`. Raises CacheFormatError saying what is wrong."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise CacheFormatError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_object)
    except UnicodeDecodeError:
        raise CacheFormatError("manifest is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise CacheFormatError(f"manifest is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:  # a tampered manifest nested thousands deep must not crash ls/verify/gc
        raise CacheFormatError("manifest nests JSON too deeply to be a trtcal manifest") from None
    if not isinstance(obj, dict):
        raise CacheFormatError("manifest is not a JSON object")
    if obj.get("schema") != SCHEMA:
        raise CacheFormatError(f"manifest schema {obj.get('schema')!r} is not {SCHEMA!r}")
    missing, unknown = sorted(_FIELDS - set(obj)), sorted(set(obj) - _FIELDS)
    if missing or unknown:
        raise CacheFormatError(f"manifest fields: missing {missing}, unknown {unknown}")
    if obj["key"] != key or not is_key(obj["key"]):
        raise CacheFormatError(f"manifest key {str(obj['key'])[:80]!r} does not match its location {key!r}")
    if obj["namespace"] != namespace or not is_namespace(obj["namespace"]):
        raise CacheFormatError(f"manifest namespace {str(obj['namespace'])[:80]!r} does not match its location {namespace!r}")
    key_inputs = obj["key_inputs"]
    if not isinstance(key_inputs, dict) or not key_inputs:
        raise CacheFormatError("manifest key_inputs is not a non-empty object")
    try:
        recomputed = compute_cache_key(key_inputs)
    except ConfigError as exc:
        raise CacheFormatError(f"manifest key_inputs: {exc}") from None
    if recomputed != key:
        raise CacheFormatError(f"manifest key_inputs hash to {recomputed}, not to the entry's key")
    if not is_stage_id(obj["stage"]):
        raise CacheFormatError(f"manifest stage {str(obj['stage'])[:80]!r} is not a staging id")
    artifacts = obj["artifacts"]
    if not isinstance(artifacts, dict) or not artifacts:
        raise CacheFormatError("manifest artifacts is not a non-empty object")
    records: dict[str, ArtifactRecord] = {}
    for name, record in artifacts.items():
        if not is_artifact_name(name):
            raise CacheFormatError(f"manifest names an artifact {name[:80]!r} that is not a safe name")
        if not isinstance(record, dict) or set(record) != {"sha256", "size"}:
            raise CacheFormatError(f"manifest record of {name!r} is not {{sha256, size}}")
        sha, size = record["sha256"], record["size"]
        if not isinstance(sha, str) or _SHA256.fullmatch(sha) is None:
            raise CacheFormatError(f"manifest sha256 of {name!r} is not 64 hex digits")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise CacheFormatError(f"manifest size of {name!r} is not a non-negative integer")
        records[name] = ArtifactRecord(sha256=sha, size=size)
    lowered = [n.lower() for n in records]
    if len(set(lowered)) != len(lowered):
        raise CacheFormatError("manifest names two artifacts that differ only in case")
    if not isinstance(obj["trtcal_version"], str) or not isinstance(obj["extra"], dict):
        raise CacheFormatError("manifest trtcal_version must be a string and extra an object")
    return Manifest(
        key=key,
        namespace=namespace,
        key_inputs=key_inputs,
        stage=obj["stage"],
        artifacts=records,
        created_at=parse_time(obj["created_at"]),
        trtcal_version=obj["trtcal_version"],
        extra=obj["extra"],
    )
