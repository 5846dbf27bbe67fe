"""The calibration batch: the one contract between preprocessing workers and the calibration actor.

A calibration batch is an Arrow IPC *file* holding exactly ONE record batch:

* ``sample_id``: a ``string`` column, unique, sorted ascending by Unicode code point (which is
  the same order as the UTF-8 bytes);
* one ``arrow.fixed_shape_tensor`` column per model input (pyarrow's canonical extension type,
  row-major, no permutation), named after the input; columns follow ``sample_id`` in name order;
* schema metadata: ``trtcal.spec`` (the preprocessing spec as canonical JSON),
  ``trtcal.format_version`` (`trtcal._version.FORMAT_VERSION`), ``trtcal.fingerprint``
  (``sha256:<hex>``, see `compute_fingerprint`).

One record batch makes memory-mapped reads zero-copy (a file of several batches must be
concatenated, i.e. copied). Rows are placed by sample id, never by arrival order, so any number of
workers, in any order, produce the same bytes for the same rows.

Writers: `write_batch` (arrays in memory), `BatchWriter` (row groups arriving in any order,
spooled to local disk, one record batch on `close`). Both publish atomically: a local file is
written under a temporary name in the target directory and renamed into place; a remote one is
written locally, then uploaded (object stores publish a PUT whole; other filesystems get a
temporary name and a move). Readers: `open_batch` (memory-mapped when local, downloaded to an
unlinked local temp file and memory-mapped otherwise), `batch_from_numpy` (.npy/.npz),
`batch_from_arrays`. The fingerprint is verified on open.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import struct
import tempfile
import unicodedata
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal._version import FORMAT_VERSION
from trtcal.errors import ConfigError, DataError, StorageError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "SAMPLE_ID_COLUMN",
    "FINGERPRINT_SCHEME",
    "InputInfo",
    "BatchInfo",
    "CalibrationBatch",
    "BatchWriter",
    "write_batch",
    "open_batch",
    "batch_from_numpy",
    "batch_from_arrays",
    "compute_fingerprint",
    "canonical_spec_json",
    "validate_sample_ids",
]

logger = logging.getLogger(__name__)

SAMPLE_ID_COLUMN = "sample_id"
META_SPEC = b"trtcal.spec"
META_FORMAT_VERSION = b"trtcal.format_version"
META_FINGERPRINT = b"trtcal.fingerprint"
# Tag hashed first; changes only if the hashing procedure itself changes.
FINGERPRINT_SCHEME = "trtcal-batch-sha256-v2"
# Format 2 files hashed the values as one stream (serial); still read and verified.
_FINGERPRINT_SCHEME_V1 = "trtcal-batch-sha256-v1"
_SCHEME_OF_FORMAT = {str(FORMAT_VERSION): FINGERPRINT_SCHEME, "2": _FINGERPRINT_SCHEME_V1}
DIGEST_BYTES = 32
MAX_SAMPLE_ID_BYTES = 1024
# Numeric types that map 1:1 onto Arrow primitives and read back zero-copy (bool is bit-packed).
SUPPORTED_DTYPES = tuple(
    np.dtype(t)
    for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
)
_HASH_CHUNK = 64 << 20  # bytes hashed (and released from a mapping) at a time
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Object stores make a single PUT visible whole; other remote filesystems get a temp name + move.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"})

ArrayMap = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class InputInfo:
    """One tensor column: the per-sample shape (without the row axis) and the element type."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy name, e.g. "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class BatchInfo:
    """What a writer published."""

    path: str
    num_rows: int
    inputs: tuple[InputInfo, ...]
    fingerprint: str
    spec: Mapping[str, Any]
    nbytes: int  # size of the published file


# ---------------------------------------------------------------------------------------------
# Validation and the fingerprint (pure: numpy + stdlib)


