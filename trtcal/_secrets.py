"""What a credential is, and keeping credentials out of URLs, messages, logs and job metadata (one place).

* `is_credential_name(name)`: a storage option, env variable or query parameter name whose value is
  a secret (`key`, `secret`, `token`, `password`, `session`, `credential`, `sas`, `signature`, …).
* `SECRET_ENV`: the environment variables that hold credentials (AWS, GCS, Azure, Ray's token).
* `redact_url`, `secret_values`, `Scrubber`: masking them wherever text leaves trtcal.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "redact_url",
    "Scrubber",
    "secret_values",
    "is_credential_name",
    "credential_options",
    "credential_words",
    "refuse_url_credentials",
    "SECRET_ENV",
    "FORWARDED_ENV",
    "driver_env",
    "forwarded_env",
    "MASK",
]

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
# What a driver hands to its Ray tasks and actor: the storage credentials of SECRET_ENV (not Ray's own
# token) and where they apply. They travel as task arguments, never in a Ray runtime env: Ray 2.60's
# runtime env agent writes every runtime env, env_vars values included, to runtime_env_agent.log.
FORWARDED_ENV = (
    *(name for name in SECRET_ENV if name != "RAY_AUTH_TOKEN"),
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
# Words that make any name a credential's (job metadata is refused on these: it is listed to anyone).
_CREDENTIAL_WORDS = ("secret", "password", "token", "session", "credential", "access_key", "key_id", "private")
_SECRET_QUERY = re.compile(r"signature|credential|token|sig|key|secret|password", re.IGNORECASE)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# `user:password@host` without its scheme, as S3 clients echo an s3://AK:SECRET@bucket "bucket name".
_BARE_USERINFO = re.compile(r"(?<![\w.~%+-])[\w.~%+-]+:[^\s/@\"'<>]+@(?=[\w.-])")
_OPTION_NAME = re.compile(r"[A-Za-z_][\w.-]*")
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


def driver_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The FORWARDED_ENV variables set in this (the driver's) environment."""
    env = os.environ if environ is None else environ
    return {name: env[name] for name in FORWARDED_ENV if env.get(name)}


@contextlib.contextmanager
def forwarded_env(env: Mapping[str, str]) -> Iterator[None]:
    """Run a task body with the driver's credentials (`driver_env()`) in the worker's environment, then
    put back what was there. On the driver's own node this changes nothing."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def is_credential_name(name: str) -> bool:
    """Whether a value under this name (storage option, env variable) is a secret."""
    if name in _NOT_SECRET_OPTION:
        return False
    lowered = name.lower().replace("-", "_")
    return bool(_SECRET_OPTION.search(name)) or any(word in lowered for word in _CREDENTIAL_WORDS)


def credential_options(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the credential values in parsed storage options (nested and JSON-decoded ones too),
    e.g. `["client_kwargs.aws_secret_access_key"]`. Names only: never a value."""
    found: list[str] = []
    for name, value in options.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, Mapping):
            found += credential_options(value, f"{dotted}.")
        elif isinstance(value, str) and value and is_credential_name(str(name)):
            found.append(dotted)
    return found


def credential_words(words: Iterable[str]) -> list[str]:
    """What in a command line carries a credential, whatever the spelling of its flags.

    A word `NAME=VALUE` (also after a flag's own `=`: `--storage-opt=secret=…`) is one when a dotted
    part of NAME names a credential or VALUE is JSON holding one (`client_kwargs={"aws_secret_access_key": …}`);
    a URL with a password in it is one too. Returns what to name in an error (names, never values).
    """
    found: list[str] = []
    for word in words:
        text = str(word)
        userinfo = _USERINFO.search(text)
        if userinfo and ":" in userinfo.group("userinfo"):
            found.append(f"a URL with a password ({redact_url(text)})")
            continue
        candidates = [text]
        if text.startswith("-") and "=" in text:
            candidates.append(text.split("=", 1)[1])
        for candidate in candidates:
            name, sep, raw = candidate.partition("=")
            if not sep or not _OPTION_NAME.fullmatch(name):  # paths and URLs are not option names
                continue
            if any(is_credential_name(part) for part in name.split(".") if part) and raw:
                found.append(name)
            elif raw[:1] in ("{", "["):
                found += [f"{name}.{inner}" for inner in _json_credentials(raw)]
    return list(dict.fromkeys(found))


def _json_credentials(raw: str) -> list[str]:
    import json

    try:
        value = json.loads(raw)
    except ValueError:
        # Not JSON: the receiving parser refuses it, but it may still be shown as job metadata.
        return ["(a value that is not valid JSON)"] if _SECRET_OPTION.search(raw) or any(
            w in raw.lower() for w in _CREDENTIAL_WORDS
        ) else []
    if isinstance(value, list):
        return [name for item in value if isinstance(item, Mapping) for name in credential_options(item)]
    return credential_options(value) if isinstance(value, Mapping) else []


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
