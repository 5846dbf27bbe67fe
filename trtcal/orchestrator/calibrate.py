"""`trtcal.calibrate()`: FP32 statistics once, every requested method, artifacts published atomically.

The artifacts (caches, ranges.json, histograms.npy, manifest.json) are encoded in memory by
`trtcal.export.artifacts` and carried in `CalibrationResult.files`; with `output_dir` they are
written into it file by file (`trtcal._io.publish_dir`: each file atomic, the manifest last, nothing
but trtcal's own names touched).

Tensors whose calibrated amax is zero (all-zero activations) or whose float32 scale would not be a
positive normal number get `SAFE_AMAX` = 127.0, i.e. scale 1.0, the value trtcal's weight scales
(`trtcal.core.weights.SAFE_SCALE`) and ONNX Runtime's quantizer use: zeros quantize exactly under
any scale, and a unit scale cannot saturate values that calibration never saw. ranges.json marks
them with ``"source": "zero_range_default"``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trtcal._io import check_output_dir, publish_dir
from trtcal.batch import open_any
from trtcal.config import AUTO, CalibrationConfig
from trtcal.core.histogram import Histogram, TensorStats
from trtcal.core.ranges import apply_manual_ranges, check_manual_range_names
from trtcal.core.scales import compute_amax
from trtcal.core.weights import SAFE_SCALE
from trtcal.errors import ConfigError, DataError, ModelError
from trtcal.export.artifacts import (
    ARTIFACT_NAMES,
    MANIFEST,
    OWNED_BY,
    artifact_json,
    build_manifest,
    encode_artifacts,
    is_artifact_name,
)
from trtcal.progress import NO_PROGRESS, ProgressCallback

if TYPE_CHECKING:
    from trtcal.batch import CalibrationBatch
    from trtcal.model import LoadedModel
    from trtcal.runners.onnxruntime import OnnxRuntimeRunner

__all__ = ["CalibrationResult", "calibrate", "SAFE_AMAX", "ARTIFACT_NAMES", "needs_histograms"]

logger = logging.getLogger(__name__)

SAFE_AMAX = float(np.float32(SAFE_SCALE) * np.float32(127.0))
_TINY_SCALE = float(np.finfo(np.float32).tiny)
# Methods whose amax is the pass-1 max |x|: when only these are asked for, pass 2 is skipped.
_HISTOGRAM_FREE_METHODS = frozenset({"minmax"})


def needs_histograms(config: CalibrationConfig) -> bool:
    """Whether pass 2 runs: some requested method searches a histogram (all but minmax)."""
    return not set(config.algorithms) <= _HISTOGRAM_FREE_METHODS


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """What `calibrate` computed (and wrote, with `output_dir`).

    Attributes:
        amax: method -> tensor -> amax written to that method's cache (manual ranges and the
            zero-range default applied), tensors in graph order.
        caches: method -> the TensorRT cache bytes.
        files: artifact name -> bytes (caches, ranges.json, histograms.npy, manifest.json): what
            `output_dir` holds, or would hold.
        stats: tensor -> pass-1 statistics.
        histograms: tensor -> pass-2 histogram (empty when only histogram-free methods ran).
        tensor_names: calibrated tensors in graph order.
        smoothing: when `config.smooth` smoothed the model (docs/qdq.md, "Smoothing"): alpha, the
            smoothed tensors and the smoothed model's sha256; the caches, ranges and `amax` are then of
            the smoothed copy, whose bytes are files["model.smoothed.onnx"]. None: not smoothed.
        output_dir: where the artifacts are (None when nothing was written); paths: name -> path.
        timings: stage -> seconds.  manifest: the manifest's content.
    """

    amax: dict[str, dict[str, float]]
    caches: dict[str, bytes]
    files: dict[str, bytes]
    stats: dict[str, TensorStats]
    histograms: dict[str, Histogram]
    tensor_names: tuple[str, ...]
    output_dir: Path | None
    paths: dict[str, Path]
    timings: dict[str, float]
    manifest: dict[str, Any] = field(default_factory=dict)
    smoothing: dict[str, Any] | None = None  # what was smoothed (the manifest's "smoothing"); None: nothing

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self.amax)


# ---------------------------------------------------------------------------------------------
# Scales


def safe_amax(amax: float) -> tuple[float, bool]:
    """(amax to write, whether the zero-range default replaced it)."""
    scale = np.float32(np.float32(amax) / np.float32(127.0)) if np.isfinite(amax) else np.float32(0.0)
    if not (np.isfinite(scale) and float(scale) >= _TINY_SCALE):
        return SAFE_AMAX, True
    return float(amax), False


def compute_method_amax(
    tensor_names: Sequence[str],
    stats: Mapping[str, TensorStats],
    histograms: Mapping[str, Histogram],
    config: CalibrationConfig,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]]:
    """method -> tensor -> amax, and method -> tensor -> source ("calibrated"/"zero_range_default"/"manual")."""
    amax: dict[str, dict[str, float]] = {}
    sources: dict[str, dict[str, str]] = {}
    for method in config.algorithms:
        if method == AUTO:
            continue  # chosen by measurement after the histogram methods (_auto_and_verdict)
        params = dict(config.method_params.get(method, {}))
        values: dict[str, float] = {}
        source: dict[str, str] = {}
        for name in tensor_names:
            if method in _HISTOGRAM_FREE_METHODS and name not in histograms:
                raw = stats[name].amax
            else:
                hist = histograms[name]
                raw = compute_amax(hist.counts, hist.hist_amax, method, **params)
            values[name], replaced = safe_amax(raw)
            source[name] = "zero_range_default" if replaced else "calibrated"
        final = apply_manual_ranges(values, config.manual_ranges)
        for name in config.manual_ranges:
            source[name] = "manual"
        amax[method] = final
        sources[method] = source
    return amax, sources


def _scales_and_artifacts(
    cfg: CalibrationConfig, loaded: LoadedModel, cal_batch: CalibrationBatch, tensor_names: Sequence[str],
    stats: Mapping[str, TensorStats], histograms: Mapping[str, Histogram], progress: ProgressCallback,
    timings: dict[str, float],
) -> tuple[dict[str, dict[str, float]], dict[str, bytes], dict[str, bytes], Any]:
    """Every method's amax (auto and the verdict included), the caches and the artifacts but the manifest."""
    t0 = time.perf_counter()
    amax, sources = compute_method_amax(tensor_names, stats, histograms, cfg)
    timings["scales"] = time.perf_counter() - t0
    outcome = _auto_and_verdict(cfg, loaded, cal_batch, tensor_names, stats, histograms, amax, sources, progress)
    if outcome is not None:
        timings.update(outcome.timings)
    t0 = time.perf_counter()
    amax = {m: amax[m] for m in cfg.algorithms}
    caches, files = encode_artifacts(tensor_names, stats, histograms, amax, sources, cfg, auto=outcome)
    timings["scales"] += time.perf_counter() - t0
    return amax, caches, files, outcome


