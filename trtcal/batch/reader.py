"""Readers of calibration batches: `open_any` (the one entry point), `open_batch` (an .arrow file:
memory-mapped when local, downloaded to an unlinked local temp file and memory-mapped otherwise),
`batch_from_numpy` (.npy/.npz) and `batch_from_arrays`. The fingerprint is verified on open.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal.batch._location import _resolve
from trtcal.batch._numpy_files import _FileMapping
from trtcal.batch.format import (
    _SCHEME_OF_FORMAT,
    FINGERPRINT_SCHEME,
    META_FINGERPRINT,
    META_FORMAT_VERSION,
    META_SPEC,
    SAMPLE_ID_COLUMN,
    SUPPORTED_DTYPES,
    ArrayMap,
    InputInfo,
    _check_array,
    _check_input_name,
    _inputs_of,
    canonical_spec_json,
    compute_fingerprint,
    validate_sample_ids,
)
from trtcal.errors import ConfigError, DataError, StorageError

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Readers


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
                "(trtcal.batch.write_batch or BatchWriter)"
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
    n, ids = _rows_and_ids(columns, sample_ids, source)
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


def _rows_and_ids(
    columns: Mapping[str, npt.NDArray[Any]], sample_ids: Sequence[str] | None, source: str
) -> tuple[int, list[str]]:
    """The common row count of the columns and their sample ids (given and checked, or numbered)."""
    counts = {a.shape[0] for a in columns.values()}
    if len(counts) != 1:
        raise DataError(f"{source}: inputs have different numbers of rows: { {n: a.shape[0] for n, a in columns.items()} }")
    n = counts.pop()
    ids = validate_sample_ids(sample_ids) if sample_ids is not None else _numbered_ids(n)
    if len(ids) != n:
        raise DataError(f"{source}: {n} rows but {len(ids)} sample ids")
    return n, ids


def _npy_mapping(path: str) -> tuple[_FileMapping, npt.NDArray[Any]]:
    from trtcal.batch._numpy_files import map_npy

    return map_npy(path)


def _mapped_batch(
    arrays: Mapping[str, npt.NDArray[Any]], sample_ids: Sequence[str] | None, mapping: Any, spec: Mapping[str, Any] | None,
    source: str,
) -> CalibrationBatch:
    """A batch of memory-mapped arrays (rows in file order, ids absent or sorted), fingerprinted with
    the mapped pages handed back as they are hashed."""
    if not arrays:
        raise DataError(f"{source}: no input arrays")
    columns = {}
    for name, arr in arrays.items():
        arr = _check_array(name, arr, None)
        if arr.dtype.byteorder == ">" or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("=")))
        columns[_check_input_name(name)] = arr
    n, ids = _rows_and_ids(columns, sample_ids, source)
    return CalibrationBatch(
        columns=columns, sample_ids=ids, fingerprint=compute_fingerprint(ids, columns, _release=mapping.release),
        spec=json.loads(canonical_spec_json(spec or {})), source=source, mapping=mapping,
    )


def _npz_batch(path: str, spec: Mapping[str, Any] | None) -> CalibrationBatch:
    """An .npz batch, memory-mapped (`trtcal.batch._numpy_files.map_npz`); ids out of order are sorted
    in memory (a copy of the data)."""
    import zipfile

    from trtcal.batch._numpy_files import map_npz

    try:
        arrays, ids_array, mapping = map_npz(path, SAMPLE_ID_COLUMN)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz file without pickled objects ({exc})") from None
    try:
        sample_ids = None
        if ids_array is not None:
            if ids_array.dtype.kind != "U" or ids_array.ndim != 1:
                raise DataError(f"{path}: {SAMPLE_ID_COLUMN!r} must be a 1-D array of strings, got {ids_array.dtype}")
            sample_ids = [str(s) for s in ids_array]
            if any(not a < b for a, b in zip(sample_ids, sample_ids[1:])):
                logger.info("%s: sample ids are not in ascending order; sorting the rows in memory", path)
                try:
                    return batch_from_arrays(arrays, sample_ids, spec=spec, source=path)
                finally:
                    mapping.close()  # the sorted copy owns its data
        return _mapped_batch(arrays, sample_ids, mapping, spec, path)
    except BaseException:
        mapping.close()
        raise


def batch_from_numpy(
    path_or_array: str | os.PathLike[str] | npt.NDArray[Any],
    *,
    input_name: str | None = None,
    spec: Mapping[str, Any] | None = None,
) -> CalibrationBatch:
    """A calibration batch from a `.npy` file (one input), a `.npz` file (one array per input, keyed
    by input name; an optional string array ``sample_id`` gives the ids) or an ndarray.

    `.npy` files and `.npz` members are memory-mapped (a compressed member is first decompressed
    into an unlinked temp file): memory does not grow with the rows. An `.npz` whose ids are not in
    ascending order is sorted in memory. Rows without ids are numbered in file order.

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
        try:
            return _mapped_batch({input_name: arr}, None, mapping, spec, path)
        except BaseException:
            mapping.close()
            raise
    if suffix == ".npz":
        return _npz_batch(path, spec)
    raise DataError(f"{path}: unsupported calibration data file type {suffix!r}; use .arrow, .npy or .npz")


