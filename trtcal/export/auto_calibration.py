"""`auto` and the quality verdict inside a calibration: candidates from the histograms, slices by sample id.

`auto_and_verdict` is what `calibrate` calls after the statistics: it computes the candidates'
tables from the same histograms, runs the auto search when "auto" was requested (search slice),
and judges every requested method, every candidate and auto on the verdict slice (held out from
the search). It returns plain data for ranges.json, the manifest and the store entry.

The slices are the `slice_size` rows of the calibration batch whose salted sha256 of the sample id
is smallest (`trtcal.core.auto_search.search_slices`): the same rows whatever the row order or the
number of processes that collected the statistics. The statistics themselves use every row (so
an explicit method's cache is the same with or without auto); "held out" means held out from
the auto search, not from the histograms.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from trtcal.core.auto_search import CANDIDATES, candidate_amax, search_slices
from trtcal.core.histogram import Histogram
from trtcal.core.ranges import apply_manual_ranges
from trtcal.errors import ModelError, TrtcalError
from trtcal.export.auto import AutoConfig, AutoResult, AutoSimulator, FeedLayout, search_auto, verdict
from trtcal.export.qdq import QdqConfig
from trtcal.progress import NO_PROGRESS, ProgressCallback

__all__ = ["AUTO", "QualityError", "AutoOutcome", "candidate_tables", "auto_and_verdict", "check_min_sqnr", "verdict_lines"]

log = logging.getLogger(__name__)

AUTO = "auto"
_SAFE_AMAX = 127.0  # the pipeline's zero-range default: scale 1.0 (see trtcal.orchestrator.calibrate.SAFE_AMAX)
_TINY = float(np.finfo(np.float32).tiny)


class QualityError(TrtcalError):
    """The calibration's held-out quality is below the bar the user set (--min-sqnr); nothing was published."""


@dataclass(frozen=True)
class AutoOutcome:
    """auto_amax: tensor -> amax (None when auto was not requested). tensors: ranges.json's per-tensor "auto"
    entries. search: the search record. verdict: the verdict record. timings: stage -> seconds."""

    auto_amax: dict[str, float] | None
    tensors: dict[str, dict[str, Any]]
    search: dict[str, Any] | None
    verdict: dict[str, Any] | None
    timings: dict[str, float] = field(default_factory=dict)


def _safe(amax: float) -> float:
    # Beyond float32's range (a mask fill, say) the scale is not representable: use the safe default.
    if not (np.isfinite(amax) and abs(amax) <= float(np.finfo(np.float32).max)):
        return _SAFE_AMAX
    scale = np.float32(np.float32(amax) / np.float32(127.0))
    return float(amax) if (np.isfinite(scale) and float(scale) >= _TINY) else _SAFE_AMAX


def candidate_tables(
    tensor_names: Sequence[str], histograms: Mapping[str, Histogram], manual_ranges: Mapping[str, float]
) -> dict[str, dict[str, float]]:
    """candidate -> tensor -> amax (zero-range default and manual ranges applied, as for any method)."""
    tables: dict[str, dict[str, float]] = {c.name: {} for c in CANDIDATES}
    for name in tensor_names:
        hist = histograms[name]
        for c, amax in candidate_amax(hist.counts, hist.hist_amax).items():
            tables[c][name] = _safe(amax)
    return {c: apply_manual_ranges(t, manual_ranges) for c, t in tables.items()}


def _rows(arrays: Mapping[str, npt.NDArray[Any]], rows: Sequence[int]) -> dict[str, npt.NDArray[Any]]:
    index = np.asarray(rows, dtype=np.intp)
    return {k: np.ascontiguousarray(v[index]) for k, v in arrays.items()}


