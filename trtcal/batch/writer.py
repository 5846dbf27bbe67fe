"""Writers of calibration batches: `write_batch` (arrays in memory) and `BatchWriter` (row groups
arriving in any order, spooled to local disk, one record batch on `close`).

Both publish atomically: a local file is written under a temporary name in the target directory
and renamed into place; a remote one is written locally, then uploaded (object stores publish a
PUT whole; other filesystems get a temporary name and a move). See `trtcal.batch.format`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal.batch._location import _Target
from trtcal.batch.format import (
    _HASH_CHUNK,
    ArrayMap,
    BatchInfo,
    InputInfo,
    _check_array,
    _check_input_name,
    _inputs_of,
    _le_bytes_view,
    canonical_spec_json,
    compute_fingerprint,
    record_batch,
    validate_sample_ids,
)
from trtcal.errors import ConfigError, DataError, StorageError

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


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
