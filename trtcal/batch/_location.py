"""Where a batch lives: a local path, or any fsspec URL (fsspec imported lazily)."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Mapping
from typing import Any

from trtcal.errors import StorageError

# Object stores make a single PUT visible whole; other remote filesystems get a temp name + move.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"})

def _resolve(path_or_url: str | os.PathLike[str], filesystem: Any, storage_options: Mapping[str, Any]) -> tuple[Any, str, bool]:
    """(filesystem, path on it, is_local)."""
    if filesystem is not None:
        from fsspec.implementations.local import LocalFileSystem

        path = os.fspath(path_or_url)
        return filesystem, filesystem._strip_protocol(path), isinstance(filesystem, LocalFileSystem)
    text = os.fspath(path_or_url)
    if "://" not in text:
        return None, os.path.abspath(text), True
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    try:
        fs, path = fsspec.core.url_to_fs(text, **storage_options)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {text!r}: {exc}", url=text) from exc
    return fs, path, isinstance(fs, LocalFileSystem)


def _protocols(fs: Any) -> set[str]:
    proto = fs.protocol
    return set(proto) if isinstance(proto, (tuple, list)) else {proto}


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Target:
    """Where a batch is published; gives a local temp file to write, then publishes it atomically."""

    def __init__(self, path_or_url: str | os.PathLike[str], filesystem: Any, storage_options: Mapping[str, Any]):
        self.url = os.fspath(path_or_url)
        self.fs, self.path, self.local = _resolve(path_or_url, filesystem, storage_options)
        token = uuid.uuid4().hex[:12]
        if self.local:
            directory = os.path.dirname(self.path) or "."
            if not os.path.isdir(directory):
                raise StorageError(f"directory {directory!r} does not exist; create it first", url=self.url)
            self.local_dir = directory
            self.tmp_path = os.path.join(directory, f".{os.path.basename(self.path)}.tmp-{token}")
        else:
            self.local_dir = tempfile.gettempdir()
            self.tmp_path = os.path.join(self.local_dir, f"trtcal-batch-{token}.arrow")

    def publish(self) -> int:
        size = os.path.getsize(self.tmp_path)
        try:
            if self.local:
                os.replace(self.tmp_path, self.path)
                _fsync_dir(os.path.dirname(self.path) or ".")
            elif _protocols(self.fs) & _ATOMIC_PUT_PROTOCOLS:
                self.fs.put_file(self.tmp_path, self.path)
            else:
                remote_tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
                self.fs.put_file(self.tmp_path, remote_tmp)
                self.fs.mv(remote_tmp, self.path)
        except OSError as exc:
            raise StorageError(f"cannot publish calibration batch to {self.url!r}: {exc}", url=self.url) from exc
        finally:
            self.discard()
        return size

    def discard(self) -> None:
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass
