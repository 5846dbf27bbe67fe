"""Micro-batches for a TensorRT calibrator from any batch source (a CalibrationBatch, a mapping of
arrays, or an iterable of mappings), in a fixed order, with the partial-batch policy applied."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, TypeGuard, cast

import numpy as np

from trtcal.errors import (
    DataError,
)
from trtcal.runners.tensorrt.config import PartialBatchPolicy

log = logging.getLogger(__name__)


STAGE = "tensorrt calibration"


class MicroBatchSource(Protocol):
    """What trtcal's CalibrationBatch offers (trtcal.batch)."""

    @property
    def num_rows(self) -> int: ...

    def iter_micro_batches(self, size: int) -> Iterator[dict[str, np.ndarray]]: ...


def _source_chunks(source: BatchSource, micro_batch: int | None) -> Iterable[Any]:
    """The items of a batch source: a CalibrationBatch's micro-batches, one mapping, or the iterable."""
    if _is_calibration_batch(source):
        rows_total = int(source.num_rows)
        if rows_total == 0:
            raise DataError("the calibration batch is empty: the batch source gave no samples")
        return source.iter_micro_batches(micro_batch or rows_total)
    if isinstance(source, Mapping):
        return [source]
    return cast(Iterable[Any], source)


def _check_leftover(
    total: int, served: int, pending_rows: int, micro_batch: int | None, partial_batch: PartialBatchPolicy
) -> None:
    """An empty source, or samples that do not fill the last micro-batch: DataError or (drop) a warning."""
    if total == 0:
        raise DataError("the calibration batch is empty: the batch source gave no samples")
    if pending_rows:
        if partial_batch == "drop":
            log.warning(
                "dropping the last %d of %d calibration samples: they do not fill a micro-batch of %d "
                "(TensorRT reads every batch at the calibration shape)",
                pending_rows,
                total,
                micro_batch,
            )
            if served == 0:
                raise DataError(
                    f"the calibration batch has {total} samples, fewer than one micro-batch of {micro_batch}"
                )
        else:
            raise DataError(
                f"the calibration batch has {total} samples, which leaves a last micro-batch of {pending_rows} "
                f"(micro_batch={micro_batch}); TensorRT reads every calibration batch at the same shape. "
                f"Choose a micro_batch that divides {total}, or set partial_batch='drop' to leave those "
                f"{pending_rows} samples out"
            )


BatchSource = MicroBatchSource | Mapping[str, Any] | Iterable[Mapping[str, Any]]


def _as_arrays(chunk: Any, index: int) -> dict[str, np.ndarray]:
    if not isinstance(chunk, Mapping):
        raise DataError(
            f"batch source item {index} is a {type(chunk).__name__}; expected a mapping of input name to array"
        )
    if not chunk:
        raise DataError(f"batch source item {index} holds no inputs")
    arrays = {str(name): np.asarray(value) for name, value in chunk.items()}
    for name, arr in arrays.items():
        if arr.ndim == 0:
            raise DataError(f"batch source item {index}: input {name!r} is a scalar; expected [N, ...]")
    return arrays


def _rows(arrays: Mapping[str, np.ndarray], index: int) -> int:
    counts = {name: int(arr.shape[0]) for name, arr in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"batch source item {index}: inputs have different numbers of samples {counts}")
    return next(iter(counts.values()))


def iter_micro_batches(
    source: BatchSource, micro_batch: int | None, *, partial_batch: PartialBatchPolicy = "error"
) -> Iterator[dict[str, np.ndarray]]:
    """Serve a calibration batch as micro-batches of exactly `micro_batch` samples, in order.

    `source` is a `trtcal.batch.CalibrationBatch` (anything with
    `iter_micro_batches(size)` and `num_rows`), one mapping input name -> array [N, ...] (sliced
    without copying), or an iterable of such mappings of any sizes (re-cut into `micro_batch`-sized
    pieces; pieces that straddle two items are concatenated). With `micro_batch=None` the items
    (or the whole batch) are served as they are.

    Raises:
        DataError: an item is not a mapping of arrays, inputs disagree on names or sample counts,
            the source is empty, or (with partial_batch="error") the samples do not fill the
            last micro-batch.
    """
    chunks = _source_chunks(source, micro_batch)
    names: tuple[str, ...] | None = None
    total = 0
    served = 0
    pending: dict[str, list[np.ndarray]] = {}
    pending_rows = 0
    for index, chunk in enumerate(chunks):
        arrays = _as_arrays(chunk, index)
        if names is None:
            names = tuple(arrays)
        elif set(arrays) != set(names):
            raise DataError(
                f"batch source item {index} has inputs {sorted(arrays)}, but earlier items had {sorted(names)}"
            )
        rows = _rows(arrays, index)
        total += rows
        if micro_batch is None:
            if rows:
                served += rows
                yield arrays
            continue
        offset = 0
        while offset < rows:
            take = min(micro_batch - pending_rows, rows - offset)
            if pending_rows == 0 and take == micro_batch:
                # Whole micro-batch inside one item: a view, no copy.
                yield {name: arrays[name][offset : offset + take] for name in names}
                served += take
            else:
                for name in names:
                    pending.setdefault(name, []).append(arrays[name][offset : offset + take])
                pending_rows += take
                if pending_rows == micro_batch:
                    yield {name: np.concatenate(pending[name], axis=0) for name in names}
                    served += pending_rows
                    pending, pending_rows = {}, 0
            offset += take
    _check_leftover(total, served, pending_rows, micro_batch, partial_batch)


def _is_calibration_batch(source: Any) -> TypeGuard[MicroBatchSource]:
    return callable(getattr(source, "iter_micro_batches", None)) and hasattr(source, "num_rows")


def _count_micro_batches(
    source: BatchSource, micro_batch: int | None, partial_batch: PartialBatchPolicy
) -> int | None:
    """Number of micro-batches when it is known without reading data."""
    if micro_batch is None:
        return None
    if _is_calibration_batch(source):
        rows = int(source.num_rows)
    elif isinstance(source, Mapping) and source:
        try:
            rows = _rows({n: np.asarray(a) for n, a in source.items()}, 0)
        except (DataError, IndexError):
            return None  # the iterator reports it properly
    else:
        return None
    full, rest = divmod(rows, micro_batch)
    if rest and partial_batch == "error":
        return None
    return full