def _auto_and_verdict(
    cfg: CalibrationConfig, loaded: LoadedModel, cal_batch: CalibrationBatch, tensor_names: Sequence[str],
    stats: Mapping[str, TensorStats], histograms: Mapping[str, Histogram], amax: dict[str, dict[str, float]],
    sources: dict[str, dict[str, str]], progress: ProgressCallback,
) -> Any:
    """Run auto (when asked for) and the quality verdict; add auto's table to `amax`/`sources` in place.

    Raises QualityError (before anything is written) when `cfg.min_sqnr` is not met.
    """
    if AUTO not in cfg.algorithms and not cfg.verdict:
        return None
    from trtcal.export.auto import AutoConfig
    from trtcal.export.auto_calibration import auto_and_verdict, check_min_sqnr
    from trtcal.model import model_inputs
    from trtcal.runners.base import batch_layout

    # Declared batch axes and constant inputs: the simulator feeds the rows as the runner does.
    layout = batch_layout(model_inputs(loaded.proto), cal_batch, cal_batch.source)
    plain = layout.stacked and not layout.batch_axes and not layout.constants
    micro_batch = layout.micro_batch(min(AutoConfig().micro_batch, cfg.micro_batch))  # a model may fix its batch size
    outcome = auto_and_verdict(
        loaded.proto, tensor_names, histograms, cal_batch.sample_ids,
        {name: cal_batch.array(name) for name in cal_batch.input_names},
        {m: amax[m] for m in cfg.algorithms if m != AUTO}, manual_ranges=cfg.manual_ranges,
        run_auto=AUTO in cfg.algorithms, default=cfg.algorithms[0], judge=cfg.verdict, progress=progress,
        config=AutoConfig(micro_batch=micro_batch), feed=None if plain else layout,
    )
    if outcome.auto_amax is not None:
        amax[AUTO] = apply_manual_ranges(outcome.auto_amax, cfg.manual_ranges)
        sources[AUTO] = {
            name: "manual" if name in cfg.manual_ranges else ("zero_range_default" if safe_amax(stats[name].amax)[1] else "calibrated")
            for name in amax[AUTO]
        }
    if outcome.verdict is not None:
        check_min_sqnr(outcome.verdict, cfg.min_sqnr)
    return outcome