def auto_and_verdict(
    model: Any,
    tensor_names: Sequence[str],
    histograms: Mapping[str, Histogram],
    sample_ids: Sequence[str],
    arrays: Mapping[str, npt.NDArray[Any]],
    requested: Mapping[str, Mapping[str, float]],
    *,
    manual_ranges: Mapping[str, float] | None = None,
    run_auto: bool,
    default: str,
    judge: bool = True,
    config: AutoConfig | None = None,
    qdq_config: QdqConfig | None = None,
    progress: ProgressCallback = NO_PROGRESS,
    feed: FeedLayout | None = None,
) -> AutoOutcome:
    """Run auto (when `run_auto`) and the verdict over the requested methods, the candidates and auto.

    Args:
        arrays: input name -> every row of the calibration batch (memory-mapped is fine: only the
            slices' rows are read).
        requested: method -> tensor -> amax of the explicitly requested methods (auto excluded).
        default: the label written as calibration.cache ("auto" or a requested method).
        judge: run the verdict (False: auto alone; `AutoOutcome.verdict` is None). feed: the batch's
            layout (declared batch axes, constant inputs); None feeds the rows as they are.
    """
    config = config or AutoConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    have_histograms = all(name in histograms for name in tensor_names)
    if run_auto and not have_histograms:
        raise TrtcalError("auto needs the histograms of every calibrated tensor")
    # Without histograms (only minmax was asked for) the verdict judges the requested methods alone.
    candidates = candidate_tables(tensor_names, histograms, manual_ranges or {}) if have_histograms else {}
    search_rows, verdict_rows = search_slices(sample_ids, config.slice_size)
    try:
        simulator = AutoSimulator(model, tensor_names, qdq_config, micro_batch=config.micro_batch, intra_op_threads=config.intra_op_threads, feed=feed)
    except ModelError as exc:  # e.g. no float output, or ONNX Runtime cannot run the Q/DQ model (custom ops)
        return _unjudged(str(exc), candidates, run_auto=run_auto, judge=judge, default=default)
    timings["auto_setup"] = time.perf_counter() - t0

    result: AutoResult | None = None
    if run_auto:
        t0 = time.perf_counter()
        try:
            result = search_auto(
                model, candidates, _rows(arrays, search_rows), config=config, simulator=simulator,
                search_ids=[sample_ids[i] for i in search_rows], progress=progress,
            )
        except Exception as exc:  # ONNX Runtime cannot run the Q/DQ model on these rows
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            return _unjudged(_reason(exc), candidates, run_auto=run_auto, judge=judge, default=default)
        timings["auto_search"] = time.perf_counter() - t0

    tensors = {} if result is None else {
        t: {**info, "candidates_amax": {c: candidates[c][t] for c in candidates}} for t, info in result.tensors.items()
    }
    if not judge:
        return AutoOutcome(
            auto_amax=None if result is None else result.amax, tensors=tensors,
            search=None if result is None else result.search, verdict=None, timings=timings,
        )
    t0 = time.perf_counter()
    tables: dict[str, Mapping[str, float]] = {} if result is None else {AUTO: result.amax}
    tables.update(requested)
    for name, table in candidates.items():
        tables.setdefault(name, table)  # a requested method of the same name is the same table
    try:
        judged = _judge(simulator, tables, arrays, sample_ids, verdict_rows, default, bool(candidates), progress)
    except Exception as exc:  # ONNX Runtime cannot run the model on these rows (e.g. a batch size fixed inside)
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        return _unjudged(_reason(exc), candidates, run_auto=False, judge=judge, default=default, auto=result)
    timings["verdict"] = time.perf_counter() - t0
    return AutoOutcome(
        auto_amax=None if result is None else result.amax, tensors=tensors,
        search=None if result is None else result.search, verdict=judged, timings=timings,
    )


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]  # ONNX Runtime's messages are long and multi-line