def canonical_spec_json(spec: Mapping[str, Any]) -> str:
    """The preprocessing spec as canonical JSON (sorted keys, no whitespace, no NaN)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"spec must be a JSON object (a mapping), got {type(spec).__name__}")
    try:
        return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"spec must be JSON-serialisable with string keys and finite numbers: {exc}") from None


def _check_sample_id(sample_id: object, position: int) -> str:
    if not isinstance(sample_id, str):
        raise DataError(f"sample id at position {position} is a {type(sample_id).__name__}, not a string")
    if not sample_id:
        raise DataError(f"sample id at position {position} is empty; every row needs a non-empty id")
    try:
        encoded = sample_id.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"sample id at position {position} ({sample_id!r:.80}) is not valid Unicode") from None
    if len(encoded) > MAX_SAMPLE_ID_BYTES:
        raise DataError(
            f"sample id at position {position} is {len(encoded)} UTF-8 bytes; the limit is {MAX_SAMPLE_ID_BYTES}"
        )
    for ch in sample_id:
        if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in _BIDI_CONTROLS:
            raise DataError(
                f"sample id at position {position} ({sample_id!r:.80}) holds control character {ch!r}; "
                "ids must be printable (use e.g. the relative path of the source image)"
            )
    return sample_id


def validate_sample_ids(sample_ids: Sequence[str]) -> list[str]:
    """Check every id (non-empty str, printable, <= MAX_SAMPLE_ID_BYTES) and that none repeats."""
    ids = [_check_sample_id(s, i) for i, s in enumerate(sample_ids)]
    seen: set[str] = set()
    for s in ids:
        if s in seen:
            raise DataError(f"sample id {s!r:.80} appears more than once; sample ids must be unique")
        seen.add(s)
    return ids


def _check_array(name: str, array: npt.ArrayLike, num_rows: int | None) -> npt.NDArray[Any]:
    arr = np.asarray(array)
    if arr.dtype not in SUPPORTED_DTYPES:
        raise DataError(
            f"input {name!r} has dtype {arr.dtype}; supported: {', '.join(d.name for d in SUPPORTED_DTYPES)}"
        )
    if arr.ndim < 1:
        raise DataError(f"input {name!r} is a scalar; expected an array with one row per sample")
    if num_rows is not None and arr.shape[0] != num_rows:
        raise DataError(f"input {name!r} has {arr.shape[0]} rows but there are {num_rows} sample ids")
    if 0 in arr.shape[1:]:
        raise DataError(f"input {name!r} has per-sample shape {arr.shape[1:]}, which holds no values")
    return arr


def _check_input_name(name: object) -> str:
    if not isinstance(name, str) or not name or name == SAMPLE_ID_COLUMN or any(c in name for c in "\x00\r\n"):
        raise DataError(f"input name {name!r} cannot be a column of a calibration batch")
    return name


def le_row_bytes(arr: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Each row's values as bytes, C order, little endian: shape [rows, row_bytes] (copies only on
    big-endian machines or for non-contiguous input). What is hashed and what is written."""
    le = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
    return le.reshape(le.shape[0], -1).view(np.uint8)


def _le_bytes_view(arr: npt.NDArray[Any]) -> memoryview:
    """The array's bytes, C order, little endian (copies only on big-endian machines)."""
    return le_row_bytes(arr).reshape(-1).data


def row_digests(rows: npt.NDArray[Any]) -> bytes:
    """sha256 of each row's values (C order, little endian), concatenated: 32 bytes per row.

    Rows are hashed independently, so any process can hash the rows it holds, in parallel."""
    data = le_row_bytes(rows)
    sha256 = hashlib.sha256
    return b"".join(sha256(data[i]).digest() for i in range(data.shape[0]))  # releases the GIL per row


