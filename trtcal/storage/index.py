"""The listing index: what `ls` shows of an entry, carried in the NAME of an empty marker object.

    <root>/v1/<namespace>/index/<key[:2]>/<key>~<created>~<size>~<model_sha256|_>~<algorithm|_>~<artifacts>

Listing one prefix (1,000 names per S3 request) then gives every entry's key, creation time, size,
model hash and algorithm without reading 10,000 manifests one GET at a time. The committer writes
the marker right after its manifest commit; gc removes it with the entry. The index is only for
display and filtering: `get` and `verify` trust manifests alone, and `ls` reads the manifest of
any entry whose marker is missing, duplicated or malformed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from trtcal.storage.manifest import Manifest

__all__ = ["IndexRecord", "index_name", "parse_index_name"]

_SAFE_ALGORITHM = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(
    r"(?P<key>[0-9a-f]{64})~(?P<created>\d{8}T\d{12}Z)~(?P<size>\d{1,15})~(?P<model>[0-9a-f]{64}|_|!)"
    r"~(?P<algorithm>[A-Za-z0-9_.-]{1,32}|_|!)~(?P<count>\d{1,5})"
)
_TIME = "%Y%m%dT%H%M%S%fZ"


@dataclass(frozen=True)
class IndexRecord:
    key: str
    created_at: datetime
    size: int
    model_sha256: str | None
    algorithm: str | None
    artifact_count: int


def index_name(manifest: Manifest) -> str:
    """The marker name for a manifest (at most 201 characters; safe on every file system)."""
    model_part = _part(manifest.key_inputs.get("model_sha256"), _SHA256)
    algorithm_part = _part(manifest.key_inputs.get("algorithm"), _SAFE_ALGORITHM)
    created = manifest.created_at.astimezone(timezone.utc).strftime(_TIME)
    return f"{manifest.key}~{created}~{manifest.total_size}~{model_part}~{algorithm_part}~{len(manifest.artifacts)}"


def _part(value: object, pattern: re.Pattern[str]) -> str:
    # "_": the manifest has no such string; "!": it has one a file name cannot carry (ls reads the manifest).
    if not isinstance(value, str):
        return "_"
    return value if pattern.fullmatch(value) else "!"


def parse_index_name(name: str) -> IndexRecord | None:
    """The record a marker name carries, or None if it is not one or cannot tell everything (then `ls` reads the manifest)."""
    match = _NAME.fullmatch(name)
    if match is None or "!" in (match["model"], match["algorithm"]):
        return None
    t = match["created"]  # YYYYmmddTHHMMSSffffffZ; parsed by hand, strptime dominates `ls` otherwise
    try:
        created = datetime(int(t[0:4]), int(t[4:6]), int(t[6:8]), int(t[9:11]), int(t[11:13]), int(t[13:15]), int(t[15:21]), timezone.utc)
    except ValueError:
        return None
    return IndexRecord(
        key=match["key"],
        created_at=created,
        size=int(match["size"]),
        model_sha256=None if match["model"] == "_" else match["model"],
        algorithm=None if match["algorithm"] == "_" else match["algorithm"],
        artifact_count=int(match["count"]),
    )
