""".npy and .npz files as memory-mapped arrays (`_FileMapping`), so that reading a calibration set never holds
it whole.

A `.npy` file is mapped as is. An `.npz` is a zip archive of `.npy` members: a member stored
without compression whose data is aligned for its dtype is mapped in place (offset of its data in
the archive); any other member (deflated by `np.savez_compressed`, or misaligned) is decompressed
in 1 MiB chunks into an unlinked temporary file that is then mapped (disk, not memory, holds it).
Pages are handed back to the OS after use (`_FileMapping.release`), so the resident set stays about
one micro-batch whatever the number of rows.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from trtcal.errors import DataError

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip local file header (30 bytes)
_COPY_CHUNK = 1 << 20


class _FileMapping:
    """A read-only memory map of a local file; can hand its pages back to the OS after use.

    Released pages are file-backed, so touching them again just re-reads them (from the page
    cache): releasing keeps the resident set flat while a batch is streamed, it never loses data.
    """

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise DataError(f"calibration batch {path!r} is an empty file")
            self.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        self.base = int(np.frombuffer(self.mmap, dtype=np.uint8, count=1).ctypes.data)

    def release(self, arr: npt.NDArray[Any]) -> None:
        if not hasattr(mmap, "MADV_DONTNEED") or arr.size == 0:
            return
        start = int(arr.ctypes.data) - self.base
        end = start + arr.nbytes
        if start < 0 or end > self.size:
            return  # not ours (a copy)
        page = mmap.PAGESIZE
        start -= start % page
        try:
            self.mmap.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):  # pragma: no cover - platform without madvise
            pass

    def close(self) -> None:
        try:
            self.mmap.close()
        except BufferError:
            # Views handed out are still alive; the map is unmapped when the last one goes.
            pass


class Mappings:
    """Several file mappings behind `_FileMapping`'s interface (release, close)."""

    def __init__(self, mappings: Iterable[_FileMapping]) -> None:
        self.mappings = list(mappings)

    def release(self, arr: npt.NDArray[Any]) -> None:
        for mapping in self.mappings:
            mapping.release(arr)  # a mapping ignores arrays outside it

    def close(self) -> None:
        for mapping in self.mappings:
            mapping.close()


def npy_header(stream: Any, path: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, fortran order, dtype) from an .npy header; DataError naming `path` if it is not one."""
    try:
        major, _minor = np.lib.format.read_magic(stream)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise DataError(f"{path} is not a valid .npy file ({exc})") from None
    if dtype.hasobject:
        raise DataError(f"{path} holds Python objects; calibration data must be a numeric array")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def array_at(mapping: _FileMapping, offset: int, path: str, end: int | None = None) -> npt.NDArray[Any]:
    """The .npy array whose header starts at `offset` of the mapped file (and ends by `end`), as a view."""
    stream = io.BytesIO(mapping.mmap[offset : offset + 65536])
    shape, fortran, dtype = npy_header(stream, path)
    start = offset + stream.tell()
    count = math.prod(shape)  # Python ints: no int64 wrap-around on hostile headers
    if start + count * dtype.itemsize > (mapping.size if end is None else end):
        raise DataError(f"{path} is truncated: its header promises {list(shape)} {dtype} but the file is shorter")
    if count == 0 or any(d > np.iinfo(np.intp).max for d in shape):
        raise DataError(f"{path} holds no rows with values (shape {list(shape)}); calibration needs at least one sample")
    arr = np.frombuffer(mapping.mmap, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def map_npy(path: str) -> tuple[_FileMapping, npt.NDArray[Any]]:
    """A .npy file, memory-mapped: (its mapping, the array as a read-only view of it)."""
    mapping = _FileMapping(path)
    try:
        return mapping, array_at(mapping, 0, path)
    except BaseException:
        mapping.close()
        raise


def _stored_data_offset(archive: _FileMapping, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start in the archive (after its local header)."""
    header = archive.mmap[info.header_offset : info.header_offset + _LOCAL_HEADER.size]
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != b"PK\x03\x04":
        raise DataError(f"member {info.filename!r} has no valid local header")
    return int(info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1])


def _aligned(mapping: _FileMapping, offset: int, path: str) -> bool:
    stream = io.BytesIO(mapping.mmap[offset : offset + 65536])
    _, _, dtype = npy_header(stream, path)
    return (mapping.base + offset + stream.tell()) % max(dtype.alignment, 1) == 0


def _extracted(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _FileMapping:
    """A member decompressed chunk by chunk into an unlinked temp file, mapped."""
    fd, tmp = tempfile.mkstemp(prefix="trtcal-npz-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as out, zf.open(info) as member:
            shutil.copyfileobj(member, out, _COPY_CHUNK)
        return _FileMapping(tmp)
    finally:
        os.unlink(tmp)


def map_npz(path: str, ids_member: str) -> tuple[dict[str, npt.NDArray[Any]], npt.NDArray[Any] | None, Mappings]:
    """An .npz's arrays as views of file mappings: (arrays by member name, the `ids_member` array read
    whole or None, the mappings to release pages to and close).

    Raises:
        DataError: not a zip of .npy members, object arrays, truncated or empty members.
        zipfile.BadZipFile / OSError: the caller's to turn into its message.
    """
    archive = _FileMapping(path)
    mappings = Mappings([archive])
    arrays: dict[str, npt.NDArray[Any]] = {}
    ids = None
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise DataError(f"{path}: member {info.filename!r} is not an .npy array")
                name = info.filename[: -len(".npy")]
                where = f"{path} (member {info.filename!r})"
                if name == ids_member:  # a small string array: read whole
                    with zf.open(info) as member:
                        ids = np.lib.format.read_array(member, allow_pickle=False)
                    continue
                if info.compress_type == zipfile.ZIP_STORED:
                    offset = _stored_data_offset(archive, info)
                    if _aligned(archive, offset, where):
                        arrays[name] = array_at(archive, offset, where, offset + info.file_size)
                        continue
                extracted = _extracted(zf, info)
                mappings.mappings.append(extracted)
                arrays[name] = array_at(extracted, 0, where)
    except BaseException:
        mappings.close()
        raise
    return arrays, ids, mappings