def _hash_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def compute_fingerprint(
    sample_ids: Sequence[str],
    columns: Mapping[str, npt.NDArray[Any]],
    *,
    scheme: str = FINGERPRINT_SCHEME,
    _release: Any = None,
) -> str:
    """sha256 fingerprint of a calibration batch's content, independent of the order rows arrived in.

    Rows are taken in ascending sample-id order (the caller passes them sorted; the file stores them
    so). The digest is sha256 over, in this order:

    1. ``FINGERPRINT_SCHEME`` in UTF-8, then one ``\\n`` byte;
    2. a header: canonical JSON (sorted keys, no whitespace) of
       ``{"num_rows": N, "inputs": [{"name", "shape", "dtype"} ... sorted by name]}``, preceded
       by its byte length as an unsigned 64-bit little-endian integer;
    3. every sample id in order, each as its UTF-8 length (u64 LE) then its UTF-8 bytes;
    4. every input in name order, every row in order: the 32-byte sha256 of that row's values in
       C order, little endian (`row_digests`).

    Part 4 hashes rows independently so that writers and readers hash on all cores (the workers
    that produce rows hash them; `verify` uses threads). Files of format 2 used
    ``trtcal-batch-sha256-v1``, where part 4 is the values themselves as one stream: pass that as
    `scheme` to check them.

    The spec is not hashed: it is metadata kept (and keyed) separately, so identical data written
    with a reworded spec keeps its fingerprint.
    """
    if scheme not in (FINGERPRINT_SCHEME, _FINGERPRINT_SCHEME_V1):
        raise ConfigError(f"unknown fingerprint scheme {scheme!r}")
    names = sorted(columns)
    digest = fingerprint_digest(sample_ids, _inputs_of(columns), scheme=scheme)
    for n in names:
        arr = columns[n]
        if arr.shape[0] != len(sample_ids):
            raise DataError(f"input {n!r} has {arr.shape[0]} rows but there are {len(sample_ids)} sample ids")
        row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
        rows_per_chunk = max(1, _HASH_CHUNK // max(row_bytes, 1))
        parts = [arr[start : start + rows_per_chunk] for start in range(0, arr.shape[0], rows_per_chunk)]
        if scheme == _FINGERPRINT_SCHEME_V1:
            for part in parts:
                digest.update(_le_bytes_view(part))
                if _release is not None:
                    _release(part)
            continue

        def hash_part(part: npt.NDArray[Any]) -> bytes:
            out = row_digests(part)
            if _release is not None:
                _release(part)
            return out

        if len(parts) == 1 or _hash_threads() == 1:
            for part in parts:
                digest.update(hash_part(part))
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(_hash_threads(), thread_name_prefix="trtcal-hash") as pool:
                for out in pool.map(hash_part, parts):  # in order
                    digest.update(out)
    return "sha256:" + digest.hexdigest()


def fingerprint_digest(sample_ids: Sequence[str], inputs: Sequence[InputInfo], *, scheme: str = FINGERPRINT_SCHEME) -> Any:
    """A sha256 object fed with parts 1-3 of the fingerprint (see `compute_fingerprint`); the
    caller feeds part 4 (the row digests) in input-name order."""
    header = {"num_rows": len(sample_ids), "inputs": [i.to_dict() for i in sorted(inputs, key=lambda i: i.name)]}
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    digest = hashlib.sha256()
    digest.update(scheme.encode("utf-8") + b"\n")
    digest.update(struct.pack("<Q", len(header_bytes)) + header_bytes)
    id_chunk: list[bytes] = []
    for s in sample_ids:
        b = s.encode("utf-8")
        id_chunk.append(struct.pack("<Q", len(b)))
        id_chunk.append(b)
        if len(id_chunk) >= 8192:
            digest.update(b"".join(id_chunk))
            id_chunk.clear()
    digest.update(b"".join(id_chunk))
    return digest


# ---------------------------------------------------------------------------------------------
# Paths and publishing (fsspec imported lazily)


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


def _write_ipc_file(
    local_path: str, sample_ids: Sequence[str], columns: Mapping[str, npt.NDArray[Any]], spec_json: str, fingerprint: str
) -> None:
    """One record batch, columns in name order after sample_id, metadata, fsync."""
    import pyarrow as pa

    batch = record_batch(sample_ids, columns, spec_json, fingerprint)
    with open(local_path, "wb") as raw:
        sink = pa.PythonFile(raw, mode="w")
        with pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        raw.flush()
        os.fsync(raw.fileno())


def record_batch(
    sample_ids: Sequence[str], columns: Mapping[str, npt.NDArray[Any]], spec_json: str, fingerprint: str
) -> pa.RecordBatch:
    """The one record batch of a calibration batch file; tensor values are not copied."""
    import pyarrow as pa

    arrays: list[pa.Array] = [pa.array(list(sample_ids), type=pa.string())]
    names = [SAMPLE_ID_COLUMN]
    for name in sorted(columns):
        arr = np.ascontiguousarray(columns[name])
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        value_type = pa.from_numpy_dtype(arr.dtype)
        row_size = int(np.prod(arr.shape[1:], dtype=np.int64))
        values = pa.Array.from_buffers(value_type, arr.size, [None, pa.py_buffer(arr.reshape(-1))])
        storage = pa.FixedSizeListArray.from_arrays(values, row_size)
        tensor_type = pa.fixed_shape_tensor(value_type, list(arr.shape[1:]))
        arrays.append(pa.ExtensionArray.from_storage(tensor_type, storage))
        names.append(name)
    batch = pa.RecordBatch.from_arrays(arrays, names=names)
    metadata = {
        META_SPEC: spec_json.encode("utf-8"),
        META_FORMAT_VERSION: str(FORMAT_VERSION).encode("ascii"),
        META_FINGERPRINT: fingerprint.encode("ascii"),
    }
    return batch.replace_schema_metadata(metadata)


def _inputs_of(columns: Mapping[str, npt.NDArray[Any]]) -> tuple[InputInfo, ...]:
    return tuple(
        InputInfo(name=n, shape=tuple(int(d) for d in columns[n].shape[1:]), dtype=np.dtype(columns[n].dtype).name)
        for n in sorted(columns)
    )


# ---------------------------------------------------------------------------------------------
# Writers


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _as_storage_error(exc: OSError, url: str) -> StorageError:
    """An OSError while writing a batch, as the trtcal error a user can act on."""
    if exc.errno in _DISK_FULL:
        return StorageError(
            f"no space left on the device while writing calibration batch {url!r} ({exc.strerror}); nothing was "
            "published: free space, or write the batch elsewhere (TMPDIR for the spool, another --output/--store)",
            url=url,
        )
    return StorageError(f"cannot write calibration batch {url!r}: {exc}", url=url)


def write_batch(
    path_or_url: str | os.PathLike[str],
    arrays: ArrayMap,
    sample_ids: Sequence[str],
    *,
    spec: Mapping[str, Any],
    filesystem: Any = None,
    **storage_options: Any,
) -> BatchInfo:
    """Write arrays held in memory as one calibration batch, rows sorted by sample id.

    Args:
        path_or_url: local path or fsspec URL of the `.arrow` file to publish.
        arrays: input name -> array of shape ``[num_rows, *sample_shape]``.
        sample_ids: one unique, printable id per row (in the arrays' row order).
        spec: the preprocessing spec (a JSON object) stored in the metadata.
        filesystem: an fsspec filesystem to write on (else derived from the URL).
        **storage_options: passed to fsspec for URLs.

    Raises:
        DataError: no rows, duplicate/empty/hostile ids, rows or dtypes that do not fit.
        ConfigError: spec is not JSON.  StorageError: the file cannot be published.
    """
    spec_json = canonical_spec_json(spec)
    ids = validate_sample_ids(sample_ids)
    if not ids:
        raise DataError("a calibration batch needs at least one row; got no sample ids")
    if not arrays:
        raise DataError("a calibration batch needs at least one input array")
    columns = {_check_input_name(n): _check_array(n, a, len(ids)) for n, a in arrays.items()}
    order = sorted(range(len(ids)), key=ids.__getitem__)
    if order != list(range(len(ids))):
        index = np.asarray(order, dtype=np.intp)
        columns = {n: np.take(a, index, axis=0) for n, a in columns.items()}
        ids = [ids[i] for i in order]
    fingerprint = compute_fingerprint(ids, columns)
    target = _Target(path_or_url, filesystem, storage_options)
    try:
        _write_ipc_file(target.tmp_path, ids, columns, spec_json, fingerprint)
        nbytes = target.publish()
    except OSError as exc:
        target.discard()
        raise _as_storage_error(exc, target.url) from exc
    except BaseException:
        target.discard()
        raise
    logger.info("wrote calibration batch %s: %d rows, %s", target.url, len(ids), fingerprint)
    return BatchInfo(
        path=target.url, num_rows=len(ids), inputs=_inputs_of(columns), fingerprint=fingerprint,
        spec=json.loads(spec_json), nbytes=nbytes,
    )


class BatchWriter:
    """Collects row groups arriving in any order; `close()` publishes ONE record batch sorted by id.

    Rows are spooled to local disk (one raw file per input), so memory stays bounded whatever the
    batch size; `close()` gathers them in sample-id order into memory-mapped buffers and writes the
    Arrow file from those. The first `write` fixes the inputs, per-sample shapes and dtypes.

    Use as a context manager: leaving the block normally closes (publishes), an exception aborts
    (nothing is published, the spool is removed).

    Example:
        >>> with BatchWriter("calib.arrow", spec={"preset": "imagenet"}) as writer:  # doctest: +SKIP
        ...     writer.write({"input": chunk_b}, ["img-3", "img-4"])
        ...     writer.write({"input": chunk_a}, ["img-1", "img-2"])
        >>> writer.info.fingerprint  # doctest: +SKIP
    """

    def __init__(
        self,
        path_or_url: str | os.PathLike[str],
        *,
        spec: Mapping[str, Any],
        filesystem: Any = None,
        spool_dir: str | os.PathLike[str] | None = None,
        **storage_options: Any,
    ) -> None:
        self._spec_json = canonical_spec_json(spec)
        self._target = _Target(path_or_url, filesystem, storage_options)
        parent = os.fspath(spool_dir) if spool_dir is not None else self._target.local_dir
        self._spool = tempfile.mkdtemp(prefix=".trtcal-spool-", dir=parent)
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._inputs: tuple[InputInfo, ...] | None = None
        self._files: dict[str, Any] = {}
        self._state = "open"
        self.info: BatchInfo | None = None

    @property
    def num_rows(self) -> int:
        return len(self._ids)

    def write(self, arrays: ArrayMap, sample_ids: Sequence[str]) -> None:
        """Append rows (any order relative to other calls). Ids must be unique across all calls."""
        if self._state != "open":
            raise ConfigError(f"BatchWriter for {self._target.url!r} is {self._state}; create a new one")
        ids = validate_sample_ids(sample_ids)
        if not ids:
            return
        columns = {_check_input_name(n): _check_array(n, a, len(ids)) for n, a in arrays.items()}
        inputs = _inputs_of(columns)
        if self._inputs is None:
            if not inputs:
                raise DataError("a calibration batch needs at least one input array")
            self._inputs = inputs
            for info in inputs:
                self._files[info.name] = open(os.path.join(self._spool, f"{len(self._files)}.bin"), "wb")  # noqa: SIM115
        elif inputs != self._inputs:
            raise DataError(
                f"rows do not match the batch's inputs: expected {[i.to_dict() for i in self._inputs]}, "
                f"got {[i.to_dict() for i in inputs]}"
            )
        for s in ids:
            if s in self._seen:
                raise DataError(f"sample id {s!r:.80} was already written; sample ids must be unique")
        for info in self._inputs:
            try:
                self._files[info.name].write(_le_bytes_view(columns[info.name]))
            except OSError as exc:
                raise _as_storage_error(exc, self._target.url) from exc
        self._seen.update(ids)
        self._ids.extend(ids)

    def close(self) -> BatchInfo:
        """Sort the spooled rows by sample id, write one record batch, publish atomically."""
        if self._state == "closed" and self.info is not None:
            return self.info
        if self._state != "open":
            raise ConfigError(f"BatchWriter for {self._target.url!r} is {self._state}")
        try:
            if not self._ids or self._inputs is None:
                raise DataError(f"no rows were written to {self._target.url!r}; a calibration batch needs at least one")
            for f in self._files.values():
                f.close()
            n = len(self._ids)
            order = np.asarray(sorted(range(n), key=self._ids.__getitem__), dtype=np.intp)
            ids_sorted = [self._ids[i] for i in order]
            sorted_columns: dict[str, npt.NDArray[Any]] = {}
            for k, info in enumerate(self._inputs):
                dtype = np.dtype(info.dtype).newbyteorder("<")
                shape = (n, *info.shape)
                spooled = np.memmap(self._files[info.name].name, dtype=dtype, mode="r", shape=shape)
                out = np.memmap(os.path.join(self._spool, f"{k}.sorted"), dtype=dtype, mode="w+", shape=shape)
                row_bytes = max(1, int(np.prod(info.shape, dtype=np.int64)) * dtype.itemsize)
                step = max(1, _HASH_CHUNK // row_bytes)
                for start in range(0, n, step):
                    out[start : start + step] = spooled[order[start : start + step]]
                del spooled
                sorted_columns[info.name] = out
            fingerprint = compute_fingerprint(ids_sorted, sorted_columns)
            _write_ipc_file(self._target.tmp_path, ids_sorted, sorted_columns, self._spec_json, fingerprint)
            del sorted_columns
            nbytes = self._target.publish()
        except OSError as exc:
            self.abort()
            raise _as_storage_error(exc, self._target.url) from exc
        except BaseException:
            self.abort()
            raise
        self._cleanup()
        self._state = "closed"
        self.info = BatchInfo(
            path=self._target.url, num_rows=len(self._ids), inputs=self._inputs, fingerprint=fingerprint,
            spec=json.loads(self._spec_json), nbytes=nbytes,
        )
        logger.info("wrote calibration batch %s: %d rows, %s", self._target.url, len(self._ids), fingerprint)
        return self.info

    def abort(self) -> None:
        """Drop everything written so far; nothing is published."""
        self._target.discard()
        self._cleanup()
        self._state = "aborted"

    def _cleanup(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self._spool, ignore_errors=True)

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()


# ---------------------------------------------------------------------------------------------
# Readers


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


def _readonly(view: npt.NDArray[Any]) -> npt.NDArray[Any]:
    view = view.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True)
class _Rows:
    start: int
    stop: int


class CalibrationBatch:
    """A calibration batch (or a contiguous slice of one) as read-only numpy views.

    Attributes:
        num_rows, input_names (sorted), inputs (name -> InputInfo), fingerprint (of the whole
        batch, also on slices), spec, sample_ids (of this slice), source, row_range (within the
        whole batch).
    """

    def __init__(
        self,
        *,
        columns: Mapping[str, npt.NDArray[Any]],
        sample_ids: Sequence[str],
        fingerprint: str,
        spec: Mapping[str, Any],
        source: str,
        mapping: _FileMapping | None = None,
        keepalive: Any = None,
        rows: _Rows | None = None,
        fingerprint_scheme: str = FINGERPRINT_SCHEME,
    ) -> None:
        self._columns = dict(columns)
        self._fingerprint_scheme = fingerprint_scheme
        self._all_ids = sample_ids
        self.fingerprint = fingerprint
        self.spec: Mapping[str, Any] = spec
        self.source = source
        self._mapping = mapping
        self._keepalive = keepalive
        total = len(sample_ids)
        self._rows = rows if rows is not None else _Rows(0, total)

    # -- description
    @property
    def num_rows(self) -> int:
        return self._rows.stop - self._rows.start

    @property
    def total_rows(self) -> int:
        """Rows of the whole batch this one is (a slice of)."""
        return len(self._all_ids)

    @property
    def row_range(self) -> tuple[int, int]:
        return (self._rows.start, self._rows.stop)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._columns))

    @property
    def inputs(self) -> dict[str, InputInfo]:
        return {i.name: i for i in _inputs_of(self._columns)}

    @property
    def sample_ids(self) -> list[str]:
        return list(self._all_ids[self._rows.start : self._rows.stop])

    @property
    def nbytes(self) -> int:
        return sum(int(a[self._rows.start : self._rows.stop].nbytes) for a in self._columns.values())

    def __repr__(self) -> str:
        return (
            f"CalibrationBatch(source={self.source!r}, rows={self.row_range}, inputs="
            f"{[i.to_dict() for i in self.inputs.values()]}, fingerprint={self.fingerprint!r})"
        )

    # -- data
    def array(self, name: str) -> npt.NDArray[Any]:
        """All rows of one input as a read-only ``[num_rows, *shape]`` view."""
        try:
            arr = self._columns[name]
        except KeyError:
            raise DataError(f"the batch has no input {name!r}; it holds {list(self.input_names)}") from None
        return _readonly(arr[self._rows.start : self._rows.stop])

    def rows(self, start: int, stop: int) -> dict[str, npt.NDArray[Any]]:
        """Rows [start, stop) of this batch (relative), every input, as views."""
        start, stop = self._check_range(start, stop)
        base = self._rows.start
        return {n: _readonly(a[base + start : base + stop]) for n, a in sorted(self._columns.items())}

    def release(self, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
        """Hint that these views are done with: file-backed pages go back to the OS (data kept)."""
        if self._mapping is not None:
            for a in arrays.values():
                self._mapping.release(a)

    def iter_micro_batches(
        self, size: int, *, start: int = 0, stop: int | None = None, release: bool = True
    ) -> Iterator[dict[str, npt.NDArray[Any]]]:
        """Consecutive micro-batches of at most `size` rows over rows [start, stop) of this batch.

        With `release`, the pages of a micro-batch are handed back once the next one is requested,
        so the resident set holds about one micro-batch of input whatever the batch size.
        """
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"micro-batch size must be an integer >= 1, got {size!r}")
        start, stop = self._check_range(start, self.num_rows if stop is None else stop)
        for lo in range(start, stop, size):
            chunk = self.rows(lo, min(lo + size, stop))
            yield chunk
            if release:
                self.release(chunk)

    def slice(self, start: int, stop: int) -> CalibrationBatch:
        """Rows [start, stop) as a batch sharing memory (for data-parallel shards)."""
        start, stop = self._check_range(start, stop)
        return CalibrationBatch(
            columns=self._columns, sample_ids=self._all_ids, fingerprint=self.fingerprint, spec=self.spec,
            source=self.source, mapping=self._mapping, keepalive=self._keepalive,
            rows=_Rows(self._rows.start + start, self._rows.start + stop), fingerprint_scheme=self._fingerprint_scheme,
        )

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        if not (0 <= start <= stop <= self.num_rows):
            raise ConfigError(f"row range [{start}, {stop}) is outside the batch's {self.num_rows} rows")
        return int(start), int(stop)

    def verify(self) -> None:
        """Recompute the fingerprint of the whole batch; DataError if it does not match."""
        actual = compute_fingerprint(
            self._all_ids, self._columns, scheme=self._fingerprint_scheme,
            _release=self._mapping.release if self._mapping else None,
        )
        if actual != self.fingerprint:
            raise DataError(
                f"calibration batch {self.source!r} is corrupt or was modified after writing: its metadata "
                f"says fingerprint {self.fingerprint} but the content hashes to {actual}. Write it again "
                "(trtcal.workers.batch_format.write_batch or BatchWriter)"
            )

    def close(self) -> None:
        self._columns = {}
        if self._mapping is not None:
            self._mapping.close()

    def __enter__(self) -> CalibrationBatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _tensor_column(source: str, name: str, column: pa.Array) -> npt.NDArray[Any]:
    import pyarrow as pa

    if not isinstance(column.type, pa.FixedShapeTensorType):
        raise DataError(
            f"{source}: column {name!r} is {column.type}, not an arrow.fixed_shape_tensor; every column "
            f"but {SAMPLE_ID_COLUMN!r} must hold one model input"
        )
    permutation = column.type.permutation
    if permutation is not None and list(permutation) != list(range(len(column.type.shape))):
        raise DataError(f"{source}: column {name!r} has permutation {permutation}; only row-major tensors are supported")
    if column.null_count:
        raise DataError(f"{source}: column {name!r} holds {column.null_count} null rows")
    dtype = column.type.value_type.to_pandas_dtype()
    if np.dtype(dtype) not in SUPPORTED_DTYPES:
        raise DataError(f"{source}: column {name!r} holds {column.type.value_type}, which is not a supported dtype")
    if column.storage.values.null_count:
        raise DataError(f"{source}: column {name!r} holds null values inside tensors")
    shape = tuple(int(d) for d in column.type.shape)
    if len(column) == 0:
        return np.empty((0, *shape), dtype=dtype)
    values: npt.NDArray[Any] = column.to_numpy_ndarray()
    return values.reshape(len(column), *shape)