def _unjudged(
    reason: str, candidates: Mapping[str, Mapping[str, float]], *, run_auto: bool, judge: bool, default: str,
    auto: AutoResult | None = None,
) -> AutoOutcome:
    """The model cannot be simulated: auto writes entropy2 (recorded), the verdict records why it is missing.
    With `auto` (a search that succeeded before the verdict failed) its result is kept."""
    if auto is not None:
        missing: dict[str, Any] | None = {"rows": {}, "default": default, "best": None, "skipped": reason,
                                          "warning": f"the quality verdict could not run: {reason}"} if judge else None
        log.warning("the quality verdict could not run: %s", reason)
        return AutoOutcome(auto_amax=auto.amax, tensors={}, search=auto.search, verdict=missing)
    fallback = "entropy2"
    message = f"the Q/DQ model could not be simulated, so {'auto fell back to ' + fallback + ' and ' if run_auto else ''}no method was judged: {reason}"
    log.warning("%s", message)
    if run_auto and fallback not in candidates:
        raise TrtcalError(f"auto needs the histograms of every calibrated tensor ({message})")
    search = {"fallback": fallback, "reason": reason} if run_auto else None
    judged: dict[str, Any] | None = {"rows": {}, "default": default, "best": None, "warning": message, "skipped": reason} if judge else None
    return AutoOutcome(
        auto_amax=dict(candidates[fallback]) if run_auto else None, tensors={}, search=search, verdict=judged,
    )


def _judge(
    simulator: AutoSimulator, tables: Mapping[str, Mapping[str, float]], arrays: Mapping[str, npt.NDArray[Any]],
    sample_ids: Sequence[str], verdict_rows: Sequence[int], default: str, have_candidates: bool,
    progress: ProgressCallback,
) -> dict[str, Any]:
    progress.start("verdict", None)
    try:
        judged = verdict(
            simulator, tables, _rows(arrays, verdict_rows), default=default, verdict_ids=[sample_ids[i] for i in verdict_rows],
        )
    finally:
        progress.finish("verdict")
    if not have_candidates:
        judged["note"] = "only histogram-free methods were requested (pass 2 skipped): the candidates were not judged"
    if judged["warning"]:
        log.warning("%s", judged["warning"])
    return judged


def check_min_sqnr(judged: Mapping[str, Any], min_sqnr_db: float | None) -> None:
    """Raise QualityError when the default's worst output SQNR on the verdict slice is below `min_sqnr_db`."""
    if min_sqnr_db is None:
        return
    default = judged["default"]
    if default not in judged.get("rows", {}):
        raise QualityError(f"--min-sqnr {min_sqnr_db:g} dB cannot be checked: {judged.get('warning')}; nothing was published")
    worst = judged["rows"][default]["min_sqnr_db"]
    if worst < min_sqnr_db:
        best = judged["best"]
        raise QualityError(
            f"--min-sqnr {min_sqnr_db:g} dB not met: the default {default!r} reaches {worst:.2f} dB on its worst output "
            f"on the held-out slice (best method {best!r}: {judged['rows'][best]['min_sqnr_db']:.2f} dB); nothing was "
            "published. Try more or more representative calibration data, another method (-a), or a float fallback "
            "for the most sensitive layers (trtcal sensitivity)"
        )


def verdict_lines(judged: Mapping[str, Any]) -> list[str]:
    """The verdict as a few printable lines: one per label (best first), then the warning if any."""
    rows = judged["rows"]
    if not rows:
        return [f"warning: {judged.get('warning')}"]
    order = sorted(rows, key=lambda label: (-rows[label]["mean_sqnr_db"], label))
    lines = [f"quality verdict (held-out slice of {len(judged.get('verdict_ids', []))} samples, exact Q/DQ simulation)"]
    width = max(len(label) for label in rows)
    for label in order:
        outputs = rows[label]["outputs"]
        parts = []
        for name, q in outputs.items():
            text = f"{name}: SQNR {q['sqnr_db']:.2f} dB, cosine {q['cosine']:.4f}"
            if q.get("argmax_agreement") is not None:
                text += f", argmax agreement {q['argmax_agreement']:.3f}"
            parts.append(text)
        marks = " (written)" if label == judged["default"] else ""
        lines.append(f"  {label.ljust(width)}  {'; '.join(parts)}{marks}")
    if judged.get("warning"):
        lines.append(f"warning: {judged['warning']}")
    return lines