# ---------------------------------------------------------------------------------------------
# Inputs


def _runner_for(cfg: CalibrationConfig, loaded: LoadedModel) -> OnnxRuntimeRunner:
    """The runner `trtcal.runners.factory.make_runner` picks for the device ("auto")."""
    from trtcal.runners.factory import make_runner

    return make_runner(loaded, tensors=cfg.tensors, device=cfg.device)  # type: ignore[return-value]


def _can_spawn() -> bool:
    """multiprocessing's spawn re-imports the main module from its file: a script read from stdin
    (`python - < x.py`) has none, and its children would die at start."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.exists(main_file)


def _worker_batch_file(loaded: LoadedModel, cal_batch: CalibrationBatch) -> str | None:
    """The local batch file worker processes can open themselves (with the model file), or None."""
    source = cal_batch.source
    if "://" in source or not os.path.isfile(loaded.source) or not os.path.isfile(source):
        return None
    if not source.lower().endswith((".arrow", ".npy")) or cal_batch.row_range != (0, cal_batch.total_rows):
        return None
    return source


def _collect_in_workers(
    cfg: CalibrationConfig, loaded: LoadedModel, runner: OnnxRuntimeRunner, source: str, num_rows: int,
    micro_batch: int, workers: int, need_histograms: bool, progress: ProgressCallback,
) -> tuple[dict[str, TensorStats], dict[str, Any]]:
    """Both passes in `workers` processes on contiguous slices, merged exactly (integer counts, max/min)."""
    from trtcal.runners.data_parallel import DataParallelStatistics, WorkerSpec

    spec = WorkerSpec(
        model=loaded.source, batch=source, input_name=sorted(runner.inputs)[0], runner="onnxruntime", device="cpu",
        tensors=cfg.tensors, intra_op_num_threads=max(1, (os.cpu_count() or 1) // workers),
    )
    logger.info("collecting statistics in %d worker processes", workers)
    with DataParallelStatistics(spec, ["cpu"] * workers) as pool:
        stats, counts = pool.collect(
            num_rows, micro_batch=micro_batch, num_bins=cfg.num_bins, nonfinite=cfg.nonfinite,  # type: ignore[arg-type]
            progress=progress, histograms=need_histograms,
        )
    if set(stats) != set(runner.tensor_names):
        raise ModelError(f"worker processes calibrated other tensors than this process: {sorted(set(stats) ^ set(runner.tensor_names))[:5]}")
    return stats, counts


def _explain_empty_selection(loaded: LoadedModel, cfg: CalibrationConfig) -> None:
    """ModelError naming why no tensor is selected (and the If/Loop/Scan bodies), when that is so."""
    from trtcal.export.graph_rules import iter_subgraphs
    from trtcal.model import select_tensors

    if select_tensors(loaded.proto, cfg.tensors):
        return
    bodies = [label for label, _ in iter_subgraphs(loaded.proto.graph)]
    why = f"tensors={cfg.tensors!r} selects no floating-point activation of the top-level graph"
    if bodies:
        why += f"; tensors inside the If/Loop/Scan bodies {bodies[:4]} cannot be calibrated"
    raise ModelError(f"{loaded.source}: nothing to calibrate: {why}. Choose other tensors (--tensors all)")


# ---------------------------------------------------------------------------------------------
# The pipeline


def calibrate(
    model: Any,
    batch: Any,
    *,
    config: CalibrationConfig | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    progress: ProgressCallback = NO_PROGRESS,
    force: bool = False,
    **overrides: Any,
) -> CalibrationResult:
    """Calibrate `model` on `batch`: collect FP32 statistics once, compute every requested method.

    Args:
        model: ONNX model path, bytes or ModelProto.
        batch: a `CalibrationBatch`, a path/URL of an `.arrow` batch, a local `.npy`/`.npz`, or a
            mapping input name -> array.
        config: a `CalibrationConfig` (default: its defaults).
        output_dir: where to publish the artifacts (None: compute only). trtcal's files are written
            one by one, each atomically, the manifest last; other files there (the user's,
            `trtcal eval`'s evaluation.json) are kept. A non-empty directory that is not a trtcal
            output is refused unless `force`.
        force: write into a non-empty directory that holds no trtcal output.
        progress: receives "statistics" and "histograms" stages in samples.
        overrides: fields of `CalibrationConfig` (``algorithms=("entropy2", "minmax")``, ``processes=4``, …)
            replacing those of `config`; None means "not given". An unknown name is a ConfigError.

    Returns:
        CalibrationResult.

    Raises:
        ConfigError, DataError (incl. NonFiniteError), ModelError, BackendUnavailableError,
        StorageError. Nothing is left in `output_dir` when any of them is raised.
    """
    from trtcal.model import load_model

    cfg = (config or CalibrationConfig()).with_overrides(**overrides)

    out_path = None
    if output_dir is not None:
        if "://" in os.fspath(output_dir):
            raise ConfigError(f"output_dir must be a local directory, got {os.fspath(output_dir)!r}; publish to a store instead")
        out_path = Path(output_dir).absolute()
        check_output_dir(out_path, OWNED_BY, "output", force=force)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load_model(model)
    if cfg.manual_ranges:
        check_manual_range_names(cfg.manual_ranges, _tensor_names(loaded.proto) | _smoothed_names(cfg, loaded),
                                 model=f"model {loaded.source}")
    try:
        runner = _runner_for(cfg, loaded)
    except ModelError:
        _explain_empty_selection(loaded, cfg)
        raise
    timings["load_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cal_batch = open_any(batch, sorted(runner.inputs))
    try:
        with contextlib.ExitStack() as cleanup:  # a smoothed copy's work folder lives until the passes are done
            return _calibrate_open_batch(cfg, loaded, runner, cal_batch, out_path, progress, timings, t0, cleanup)
    finally:
        if cal_batch is not batch:
            cal_batch.close()  # opened here: unmap it now rather than at garbage collection


def _tensor_names(model: Any) -> set[str]:
    graph = model.graph
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.output)
    names.discard("")
    return names


def _calibrate_open_batch(
    cfg: CalibrationConfig,
    loaded: LoadedModel,
    runner: OnnxRuntimeRunner,
    cal_batch: CalibrationBatch,
    out_path: Path | None,
    progress: ProgressCallback,
    timings: dict[str, float],
    t0: float,
    cleanup: contextlib.ExitStack,
) -> CalibrationResult:
    if cal_batch.num_rows == 0:
        raise DataError(f"calibration batch {cal_batch.source!r} holds no rows; calibration needs at least one sample")
    layout = runner.layout(cal_batch)
    timings["open_batch"] = time.perf_counter() - t0
    original, run_cfg = loaded, cfg  # run_cfg: the tensors exposed (a listed smoothed tensor adds its copy)
    smoothed = _smoothed_copy(cfg, loaded, cal_batch, layout, progress, cleanup)
    if smoothed is not None:  # from here on everything is of the smoothed copy
        close_first = getattr(runner, "close", None)
        if close_first is not None:
            close_first()
        loaded, timings["smoothing"] = smoothed.loaded, smoothed.seconds
        run_cfg = _with_smoothed_tensors(cfg, smoothed.record["sites"])
        runner = _runner_for(run_cfg, loaded)
        layout = runner.layout(cal_batch)
    # Samples per run: the micro-batch, fewer when the selected tensors would exceed the activation budget.
    budget_mib = runner.default_activation_budget_mib if cfg.activation_budget_mib is None else cfg.activation_budget_mib
    micro_batch = runner.budgeted_micro_batch(cal_batch, cfg.micro_batch, budget_mib << 20)
    logger.info(
        "calibrating %d tensors of %s on %d samples (%s), micro-batch %d",
        len(runner.tensor_names), loaded.source, cal_batch.num_rows, cal_batch.fingerprint, micro_batch,
    )

    stats, histograms, processes = _collect(run_cfg, loaded, runner, cal_batch, micro_batch, progress, timings)

    tensor_names = runner.tensor_names
    amax, caches, files, outcome = _scales_and_artifacts(cfg, loaded, cal_batch, tensor_names, stats, histograms, progress, timings)
    if smoothed is not None:
        from trtcal.export.smoothed_names import SMOOTHED_MODEL

        files[SMOOTHED_MODEL] = smoothed.model_bytes
    manifest = build_manifest(
        model_sha256=original.sha256, model_source=original.source, batch=cal_batch, config=cfg,
        runner={**runner.info, "micro_batch": layout.micro_batch(cfg.micro_batch), "samples_per_run": micro_batch,
                "processes": processes},
        num_tensors=len(tensor_names), files=files, verdict=None if outcome is None else outcome.verdict,
        smoothing=None if smoothed is None else smoothed.record,
    )
    # The manifest's own timing of the write is measured up to the rename, not included.
    manifest["timings_s"] = {k: round(v, 6) for k, v in timings.items()}
    files[MANIFEST] = artifact_json(manifest)
    paths: dict[str, Path] = {}
    if out_path is not None:
        t0 = time.perf_counter()
        # `force` was checked with the caller's value before computing (check_output_dir in calibrate)
        paths = publish_dir(out_path, files, owned_by=OWNED_BY, is_own_name=is_artifact_name, force=True)
        timings["write"] = time.perf_counter() - t0
        logger.info("wrote %d artifacts to %s", len(paths), out_path)
    return CalibrationResult(
        amax=amax, caches=caches, files=files, stats=stats, histograms=histograms, tensor_names=tensor_names,
        output_dir=out_path, paths=paths, timings=timings, manifest=manifest,
        smoothing=None if smoothed is None else smoothed.record,
    )


def _collect(
    cfg: CalibrationConfig, loaded: LoadedModel, runner: OnnxRuntimeRunner, cal_batch: CalibrationBatch,
    micro_batch: int, progress: ProgressCallback, timings: dict[str, float],
) -> tuple[dict[str, TensorStats], dict[str, Histogram], int]:
    """Pass 1 and (when a method needs it) pass 2, in worker processes or here; (stats, histograms, processes)."""
    need_histograms = needs_histograms(cfg)
    histograms: dict[str, Histogram] = {}
    workers = cfg.resolved_processes() if cfg.device == "cpu" else 1
    source = _worker_batch_file(loaded, cal_batch) if workers > 1 and _can_spawn() else None
    if workers > 1 and source is None:
        logger.info(
            "collecting in this process: %d processes need a local model file, a local .arrow/.npy batch and a "
            "main module that is a file (not stdin)", workers,
        )
    if source is not None:
        t0 = time.perf_counter()
        stats, counts = _collect_in_workers(
            cfg, loaded, runner, source, cal_batch.num_rows, micro_batch, workers,
            need_histograms, progress,
        )
        timings["statistics+histograms" if need_histograms else "statistics"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        stats = runner.collect_stats(
            cal_batch, micro_batch=micro_batch, nonfinite=cfg.nonfinite, progress=progress  # type: ignore[arg-type]
        )
        timings["statistics"] = time.perf_counter() - t0
        if need_histograms:
            t0 = time.perf_counter()
            counts = runner.collect_counts(
                cal_batch, {n: stats[n].amax for n in runner.tensor_names}, num_bins=cfg.num_bins,
                micro_batch=micro_batch, nonfinite=cfg.nonfinite, progress=progress,  # type: ignore[arg-type]
            )
            timings["histograms"] = time.perf_counter() - t0
    close = getattr(runner, "close", None)
    if close is not None:
        close()  # its session and last micro-batch: not needed by the search that follows
    if need_histograms:
        histograms = {
            n: Histogram(counts=counts[n], hist_amax=stats[n].amax, stats=stats[n]) for n in runner.tensor_names
        }
    return stats, histograms, workers if source else 1


def _smoothed_names(cfg: CalibrationConfig, loaded: LoadedModel) -> set[str]:
    """The tensors smoothing adds (x -> x_smoothed): manual ranges may name them."""
    if cfg.smooth == "off":
        return set()
    from trtcal.export.smoothed_names import SMOOTHED_SUFFIX
    from trtcal.export.smoothing import smoothing_groups

    return {name + SMOOTHED_SUFFIX for name in smoothing_groups(loaded.proto)}


def _with_smoothed_tensors(cfg: CalibrationConfig, sites: Any) -> CalibrationConfig:
    """A tensor list naming a smoothed tensor x also exposes x_smoothed, which its MatMuls now read;
    a manual range of x does not reach them (warned)."""
    from dataclasses import replace

    from trtcal.export.smoothed_names import SMOOTHED_SUFFIX

    for name in sorted(set(cfg.manual_ranges) & set(sites)):
        logger.warning(
            "manual range of %r: the model is smoothed, and its MatMuls read %r, which the range does not cover; "
            "give %r a range too, or calibrate with --smooth off", name, name + SMOOTHED_SUFFIX, name + SMOOTHED_SUFFIX,
        )
    if isinstance(cfg.tensors, str):
        return cfg
    extra = tuple(n + SMOOTHED_SUFFIX for n in cfg.tensors if n in sites and n + SMOOTHED_SUFFIX not in cfg.tensors)
    return replace(cfg, tensors=cfg.tensors + extra) if extra else cfg


def _smoothed_copy(
    cfg: CalibrationConfig, loaded: LoadedModel, cal_batch: CalibrationBatch, layout: Any,
    progress: ProgressCallback, cleanup: contextlib.ExitStack,
) -> Any:
    """`trtcal.orchestrator.smoothing_pass.smooth_for_calibration` in a temp folder that `cleanup` removes."""
    if cfg.smooth == "off":
        return None
    import shutil

    from trtcal._io import owned_temp_dir
    from trtcal.export.smoothing import smoothing_sites
    from trtcal.orchestrator.smoothing_pass import smooth_for_calibration

    if not smoothing_sites(loaded.proto, cfg.smooth, model_label=f"model {loaded.source}"):
        return None  # no temp folder for a model without the pattern (every CNN)
    workdir = owned_temp_dir("smooth")
    cleanup.callback(shutil.rmtree, workdir, True)
    return smooth_for_calibration(cfg, loaded, cal_batch, layout, Path(workdir), progress)
