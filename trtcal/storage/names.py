"""Names that become parts of a storage path: keys, namespaces, artifact names, staging ids.

Every path component the store builds comes from a name checked here, and each rule is an
allow-list, so nothing can climb out of the store root: no `/`, `\\`, `..`, `:`, `%`, `?`, `#`,
`~`, NUL, newline, whitespace or leading dot can appear. Tensor names never become paths (they
live inside artifacts), so they need no rule here.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone

from trtcal.errors import ConfigError

__all__ = [
    "DEFAULT_NAMESPACE",
    "check_key",
    "check_namespace",
    "check_artifact_name",
    "check_stage_id",
    "is_key",
    "is_namespace",
    "is_artifact_name",
    "is_stage_id",
    "new_stage_id",
    "stage_id_time",
]

DEFAULT_NAMESPACE = "default"

_KEY = re.compile(r"[0-9a-f]{64}")
# Lower case only: one bucket may be mirrored onto a case-insensitive file system.
_NAMESPACE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_ARTIFACT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_STAGE = re.compile(r"s(\d{8}T\d{6}Z)-([0-9a-f]{16})")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_key(value: object) -> bool:
    return isinstance(value, str) and _KEY.fullmatch(value) is not None


def is_namespace(value: object) -> bool:
    return isinstance(value, str) and _NAMESPACE.fullmatch(value) is not None


def is_artifact_name(value: object) -> bool:
    return isinstance(value, str) and _ARTIFACT.fullmatch(value) is not None and ".." not in value


def is_stage_id(value: object) -> bool:
    return isinstance(value, str) and _STAGE.fullmatch(value) is not None


def check_key(value: object) -> str:
    if not is_key(value):
        raise ConfigError(f"cache key {_show(value)} is not 64 lower-case hex digits (a sha256 from compute_cache_key)")
    assert isinstance(value, str)
    return value


def check_namespace(value: object) -> str:
    if not is_namespace(value):
        raise ConfigError(
            f"namespace {_show(value)} is invalid: use 1-64 characters a-z, 0-9, '_' or '-', starting with a letter or digit"
        )
    assert isinstance(value, str)
    return value


def check_artifact_name(value: object) -> str:
    if not is_artifact_name(value):
        raise ConfigError(
            f"artifact name {_show(value)} is invalid: use 1-128 characters A-Z, a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    assert isinstance(value, str)
    return value


def check_stage_id(value: object) -> str:
    if not is_stage_id(value):
        raise ConfigError(f"staging id {_show(value)} is not of the form sYYYYMMDDTHHMMSSZ-<16 hex>")
    assert isinstance(value, str)
    return value


def new_stage_id(now: datetime | None = None) -> str:
    """A fresh staging directory name: creation time (UTC) and 64 random bits."""
    now = now or datetime.now(timezone.utc)
    return f"s{now.astimezone(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(8)}"


def stage_id_time(stage_id: str) -> datetime:
    match = _STAGE.fullmatch(stage_id)
    if match is None:
        raise ConfigError(f"staging id {_show(stage_id)} is not of the form sYYYYMMDDTHHMMSSZ-<16 hex>")
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
