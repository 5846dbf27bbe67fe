"""`PlannedBatchWriter`: a calibration batch whose sample ids are known before any row arrives.

`BatchWriter` accepts rows with ids it has never heard of, so it must spool them and, at close,
sort, copy, hash and write the whole batch again: several serial passes over gigabytes after the
last row came in. When the ids are known up front (the Ray build knows them once it has selected
its samples), the Arrow file's layout is known too, and a row can go straight to its final byte
offset as soon as it arrives, in any order:

1. plan   pyarrow writes the record batch once into a recording sink, with the tensor values
          pointing at a sparse placeholder; the sink keeps the small pieces (header, schema,
          sample ids, footer) and notes where each values buffer starts (zero bytes copied).
2. place  `write` puts rows at ``values_offset + row * row_bytes`` with `os.pwrite` into a
          preallocated temp file (a full disk fails here, before any work is lost).
3. hash   each row's sha256 (part 4 of `compute_fingerprint`) is computed where the row is: by
          the worker that wrote it, or by a thread pool reading back what `write` put in the file;
          a thread flushes written data to disk every `flush_bytes`, so little is left dirty for
          the final fsync.
4. close  the row digests are folded into the fingerprint (32 bytes per row), the plan is redone
          with it (same length, same layout), its small pieces are written, the file is fsynced
          and published atomically like `BatchWriter`'s.

The file is byte-identical to what `BatchWriter` or `write_batch` writes for the same rows (a
test checks it as bytes). Rows that never arrive (inputs skipped as bad) are allowed: `close`
then rewrites the rows that did through `BatchWriter`, the slow path, once.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from trtcal.batch._location import _Target
from trtcal.batch.format import (
    DIGEST_BYTES,
    BatchInfo,
    InputInfo,
    _check_array,
    _check_input_name,
    canonical_spec_json,
    fingerprint_digest,
    le_row_bytes,
    record_batch,
    row_digests,
    validate_sample_ids,
)
from trtcal.batch.reader import _FileMapping
from trtcal.batch.writer import BatchWriter, _as_storage_error
from trtcal.errors import ConfigError, DataError

__all__ = ["PlannedBatchWriter", "RowPlacement"]

logger = logging.getLogger(__name__)

_PLACEHOLDER_FINGERPRINT = "sha256:" + "0" * 64  # same length as every real one: same layout
_HASH_STEP = 32 << 20  # bytes per read-back hashing job
_PWRITE_MAX = 1 << 30  # Linux writes at most ~2 GiB per call


class _LayoutChanged(Exception):
    """The final metadata does not fit the planned layout (e.g. a longer spec)."""


@dataclass(frozen=True)
class _Layout:
    size: int
    pieces: tuple[tuple[int, bytes], ...]  # (offset, bytes) of everything but the tensor values
    values_offset: Mapping[str, int]  # input name -> file offset of its values buffer


class _RecordingSink:
    """A write-only file for pyarrow that keeps small writes and records the placeholder's offset."""

    def __init__(self, holes: Mapping[int, tuple[str, int]]) -> None:
        self.holes = holes  # buffer address -> (input name, size)
        self.position = 0
        self.pieces: list[tuple[int, bytes]] = []
        self.values_offset: dict[str, int] = {}
        self.closed = False

    def write(self, data: Any) -> int:
        import pyarrow as pa

        if isinstance(data, pa.Buffer) and data.address in self.holes and data.size == self.holes[data.address][1]:
            self.values_offset[self.holes[data.address][0]] = self.position
            size = int(data.size)
        else:
            view = memoryview(data).cast("B")
            size = view.nbytes
            if size > (16 << 20):
                # pyarrow copied a values buffer into Python: this version does not hand buffers
                # over zero-copy, so planning cannot work (and must not hold gigabytes).
                raise _LayoutChanged(f"pyarrow passed a {size}-byte write by value")
            self.pieces.append((self.position, view.tobytes()))
        self.position += size
        return size

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def _plan_layout(
    sample_ids: Sequence[str], inputs: Sequence[InputInfo], spec_json: str, fingerprint: str, directory: str
) -> _Layout:
    """Where every byte of the batch file goes, from pyarrow's own writer (no values copied)."""
    import pyarrow as pa

    n = len(sample_ids)
    sizes = [n * int(np.prod(i.shape, dtype=np.int64)) * np.dtype(i.dtype).itemsize for i in inputs]
    # A sparse file stands in for the values: mapping it costs no memory and no commit charge.
    with tempfile.TemporaryFile(dir=directory) as sparse:
        os.ftruncate(sparse.fileno(), sum(sizes))
        placeholder = mmap.mmap(sparse.fileno(), sum(sizes), access=mmap.ACCESS_READ)
    try:
        columns: dict[str, npt.NDArray[Any]] = {}
        holes: dict[int, tuple[str, int]] = {}
        offset = 0
        for info, size in zip(inputs, sizes):
            dtype = np.dtype(info.dtype).newbyteorder("<")
            arr = np.frombuffer(placeholder, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            columns[info.name] = arr.reshape(n, *info.shape)
            holes[int(arr.ctypes.data)] = (info.name, size)
            offset += size
        batch = record_batch(sample_ids, columns, spec_json, fingerprint)
        sink = _RecordingSink(holes)
        with pa.ipc.new_file(pa.PythonFile(sink, mode="w"), batch.schema) as writer:
            writer.write_batch(batch)
        del batch, columns, arr
    finally:
        try:
            placeholder.close()
        except BufferError:  # a view is still referenced somewhere; unmapped when it goes
            pass
    if set(sink.values_offset) != {i.name for i in inputs}:
        raise _LayoutChanged("pyarrow did not write the values buffers as planned")
    return _Layout(size=sink.position, pieces=tuple(sink.pieces), values_offset=dict(sink.values_offset))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done : done + _PWRITE_MAX], offset + done)