def open_any(
    source: Any,
    input_names: Sequence[str] | Callable[[], Sequence[str]] = (),
    *,
    verify: bool = True,
    filesystem: Any = None,
    spec: Mapping[str, Any] | None = None,
    **storage_options: Any,
) -> CalibrationBatch:
    """A CalibrationBatch from whatever a user may hand over: the one batch opener.

    Args:
        source: a CalibrationBatch (returned as is), a mapping input name -> array, an ndarray
            (feeds the model's one input), or a path/URL: ``.npy`` (one input) or ``.npz`` (one
            array per input; local files only), anything else an .arrow calibration batch (local,
            or any fsspec URL with `storage_options` / `filesystem`).
        input_names: the model's fed inputs, or a function giving them (called only when a
            ``.npy`` file or an ndarray must be assigned to the model's one input).
        verify: check an .arrow batch's fingerprint on open.
        spec: the batch spec of a ``.npy``/``.npz`` file (e.g. ``{"inputs": ...}``, the declared
            input specs); an .arrow batch carries its own.

    Raises:
        DataError: unreadable data, or an unnamed array for a model with several inputs.
        ConfigError: an unsupported type, or a .npy/.npz URL.
    """
    if isinstance(source, CalibrationBatch):
        return source
    if isinstance(source, Mapping):
        return batch_from_arrays(source)
    if isinstance(source, np.ndarray):
        return batch_from_arrays({_only_input(input_names, "an array feeds one input")[0]: source})
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        suffix = Path(text.split("?")[0]).suffix.lower()
        if suffix not in (".npy", ".npz"):
            return open_batch(text, verify=verify, filesystem=filesystem, **storage_options)
        if "://" in text:
            raise ConfigError(f"{text}: .npy/.npz data must be a local file; use an .arrow batch for URLs")
        if suffix == ".npz":
            return batch_from_numpy(text, spec=spec)
        names = _only_input(input_names, f"{text} holds one unnamed array", "use an .npz with one array per input name")
        return batch_from_numpy(text, input_name=names[0], spec=spec)
    raise ConfigError(f"batch must be a CalibrationBatch, a path/URL or a mapping of arrays, got {type(source).__name__}")


def _only_input(
    input_names: Sequence[str] | Callable[[], Sequence[str]], what: str, fix: str = "pass a mapping"
) -> Sequence[str]:
    names = input_names() if callable(input_names) else input_names
    if len(names) != 1:
        raise DataError(f"{what} but the model has inputs {list(names)}; {fix}")
    return names
