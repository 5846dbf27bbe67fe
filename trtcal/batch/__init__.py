"""The calibration batch: the one contract between preprocessing workers and the calibration actor.

pyarrow and numpy only (fsspec for URLs); never Ray. A map:

* `format`: the file format (one Arrow record batch, tensor columns, metadata), validation of
  ids and arrays, the fingerprint, `record_batch`;
* `reader`: `open_any` (every kind of batch a user may give), `open_batch` (.arrow, memory-mapped,
  local or any fsspec URL), `batch_from_numpy`, `batch_from_arrays`, `CalibrationBatch`;
* `writer`: `write_batch` and `BatchWriter` (rows in any order, spooled, published atomically);
* `planned_writer`: `PlannedBatchWriter` (ids known up front: rows go straight to their offsets).
"""

from trtcal.batch.format import (
    FINGERPRINT_SCHEME,
    SAMPLE_ID_COLUMN,
    BatchInfo,
    InputInfo,
    canonical_spec_json,
    compute_fingerprint,
    validate_sample_ids,
)
from trtcal.batch.planned_writer import PlannedBatchWriter, RowPlacement
from trtcal.batch.reader import CalibrationBatch, batch_from_arrays, batch_from_numpy, open_any, open_batch
from trtcal.batch.writer import BatchWriter, write_batch

__all__ = [
    "FINGERPRINT_SCHEME",
    "SAMPLE_ID_COLUMN",
    "BatchInfo",
    "BatchWriter",
    "CalibrationBatch",
    "InputInfo",
    "PlannedBatchWriter",
    "RowPlacement",
    "batch_from_arrays",
    "batch_from_numpy",
    "canonical_spec_json",
    "compute_fingerprint",
    "open_any",
    "open_batch",
    "validate_sample_ids",
    "write_batch",
]