def _runs(rows: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """(start, stop) index ranges of `rows` whose values are consecutive: one pwrite each."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    stops = np.concatenate((breaks, [len(rows)])).tolist()
    return list(zip(starts, stops))


def _write_rows(
    fd: int, rows: npt.NDArray[np.int64], columns: Mapping[str, npt.NDArray[Any]],
    values_offset: Mapping[str, int], row_bytes: Mapping[str, int],
) -> None:
    for name, arr in columns.items():
        data = le_row_bytes(arr)
        for a, b in _runs(rows):
            _pwrite_all(fd, data[a:b].reshape(-1).data, values_offset[name] + int(rows[a]) * row_bytes[name])


@dataclass(frozen=True)
class RowPlacement:
    """Where rows go in a `PlannedBatchWriter`'s temp file, for processes on the same machine.

    Picklable: a worker that can see `path` writes its rows itself (`write_rows`, which also
    returns their digests) and the caller hands ids and digests to the writer's `mark_written`;
    the rows then never travel through the driver. `node` is an opaque tag the caller uses to tell
    whether a worker shares the file system (e.g. Ray's node id).
    """

    path: str
    node: str
    inputs: tuple[InputInfo, ...]
    values_offset: Mapping[str, int]
    row_bytes: Mapping[str, int]

    def accepts(self, arrays: Mapping[str, npt.NDArray[Any]]) -> bool:
        """Whether rows of these arrays have this batch's inputs, shapes and dtypes."""
        if set(arrays) != {i.name for i in self.inputs}:
            return False
        return all(
            arrays[i.name].shape[1:] == i.shape and arrays[i.name].dtype == np.dtype(i.dtype) for i in self.inputs
        )

    def write_rows(self, rows: Sequence[int], arrays: Mapping[str, npt.NDArray[Any]]) -> dict[str, bytes]:
        """Write rows at these row indices (positions in sorted id order); their digests per input.

        Raises OSError."""
        fd = os.open(self.path, os.O_WRONLY)  # never creates: the file belongs to the writer
        try:
            _write_rows(fd, np.asarray(rows, dtype=np.int64), arrays, self.values_offset, self.row_bytes)
        finally:
            os.close(fd)
        return {name: row_digests(arr) for name, arr in arrays.items()}


class PlannedBatchWriter:
    """Writes rows straight to their place in the final Arrow file; see the module docstring.

    Example:
        >>> ids = ["img-1", "img-2", "img-3"]
        >>> inputs = [InputInfo("input", (3, 224, 224), "float32")]
        >>> with PlannedBatchWriter("calib.arrow", sample_ids=ids, inputs=inputs, spec={}) as w:  # doctest: +SKIP
        ...     w.write({"input": rows_2_3}, ["img-2", "img-3"])
        ...     w.write({"input": row_1}, ["img-1"])
    """

    def __init__(
        self,
        path_or_url: str | os.PathLike[str],
        *,
        sample_ids: Sequence[str],
        inputs: Sequence[InputInfo],
        spec: Mapping[str, Any],
        filesystem: Any = None,
        flush_bytes: int = 256 << 20,
        hash_threads: int | None = None,
        **storage_options: Any,
    ) -> None:
        ids = sorted(validate_sample_ids(sample_ids))
        if not ids:
            raise DataError("a calibration batch needs at least one row; got no sample ids")
        if not inputs:
            raise DataError("a calibration batch needs at least one input array")
        self._inputs = tuple(sorted(inputs, key=lambda i: i.name))
        for info in self._inputs:
            _check_input_name(info.name)
            _check_array(info.name, np.empty((0, *info.shape), dtype=np.dtype(info.dtype)), None)
        self._ids = ids
        self._position = {s: k for k, s in enumerate(ids)}
        self._spec_json = canonical_spec_json(spec)
        self._args = (path_or_url, filesystem, dict(storage_options))
        self._target = _Target(path_or_url, filesystem, storage_options)
        self._row_bytes = {i.name: int(np.prod(i.shape, dtype=np.int64)) * np.dtype(i.dtype).itemsize for i in self._inputs}
        self._written = {i.name: np.zeros(len(ids), dtype=bool) for i in self._inputs}
        self._digests = {i.name: np.zeros((len(ids), DIGEST_BYTES), dtype=np.uint8) for i in self._inputs}
        self._state = "open"
        self.info: BatchInfo | None = None
        self._fd = -1
        self._view: _FileMapping | None = None  # read-back of what `write` put in the file
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._bytes_written = 0
        self._bytes_flushed = 0
        self._flush_bytes = max(1, int(flush_bytes))
        self._hash_jobs: list[Future[None]] = []
        try:
            self._layout = _plan_layout(ids, self._inputs, self._spec_json, _PLACEHOLDER_FINGERPRINT, self._target.local_dir)
            self._fd = os.open(self._target.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self._preallocate()
            self._view = _FileMapping(self._target.tmp_path)
        except OSError as exc:
            self._close_file()
            self._target.discard()
            raise _as_storage_error(exc, self._target.url) from exc
        except BaseException:
            self._close_file()
            self._target.discard()
            raise
        threads = hash_threads if hash_threads is not None else min(4, os.cpu_count() or 1)
        self._hash_pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="trtcal-batch-hash")
        self._flusher = threading.Thread(target=self._flush_data, name="trtcal-batch-flush", daemon=True)
        self._flusher.start()

    def _preallocate(self) -> None:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(self._fd, 0, self._layout.size)  # a full disk fails now, not mid-build
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # the filesystem cannot preallocate
                    raise
        os.ftruncate(self._fd, self._layout.size)

    @property
    def num_rows(self) -> int:
        """Rows written so far (of the first input)."""
        return int(self._written[self._inputs[0].name].sum())

    @property
    def planned_rows(self) -> int:
        return len(self._ids)

    def write(self, arrays: Mapping[str, npt.ArrayLike], sample_ids: Sequence[str]) -> None:
        """Place rows (any order relative to other calls); every id must be one of the planned ones.

        The rows' digests are computed by a thread pool from the file, off the caller's thread."""
        rows, ids = self._rows_of(sample_ids)
        if not ids:
            return
        if set(arrays) != set(self._written):
            raise DataError(f"rows carry inputs {sorted(arrays)}; the batch has {sorted(self._written)}")
        columns = {}
        for info in self._inputs:
            arr = _check_array(info.name, arrays[info.name], len(ids))
            if arr.shape[1:] != info.shape or arr.dtype != np.dtype(info.dtype):
                raise DataError(
                    f"input {info.name!r}: rows of shape {list(arr.shape[1:])} {arr.dtype} do not match the batch's "
                    f"{list(info.shape)} {info.dtype}"
                )
            columns[info.name] = arr
        try:
            _write_rows(self._fd, rows, columns, self._layout.values_offset, self._row_bytes)
        except OSError as exc:
            self.abort()
            raise _as_storage_error(exc, self._target.url) from exc
        for info in self._inputs:
            step = max(1, _HASH_STEP // self._row_bytes[info.name])
            for a, b in _runs(rows):
                first, last = int(rows[a]), int(rows[b - 1]) + 1
                for start in range(first, last, step):
                    self._hash_jobs.append(self._hash_pool.submit(self._hash_from_file, info.name, start, min(last, start + step)))
        self._mark(rows)

    def placement(self, node: str) -> RowPlacement:
        """What a process on this machine needs to write rows itself (see `RowPlacement`)."""
        return RowPlacement(
            path=self._target.tmp_path, node=node, inputs=self._inputs,
            values_offset=dict(self._layout.values_offset), row_bytes=dict(self._row_bytes),
        )

    def mark_written(self, sample_ids: Sequence[str], digests: Mapping[str, bytes]) -> None:
        """Record rows that another process wrote through `placement()`, with their digests."""
        rows, ids = self._rows_of(sample_ids)
        if not ids:
            return
        if set(digests) != set(self._written):
            raise DataError(f"digests for inputs {sorted(digests)}; the batch has {sorted(self._written)}")
        for name, raw in digests.items():
            if len(raw) != len(ids) * DIGEST_BYTES:
                raise DataError(f"input {name!r}: {len(raw)} digest bytes for {len(ids)} rows")
            self._digests[name][rows] = np.frombuffer(raw, dtype=np.uint8).reshape(len(ids), DIGEST_BYTES)
        self._mark(rows)

    def _rows_of(self, sample_ids: Sequence[str]) -> tuple[npt.NDArray[np.int64], list[str]]:
        if self._state != "open":
            raise ConfigError(f"PlannedBatchWriter for {self._target.url!r} is {self._state}; create a new one")
        self._raise_background_error()
        ids = list(sample_ids)
        try:
            rows = np.fromiter((self._position[s] for s in ids), dtype=np.int64, count=len(ids))
        except KeyError as exc:
            raise DataError(f"sample id {exc.args[0]!r:.80} is not one of the batch's planned ids") from None
        except TypeError:
            raise DataError("sample ids must be strings") from None
        first = self._written[self._inputs[0].name]
        if len(np.unique(rows)) != len(rows) or first[rows].any():
            raise DataError(f"sample id {ids[0]!r:.80}...: rows were already written; sample ids must be unique")
        return rows, ids

    def _mark(self, rows: npt.NDArray[np.int64]) -> None:
        with self._cond:
            for info in self._inputs:
                self._written[info.name][rows] = True
            self._bytes_written += sum(len(rows) * self._row_bytes[i.name] for i in self._inputs)
            self._cond.notify_all()

    # -- background work

    def _hash_from_file(self, name: str, start: int, stop: int) -> None:
        """Digests of rows [start, stop) of input `name`, read back from the file (page cache)."""
        assert self._view is not None
        row_bytes = self._row_bytes[name]
        offset = self._layout.values_offset[name] + start * row_bytes
        rows = np.frombuffer(self._view.mmap, dtype=np.uint8, count=(stop - start) * row_bytes, offset=offset)
        digests = row_digests(rows.reshape(stop - start, row_bytes))
        self._digests[name][start:stop] = np.frombuffer(digests, dtype=np.uint8).reshape(-1, DIGEST_BYTES)
        self._view.release(rows)  # hashed pages stay in the page cache; this keeps RSS flat

    def _flush_data(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._bytes_written - self._bytes_flushed < self._flush_bytes and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        return
                    target = self._bytes_written
                os.fdatasync(self._fd)  # releases the GIL; keeps the final fsync short
                self._bytes_flushed = target
        except BaseException as exc:  # handed to the caller at the next write/close
            self._error = exc

    def _raise_background_error(self) -> None:
        error = self._error
        pending = []
        for job in self._hash_jobs:
            if not job.done():
                pending.append(job)
            elif job.exception() is not None:
                error = error or job.exception()
        self._hash_jobs = pending
        if error is not None:
            self.abort()
            if isinstance(error, OSError):
                raise _as_storage_error(error, self._target.url) from error
            raise error

    def _stop_background(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._flusher.join()
        self._hash_pool.shutdown(wait=True, cancel_futures=True)

    # -- finishing

    def close(self, *, spec: Mapping[str, Any] | None = None) -> BatchInfo:
        """Publish the batch (with `spec` replacing the one given at construction, if given)."""
        if self._state == "closed" and self.info is not None:
            return self.info
        if self._state != "open":
            raise ConfigError(f"PlannedBatchWriter for {self._target.url!r} is {self._state}")
        try:
            if spec is not None:
                self._spec_json = canonical_spec_json(spec)
            present = [self._written[i.name] for i in self._inputs]
            if not present[0].any():
                raise DataError(f"no rows were written to {self._target.url!r}; a calibration batch needs at least one")
            if any(not np.array_equal(p, present[0]) for p in present[1:]):
                raise DataError("some rows were written for one input but not for another")
            if present[0].all():
                self._raise_background_error()
                for job in self._hash_jobs:
                    job.result()
                self._stop_background()
                digest = fingerprint_digest(self._ids, self._inputs)
                for info in self._inputs:
                    digest.update(self._digests[info.name].tobytes())
                fingerprint = "sha256:" + digest.hexdigest()
                try:
                    info = self._finish_in_place(fingerprint)
                except _LayoutChanged as exc:
                    logger.info("batch layout changed at close (%s); rewriting the rows once", exc)
                    info = self._rewrite(present[0])
            else:
                self._stop_background()
                info = self._rewrite(present[0])
        except OSError as exc:
            self.abort()
            raise _as_storage_error(exc, self._target.url) from exc
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self.info = info
        logger.info("wrote calibration batch %s: %d rows, %s", info.path, info.num_rows, info.fingerprint)
        return info

    def _finish_in_place(self, fingerprint: str) -> BatchInfo:
        layout = _plan_layout(self._ids, self._inputs, self._spec_json, fingerprint, self._target.local_dir)
        if layout.size != self._layout.size or layout.values_offset != self._layout.values_offset:
            raise _LayoutChanged("the final metadata moved the values")
        for offset, data in layout.pieces:
            _pwrite_all(self._fd, memoryview(data), offset)
        os.fsync(self._fd)
        self._close_file()
        nbytes = self._target.publish()
        return BatchInfo(
            path=self._target.url, num_rows=len(self._ids), inputs=self._inputs, fingerprint=fingerprint,
            spec=json.loads(self._spec_json), nbytes=nbytes,
        )

    def _rewrite(self, present: npt.NDArray[np.bool_]) -> BatchInfo:
        """Slow path: the rows that arrived, through `BatchWriter` (which publishes to the same URL)."""
        path_or_url, filesystem, options = self._args
        rows = np.flatnonzero(present)
        assert self._view is not None
        columns = {}
        for info in self._inputs:
            dtype = np.dtype(info.dtype).newbyteorder("<")
            columns[info.name] = np.frombuffer(
                self._view.mmap, dtype=dtype, count=len(self._ids) * self._row_bytes[info.name] // dtype.itemsize,
                offset=self._layout.values_offset[info.name],
            ).reshape(len(self._ids), *info.shape)
        step = max(1, _HASH_STEP // max(self._row_bytes.values()))
        with BatchWriter(path_or_url, spec=json.loads(self._spec_json), filesystem=filesystem, **options) as writer:
            for a in range(0, len(rows), step):
                chunk = rows[a : a + step]
                writer.write({name: values[chunk] for name, values in columns.items()}, [self._ids[r] for r in chunk.tolist()])
        del columns
        self._close_file()
        self._target.discard()
        assert writer.info is not None
        return writer.info

    def _close_file(self) -> None:
        if self._view is not None:
            self._view.close()
            self._view = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        """Drop everything written so far; nothing is published."""
        if self._state in ("aborted", "closed"):
            return
        self._state = "aborted"
        if hasattr(self, "_flusher"):
            self._stop_background()
        self._close_file()
        self._target.discard()

    def __enter__(self) -> PlannedBatchWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()
