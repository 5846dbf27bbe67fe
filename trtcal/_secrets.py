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

__all__ = ["redact_url", "Scrubber", "secret_values", "is_credential_name", "refuse_url_credentials", "SECRET_ENV", "MASK"]

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
# `user:password@host` without its scheme, as S3 clients echo an s3://AK:SECRET@bucket "bucket name".
_BARE_USERINFO = re.compile(r"(?<![\w.~%+-])[\w.~%+-]+:[^\s/@\"'<>]+@(?=[\w.-])")
# Object stores whose URLs never carry credentials (their clients would take `user:pass@bucket`
# for a bucket name and print it in errors).
_NO_USERINFO_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss")


def refuse_url_credentials(url: str, what: str) -> None:
    """ConfigError for `s3://KEY:SECRET@bucket/...` (masked in the message): never sent, never printed."""
    from trtcal.errors import ConfigError

    match = _USERINFO.match(url)
    if match and match.group("scheme")[:-3].lower() in _NO_USERINFO_PROTOCOLS:
        raise ConfigError(
            f"{what} {redact_url(url)} carries credentials in the URL, which its client does not support (it would "
            "take them for the bucket name and print them in errors). Give them with --storage-option key=... "
            "--storage-option secret=... or the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables"
        )


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
        out = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", out)
        return _BARE_USERINFO.sub(f"{MASK}@", out)

    def contains_secret(self, text: str) -> bool:
        return any(secret in text for secret in self._secrets)

    def describe(self, exc: BaseException) -> str:
        """`Type: message` of an exception, scrubbed."""
        message = str(exc) or exc.__class__.__name__
        return self(f"{type(exc).__name__}: {message}")
