"""What a credential is, and keeping credentials out of URLs, messages, logs and job metadata (one place).

* `is_credential_name(name)`: a storage option, env variable or query parameter name whose value is
  a secret (`key`, `secret`, `token`, `password`, `session`, `credential`, `sas`, `signature`, …).
* `SECRET_ENV`: the environment variables that hold credentials (AWS, GCS, Azure, Ray's token).
* `redact_url`, `secret_values`, `Scrubber`: masking them wherever text leaves trtcal.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["redact_url", "Scrubber", "secret_values", "is_credential_name", "SECRET_ENV", "MASK"]

MASK = "***"

# storage_options / client_kwargs entries whose values are secrets (s3fs, botocore, gcsfs, adlfs names).
_SECRET_OPTION = re.compile(
    r"(^|_)(key|secret|token|password|passwd|credential|credentials|sas|signature)($|_)", re.IGNORECASE
)
_NOT_SECRET_OPTION = {"key_prefix"}
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "RAY_AUTH_TOKEN",
)
# Words that make any name a credential's (job metadata is refused on these: it is listed to anyone).
_CREDENTIAL_WORDS = ("secret", "password", "token", "session", "credential", "access_key", "key_id", "private")
_SECRET_QUERY = re.compile(r"signature|credential|token|sig|key|secret|password", re.IGNORECASE)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def is_credential_name(name: str) -> bool:
    """Whether a value under this name (storage option, env variable) is a secret."""
    if name in _NOT_SECRET_OPTION:
        return False
    lowered = name.lower().replace("-", "_")
    return bool(_SECRET_OPTION.search(name)) or any(word in lowered for word in _CREDENTIAL_WORDS)


def redact_url(url: str) -> str:
    """`url` without a password in its user part and without secret-looking query parameters."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", url)
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if not parts.query:
        return text
    query = [(k, MASK if _SECRET_QUERY.search(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def secret_values(storage_options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> set[str]:
    """Every credential string in `storage_options` (nested too) and in the usual environment variables."""
    found: set[str] = set()

    def walk(options: Mapping[str, Any]) -> None:
        for name, value in options.items():
            if isinstance(value, Mapping):
                walk(value)
            elif isinstance(value, str) and is_credential_name(str(name)):
                found.add(value)

    walk(storage_options)
    env = os.environ if environ is None else environ
    found.update(env[name] for name in SECRET_ENV if env.get(name))
    return {value for value in found if len(value) >= 4}


class Scrubber:
    """Replaces known secret values and URL credentials in any text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret containing another is masked whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: object) -> str:
        out = str(text)
        for secret in self._secrets:
            out = out.replace(secret, MASK)
        return _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", out)

    def contains_secret(self, text: str) -> bool:
        return any(secret in text for secret in self._secrets)

    def describe(self, exc: BaseException) -> str:
        """`Type: message` of an exception, scrubbed."""
        message = str(exc) or exc.__class__.__name__
        return self(f"{type(exc).__name__}: {message}")