def _batch_from_ipc(buffer: Any, source: str, mapping: _FileMapping | None, verify: bool) -> CalibrationBatch:
    import pyarrow as pa

    try:
        return _checked_batch_from_ipc(buffer, source, mapping, verify)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        # A damaged file surfaces from pyarrow as ArrowInvalid/OSError ("Invalid flatbuffers message",
        # "Read out of bounds") or as undecodable metadata: all the same problem for the user.
        raise DataError(
            f"{source} is not a readable calibration batch ({type(exc).__name__}: {str(exc)[:200]}); the file is damaged "
            "or was not written by trtcal: rebuild it (trtcal batch build) or fetch it again"
        ) from None


def _checked_batch_from_ipc(buffer: Any, source: str, mapping: _FileMapping | None, verify: bool) -> CalibrationBatch:
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(pa.BufferReader(buffer))
    except pa.ArrowInvalid as exc:
        raise DataError(f"{source} is not an Arrow IPC file ({exc}); write batches with trtcal's BatchWriter") from None
    if reader.num_record_batches != 1:
        raise DataError(
            f"{source} holds {reader.num_record_batches} record batches; a calibration batch must hold exactly "
            "one (that is what makes memory-mapped reads zero-copy). Rewrite it with BatchWriter"
        )
    metadata = reader.schema.metadata or {}
    missing = [k.decode() for k in (META_SPEC, META_FORMAT_VERSION, META_FINGERPRINT) if k not in metadata]
    if missing:
        raise DataError(f"{source} lacks the schema metadata {missing}; it was not written by trtcal's batch writer")
    version = metadata[META_FORMAT_VERSION].decode("ascii", "replace")
    if version not in _SCHEME_OF_FORMAT:
        raise DataError(
            f"{source} has trtcal format version {version!r}; this trtcal reads {sorted(_SCHEME_OF_FORMAT)}: "
            "rebuild the batch with this trtcal (trtcal batch build)"
        )
    try:
        spec = json.loads(metadata[META_SPEC].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{source}: the spec metadata is not JSON ({exc})") from None
    fingerprint = metadata[META_FINGERPRINT].decode("ascii", "replace")
    try:
        batch = reader.get_batch(0)
        # Full validation bounds every offset before anything dereferences it: one flipped byte in a
        # string offset would otherwise read outside the mapping (SIGSEGV), not raise.
        batch.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{source}: the record batch is unreadable ({exc})") from None
    names = batch.schema.names
    if not names or names[0] != SAMPLE_ID_COLUMN or not pa.types.is_string(batch.schema.field(0).type):
        raise DataError(f"{source}: the first column must be {SAMPLE_ID_COLUMN!r} of type string, got {names[:1]}")
    if len(set(names)) != len(names):
        raise DataError(f"{source}: duplicate column names {names}")
    id_column = batch.column(0)
    if id_column.null_count:
        raise DataError(f"{source}: {SAMPLE_ID_COLUMN!r} holds {id_column.null_count} nulls")
    sample_ids = validate_sample_ids(id_column.to_pylist())
    for i in range(1, len(sample_ids)):
        if not sample_ids[i - 1] < sample_ids[i]:
            raise DataError(
                f"{source}: sample ids are not sorted ascending ({sample_ids[i - 1]!r:.60} before "
                f"{sample_ids[i]!r:.60}); rewrite the batch with trtcal's writer"
            )
    columns = {name: _tensor_column(source, name, batch.column(k)) for k, name in enumerate(names) if k > 0}
    if not columns:
        raise DataError(f"{source}: no input columns besides {SAMPLE_ID_COLUMN!r}")
    result = CalibrationBatch(
        columns=columns, sample_ids=sample_ids, fingerprint=fingerprint, spec=spec, source=source,
        mapping=mapping, keepalive=(buffer, batch), fingerprint_scheme=_SCHEME_OF_FORMAT[version],
    )
    if verify:
        result.verify()
    return result


def open_batch(
    path_or_url: str | os.PathLike[str], *, verify: bool = True, filesystem: Any = None, **storage_options: Any
) -> CalibrationBatch:
    """Open a calibration batch: memory-mapped and zero-copy when local; via fsspec otherwise.

    A remote file is downloaded to a local temp file that is unlinked right after mapping it (the
    mapping keeps it alive; nothing is left behind). The fingerprint is checked unless `verify` is
    False.

    Raises:
        DataError: not a calibration batch (several record batches, missing metadata, unsorted or
            bad ids, non-tensor columns, nulls) or fingerprint mismatch.
        StorageError: the file cannot be read.
    """
    url = os.fspath(path_or_url)
    fs, path, local = _resolve(path_or_url, filesystem, storage_options)
    import pyarrow as pa

    if local:
        try:
            mapping = _FileMapping(path)
        except FileNotFoundError:
            raise DataError(f"calibration batch {url!r} does not exist") from None
        except IsADirectoryError:
            raise DataError(f"calibration batch {url!r} is a directory, not an .arrow file") from None
        except OSError as exc:
            raise StorageError(f"cannot read calibration batch {url!r}: {exc}", url=url) from exc
    else:
        fd, tmp = tempfile.mkstemp(prefix="trtcal-batch-", suffix=".arrow")
        os.close(fd)
        try:
            fs.get_file(path, tmp)
            mapping = _FileMapping(tmp)
        except FileNotFoundError:
            raise DataError(f"calibration batch {url!r} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot download calibration batch {url!r}: {exc}", url=url) from exc
        finally:
            os.unlink(tmp)
    try:
        return _batch_from_ipc(pa.py_buffer(mapping.mmap), url, mapping, verify)
    except BaseException:
        mapping.close()
        raise


def _numbered_ids(n: int) -> list[str]:
    # Zero-padded so that sorting by id keeps the file's row order.
    width = max(9, len(str(max(n - 1, 0))))
    return [f"{i:0{width}d}" for i in range(n)]


def batch_from_arrays(
    arrays: ArrayMap,
    sample_ids: Sequence[str] | None = None,
    *,
    spec: Mapping[str, Any] | None = None,
    source: str = "<arrays>",
) -> CalibrationBatch:
    """An in-memory calibration batch (sorted by sample id, fingerprinted) from numpy arrays.

    Without `sample_ids`, rows are numbered ``000000000, 000000001, ...`` in their given order.
    """
    spec_json = canonical_spec_json(spec if spec is not None else {})
    if not arrays:
        raise DataError(f"{source}: no input arrays")
    columns = {_check_input_name(n): _check_array(n, a, None) for n, a in arrays.items()}
    counts = {a.shape[0] for a in columns.values()}
    if len(counts) != 1:
        raise DataError(f"{source}: inputs have different numbers of rows: { {n: a.shape[0] for n, a in columns.items()} }")
    n = counts.pop()
    ids = validate_sample_ids(sample_ids) if sample_ids is not None else _numbered_ids(n)
    if len(ids) != n:
        raise DataError(f"{source}: {n} rows but {len(ids)} sample ids")
    order = sorted(range(n), key=ids.__getitem__)
    if order != list(range(n)):
        index = np.asarray(order, dtype=np.intp)
        columns = {k: np.take(a, index, axis=0) for k, a in columns.items()}
        ids = [ids[i] for i in order]
    columns = {k: np.ascontiguousarray(a) for k, a in columns.items()}
    return CalibrationBatch(
        columns=columns, sample_ids=ids, fingerprint=compute_fingerprint(ids, columns),
        spec=json.loads(spec_json), source=source,
    )


def _npy_mapping(path: str) -> tuple[_FileMapping, npt.NDArray[Any]]:
    mapping = _FileMapping(path)
    header = mapping.mmap[:8192]
    import io

    stream = io.BytesIO(header)
    try:
        major, _minor = np.lib.format.read_magic(stream)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError as exc:
        mapping.close()
        raise DataError(f"{path} is not a valid .npy file ({exc})") from None
    if dtype.hasobject:
        mapping.close()
        raise DataError(f"{path} holds Python objects; calibration data must be a numeric array")
    offset = stream.tell()
    count = math.prod(int(d) for d in shape)  # Python ints: no int64 wrap-around on hostile headers
    if offset + count * dtype.itemsize > mapping.size:
        mapping.close()
        raise DataError(f"{path} is truncated: its header promises {shape} {dtype} but the file is shorter")
    if count == 0 or any(int(d) > np.iinfo(np.intp).max for d in shape):
        mapping.close()
        raise DataError(f"{path} holds no rows with values (shape {shape}); calibration needs at least one sample")
    arr = np.frombuffer(mapping.mmap, dtype=dtype, count=count, offset=offset)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return mapping, arr


def batch_from_numpy(
    path_or_array: str | os.PathLike[str] | npt.NDArray[Any],
    *,
    input_name: str | None = None,
    spec: Mapping[str, Any] | None = None,
) -> CalibrationBatch:
    """A calibration batch from a `.npy` file (one input), a `.npz` file (one array per input, keyed
    by input name; an optional string array ``sample_id`` gives the ids) or an ndarray.

    `.npy` files are memory-mapped; `.npz` members are read into memory (use `.npy` or `.arrow`
    for sets larger than memory). Rows without ids are numbered in file order.

    Raises:
        DataError: unreadable file, object arrays, inconsistent row counts, bad ids.
        ConfigError: a `.npy`/ndarray given without `input_name`.
    """
    if isinstance(path_or_array, np.ndarray):
        if input_name is None:
            raise ConfigError("input_name is required for an ndarray: it names the model input it feeds")
        return batch_from_arrays({input_name: path_or_array}, spec=spec, source="<ndarray>")
    path = os.fspath(path_or_array)
    suffix = Path(path).suffix.lower()
    if not os.path.exists(path):
        raise DataError(f"calibration data {path!r} does not exist")
    if suffix == ".npy":
        if input_name is None:
            raise ConfigError(f"{path} holds one unnamed array: pass input_name (the model input it feeds)")
        mapping, arr = _npy_mapping(path)
        arr = _check_array(input_name, arr, None)
        if arr.dtype.byteorder == ">" or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("=")))
        ids = _numbered_ids(arr.shape[0])
        columns = {_check_input_name(input_name): arr}
        return CalibrationBatch(
            columns=columns, sample_ids=ids,
            fingerprint=compute_fingerprint(ids, columns, _release=mapping.release),
            spec=json.loads(canonical_spec_json(spec or {})), source=path, mapping=mapping,
        )
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path} is not a readable .npz file without pickled objects ({exc})") from None
        ids_array = arrays.pop(SAMPLE_ID_COLUMN, None)
        sample_ids = None
        if ids_array is not None:
            if ids_array.dtype.kind != "U" or ids_array.ndim != 1:
                raise DataError(f"{path}: {SAMPLE_ID_COLUMN!r} must be a 1-D array of strings, got {ids_array.dtype}")
            sample_ids = [str(s) for s in ids_array]
        return batch_from_arrays(arrays, sample_ids, spec=spec, source=path)
    raise DataError(f"{path}: unsupported calibration data file type {suffix!r}; use .arrow, .npy or .npz")
