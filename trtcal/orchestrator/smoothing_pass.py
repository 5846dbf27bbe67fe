"""`calibrate`'s smoothing step (CalibrationConfig.smooth): per-channel maxima over the calibration
batch, then the smoothed copy that the statistics passes, the caches and the Q/DQ model are of.

It runs where the calibration runs (the actor), in this process, before the statistics: one FP32
pass over the same calibration batch, fed exactly as the runners feed it (declared batch axes,
constants), padded positions left out by the attention mask. Maxima are exact, so the smoothed
model's bytes do not depend on the micro-batch or on `processes` (the worker processes then read
the smoothed model from a file this step writes). docs/qdq.md, "Smoothing", has the rule.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtcal.progress import ProgressCallback

if TYPE_CHECKING:
    from trtcal.batch import CalibrationBatch
    from trtcal.config import CalibrationConfig
    from trtcal.model import LoadedModel
    from trtcal.runners.base import BatchLayout

__all__ = ["Smoothed", "smooth_for_calibration", "smoothing_mask_input"]

logger = logging.getLogger(__name__)
STAGE = "smoothing"


@dataclass(frozen=True)
class Smoothed:
    """The smoothed copy (loaded from `path`), its bytes, and the record the manifest and store keep."""

    loaded: LoadedModel
    model_bytes: bytes
    record: dict[str, Any]
    seconds: float


def smoothing_mask_input(model: Any, layout: BatchLayout) -> str | None:
    """The declared mask input, else the model's one integer input named like "*mask*" (as
    `trtcal.model.mask_inputs` finds them), else None (every position counts)."""
    from trtcal.model import mask_inputs

    if layout.mask_input is not None:
        return layout.mask_input
    found = sorted(mask_inputs(model))
    return found[0] if len(found) == 1 else None


def smooth_for_calibration(
    cfg: CalibrationConfig, loaded: LoadedModel, cal_batch: CalibrationBatch, layout: BatchLayout,
    workdir: Path, progress: ProgressCallback,
) -> Smoothed | None:
    """The smoothed copy of `loaded` written to `workdir`, or None when `cfg.smooth` smooths nothing here.

    Raises ConfigError for smooth="on" on a model without the pattern (`smoothing_sites`)."""
    from trtcal.export.model_io import serialize_model
    from trtcal.export.smoothing import SMOOTHED_MODEL, smooth_model, smoothing_sites
    from trtcal.model import load_model

    sites = smoothing_sites(loaded.proto, cfg.smooth, model_label=f"model {loaded.source}")
    if not sites:
        return None
    t0 = time.perf_counter()
    mask = smoothing_mask_input(loaded.proto, layout)
    smoothed, report = smooth_model(
        loaded.proto, _feeds(cal_batch, layout, cfg.micro_batch, progress), alpha=cfg.smooth_alpha, mask_input=mask
    )
    data = serialize_model(smoothed)
    path = workdir / SMOOTHED_MODEL
    path.write_bytes(data)
    smoothed_loaded = load_model(str(path))
    record = {
        "alpha": cfg.smooth_alpha,
        "model": SMOOTHED_MODEL,
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "original_model_sha256": loaded.sha256,
        "mask_input": mask,
        "sites": {name: list(matmuls) for name, matmuls in sorted(report.smoothed.items())},
    }
    seconds = time.perf_counter() - t0
    logger.info(
        "smoothed %d normalisation outputs read by %d MatMuls (alpha %g, padding left out by %s) in %.1f s; "
        "calibrating the smoothed copy", len(report.smoothed), sum(len(v) for v in report.smoothed.values()),
        cfg.smooth_alpha, mask or "nothing", seconds,
    )
    return Smoothed(loaded=smoothed_loaded, model_bytes=data, record=record, seconds=seconds)


def _feeds(
    cal_batch: CalibrationBatch, layout: BatchLayout, micro_batch: int, progress: ProgressCallback
) -> Iterator[dict[str, Any]]:
    """The runners' feeds of the whole batch, one micro-batch at a time, with progress in samples."""
    from trtcal.runners.base import feed_micro_batches

    progress.start(STAGE, cal_batch.num_rows, "sample")
    try:
        for feed, rows in feed_micro_batches(cal_batch, layout, 0, cal_batch.num_rows, micro_batch):
            yield feed
            progress.advance(STAGE, rows)
    finally:
        progress.finish(STAGE)
