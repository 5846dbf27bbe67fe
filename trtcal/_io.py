"""Local files that readers see whole or not at all, and bytes read from any fsspec URL.

* `write_atomic(path, data)`: a temp file beside the target, fsync, one rename over the target.
* `publish_dir(target, files, owned_by=...)`: trtcal's files written into a directory one by one,
  each atomically, the manifest last; only trtcal's own names are touched (the user's files and
  evaluation.json stay); any other non-empty directory is refused before anything is written,
  unless `force`.
* `read_url_bytes(url, storage_options)`: a local path, ``file://`` or any fsspec URL, read whole.

(The store's backends keep their own writers: they need link-based no-replace semantics.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from trtcal.errors import ConfigError

__all__ = ["sha256_file", "write_atomic", "publish_dir", "check_output_dir", "read_url_bytes", "fsync_dir", "owned_temp_dir", "sweep_stale_temp_dirs"]

# Temp dirs `trtcal-<kind>-<random>` holding an owner file with their pid: a run killed with SIGKILL
# cannot remove them, so the next run removes those whose process is gone and that no live process names (Ray's own
# processes of a killed run outlive it by a minute or two and are left alone until they exit).
_OWNED_TEMP = re.compile(r"trtcal-(ray|job|actor|smooth)-[A-Za-z0-9_]+")
_OWNER_FILE = ".trtcal-owner"  # the pid that made the dir (not in the name: Ray's socket paths must stay short)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks (pinned downloads, cached models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """Write a file so that readers see the old file or the whole new one, never a part of it.

    A temporary file beside the target, fsync, one rename over the target. The file gets the mode
    any new file gets (0666 less the umask), not mkstemp's private 0600: models, reports and
    caches are written for others to read.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def check_output_dir(target: Path, owned_by: Iterable[str], what: str = "output directory", *, force: bool = False) -> None:
    """Refuse early (before any computing) to write into a directory that is not a trtcal output.

    A non-empty directory is trtcal's when it holds one of the `owned_by` file names; `force`
    accepts any directory (trtcal still only writes its own file names there).
    """
    if not target.exists():
        return
    if not target.is_dir():
        raise ConfigError(f"{what} {str(target)!r} exists and is not a directory")
    entries = {p.name for p in target.iterdir()}
    markers = tuple(owned_by)
    if entries and not entries & set(markers) and not force:
        raise ConfigError(
            f"{what} {str(target)!r} is not empty and holds no trtcal {' or '.join(markers)}; choose a new or empty "
            "directory, or pass --force to write trtcal's files into it (nothing else there is touched)"
        )


def publish_dir(
    target: Path,
    files: Mapping[str, bytes],
    *,
    owned_by: Iterable[str],
    is_own_name: Callable[[str], bool] | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Write `files` into `target` file by file, each replaced atomically; nothing else there is touched.

    Only trtcal's own names are ever written or removed: the user's files and `trtcal eval`'s
    evaluation.json stay (the whole folder used to be replaced). Order, so that no reader takes a
    mixed set for a complete one: every new file is first written and fsynced beside its final
    name; the old manifest (the first `owned_by` name: it marks a complete set) is removed; the
    files are renamed into place; stale trtcal files of the previous run that this one does not
    write (`is_own_name`, e.g. another method's cache) are removed; the manifest comes last. On any
    error the temp files are removed. Returns name -> path.
    """
    markers = tuple(owned_by)
    created = not target.exists()
    check_output_dir(target, markers, force=force)
    target.mkdir(parents=True, exist_ok=True)
    manifest = markers[0] if markers and markers[0] in files else None
    temps: dict[str, Path] = {}
    try:
        for name, data in files.items():
            if "/" in name or os.sep in name or name in ("", ".", ".."):
                raise ConfigError(f"artifact name {name!r} is not a plain file name")
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target)
            os.close(fd)
            temps[name] = Path(tmp)
            _write_synced(temps[name], data)
            os.chmod(temps[name], 0o666 & ~_umask())
        if manifest is not None:
            (target / manifest).unlink(missing_ok=True)
        for name in [n for n in files if n != manifest] + ([manifest] if manifest is not None else []):
            if name == manifest:
                _remove_stale(target, files, is_own_name)
            os.replace(temps[name], target / name)
            del temps[name]
        if manifest is None:
            _remove_stale(target, files, is_own_name)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()  # a folder this call made stays only with a whole set in it
        raise
    fsync_dir(target)
    return {name: target / name for name in files}


def _remove_stale(target: Path, files: Mapping[str, bytes], is_own_name: Callable[[str], bool] | None) -> None:
    if is_own_name is None:
        return
    for path in target.iterdir():
        if path.name not in files and is_own_name(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (os.umask is process-wide)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def read_url_bytes(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The bytes at a local path, a ``file://`` URL or any fsspec URL (OSError subclasses on failure)."""
    text = os.fspath(url)
    if "://" in text and not text.startswith("file://"):
        import fsspec

        with fsspec.open(text, "rb", **dict(storage_options or {})) as f:
            return bytes(f.read())
    return Path(text.removeprefix("file://")).read_bytes()


def owned_temp_dir(kind: str, dir: str | None = None) -> str:
    """mkdtemp `trtcal-<kind>-…` with an owner file, so a later run can tell whether its owner is gone."""
    path = tempfile.mkdtemp(prefix=f"trtcal-{kind}-", dir=dir)
    with open(os.path.join(path, _OWNER_FILE), "w", encoding="ascii") as f:
        f.write(str(os.getpid()))
    return path


def _owner(path: str) -> int | None:
    try:
        with open(os.path.join(path, _OWNER_FILE), encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _named_by_a_live_process(paths: list[str]) -> set[str]:
    """Those of `paths` that appear in some live process's command line (/proc; none elsewhere)."""
    named: set[str] = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set(paths)  # cannot tell: keep everything
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        named.update(p for p in paths if p in cmdline)
    return named


def sweep_stale_temp_dirs(root: str | None = None) -> list[str]:
    """Remove trtcal temp dirs under `root` (the system temp dir) left by runs that were killed.

    Only `trtcal-(ray|job|actor)-…` dirs whose owner file names a pid that is gone, and that no live
    process names.
    Returns what was removed. Never raises (best effort: it must not fail a run).
    """
    root = root or tempfile.gettempdir()
    try:
        candidates = []
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if _OWNED_TEMP.fullmatch(name) and not os.path.islink(path):
                owner = _owner(path)
                if owner is not None and owner != os.getpid() and not _pid_alive(owner):
                    candidates.append(path)
    except OSError:
        return []
    if not candidates:
        return []
    in_use = _named_by_a_live_process(candidates)
    removed = []
    for path in candidates:
        if path in in_use or os.path.islink(path) or not os.path.isdir(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
