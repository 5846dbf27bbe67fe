"""The calibration-batch format: the one contract between preprocessing workers and the calibration actor.

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

This module holds the format itself: names, validation, the fingerprint and `record_batch` (the
one record batch of a file). numpy + stdlib; pyarrow only inside `record_batch`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal._version import FORMAT_VERSION
from trtcal.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pyarrow as pa

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
