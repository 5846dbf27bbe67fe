"""Local files that readers see whole or not at all, and bytes read from any fsspec URL.

* `write_atomic(path, data)`: a temp file beside the target, fsync, one rename over the target.
* `publish_dir(target, files, owned_by=...)`: a directory of files, built beside the target and
  renamed into place (commit) or removed (discard) — an earlier trtcal output there is replaced,
  any other non-empty directory is refused before anything is written.
* `read_url_bytes(url, storage_options)`: a local path, ``file://`` or any fsspec URL, read whole.

(The store's backends keep their own writers: they need link-based no-replace semantics.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from trtcal.errors import ConfigError

__all__ = ["write_atomic", "publish_dir", "check_output_dir", "read_url_bytes", "fsync_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's new entries durable (a rename is not, until its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write a file so that readers see the old file or the whole new one, never a part of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        _write_synced(Path(tmp), data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def check_output_dir(target: Path, owned_by: Iterable[str], what: str = "output directory") -> None:
    """Refuse early (before any computing) to replace a directory that is not a trtcal output.

    A non-empty directory is trtcal's when it holds one of the `owned_by` file names.
    """
    if not target.exists():
        return
    if not target.is_dir():
        raise ConfigError(f"{what} {str(target)!r} exists and is not a directory")
    entries = {p.name for p in target.iterdir()}
    markers = tuple(owned_by)
    if entries and not entries & set(markers):
        raise ConfigError(
            f"{what} {str(target)!r} is not empty and holds no trtcal {' or '.join(markers)}; "
            "choose a new or empty directory (trtcal only replaces its own earlier output)"
        )


def publish_dir(target: Path, files: Mapping[str, bytes], *, owned_by: Iterable[str]) -> dict[str, Path]:
    """Write `files` into a temp dir beside `target`, then rename it into place (one commit).

    An earlier output at `target` (see `check_output_dir`) is moved aside first and put back if the
    commit fails; on any error the temp dir is discarded, so `target` is never half-written.
    Returns name -> path.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    check_output_dir(target, owned_by)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    old: Path | None = None
    try:
        for name, data in files.items():
            _write_synced(tmp / name, data)
        os.chmod(tmp, 0o755)
        if target.exists():
            if any(target.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
                os.rename(target, old / "previous")
            else:
                target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.rename(old / "previous", target)  # put the earlier output back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(parent)
    return {name: target / name for name in files}


def read_url_bytes(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The bytes at a local path, a ``file://`` URL or any fsspec URL (OSError subclasses on failure)."""
    text = os.fspath(url)
    if "://" in text and not text.startswith("file://"):
        import fsspec

        with fsspec.open(text, "rb", **dict(storage_options or {})) as f:
            return bytes(f.read())
    return Path(text.removeprefix("file://")).read_bytes()
