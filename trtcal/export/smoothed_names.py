"""Names of a smoothed model's artifacts, and the check that keeps its scales off the original model.

Apart from `trtcal.export.smoothing` (which runs ONNX Runtime) so that the Q/DQ export, the engine
builder and the CLI can check scales without importing it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from trtcal.errors import CacheFormatError

__all__ = ["SMOOTHED_MODEL", "SMOOTHED_SUFFIX", "check_not_smoothed_for"]

SMOOTHED_MODEL = "model.smoothed.onnx"  # `trtcal calibrate` writes the smoothed copy under this name
SMOOTHED_SUFFIX = "_smoothed"  # x -> Mul(x, 1/s) is named x + this: a smoothed model's caches name it


def check_not_smoothed_for(names: Iterable[str], tensors: Iterable[str], *, model: str, what: str, beside: str | None = None) -> None:
    """CacheFormatError when `names` (a cache's or range table's tensors) are of the smoothed copy of a
    model whose tensors are `tensors`: they name smoothing outputs (x_smoothed) the model lacks while
    it has x. Such scales would leave the smoothed MatMul inputs without a range and give the
    original LayerNorm outputs the scale of their unsmoothed use: a wrong engine, built silently.

    `beside`: the folder the cache is in; a model.smoothed.onnx there is named as the one to use."""
    present = set(tensors)
    smoothed = sorted(
        n for n in names if n.endswith(SMOOTHED_SUFFIX) and n not in present and n[: -len(SMOOTHED_SUFFIX)] in present
    )
    if not smoothed:
        return
    candidate = os.path.join(beside, SMOOTHED_MODEL) if beside is not None else None
    use = (
        f"use {candidate}, the smoothed model it was calibrated on" if candidate and os.path.isfile(candidate)
        else f"use the smoothed model it was calibrated on ({SMOOTHED_MODEL}, written by `trtcal calibrate` beside the cache)"
    )
    raise CacheFormatError(
        f"{what} belongs to the SmoothQuant-smoothed copy of {model}: it names {len(smoothed)} smoothing tensor(s) "
        f"(e.g. {smoothed[0]!r}) that {model} does not have. Its scales are wrong for {model}; {use}, or "
        "recalibrate with --smooth off"
    )
