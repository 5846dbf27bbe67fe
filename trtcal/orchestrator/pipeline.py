"""`trtcal.calibrate()`: FP32 statistics once, every requested method, artifacts published atomically.

Artifacts written into `output_dir` (all at once: built in a temp dir next to it, then renamed):

* ``calibration.<method>.cache`` per method (TensorRT text cache) and ``calibration.cache``
  (the same bytes as the first method's);
* ``ranges.json``: per tensor the final amax per method, observed min/max/amax, value and
  NaN/Inf counts, a histogram summary and its row in ``histograms.npy``;
* ``histograms.npy``: the full int64 counts, shape ``[num_tensors, num_bins]``, rows in
  ``ranges.json["histogram_tensors"]`` order, bins over ``[0, hist_amax]`` of each tensor (a plain
  .npy: its bytes are deterministic, unlike an .npz whose zip entries carry timestamps);
* ``manifest.json``: the inputs' identities (model sha256, batch fingerprint and spec), config,
  runner kind and version, trtcal version, timings per stage, sha256 and size of every artifact.

Every file but ``manifest.json`` is byte-identical for the same model, batch, config and runner;
``manifest.json`` differs only in ``timings_s``. JSON is canonical (sorted keys, fixed separators,
floats as Python's shortest round-trip repr, non-finite values as null).

Tensors whose calibrated amax is zero (all-zero activations) or whose float32 scale would not be a
positive normal number get `SAFE_AMAX` = 127.0, i.e. scale 1.0, the value trtcal's weight scales
(`trtcal.core.weights.SAFE_SCALE`) and ONNX Runtime's quantizer use: zeros quantize exactly under
any scale, and a unit scale cannot saturate values that calibration never saw. ranges.json marks
them with ``"source": "zero_range_default"``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal._version import FORMAT_VERSION, __version__
from trtcal.core.cache_format import write_trt_cache
from trtcal.core.histogram import Histogram, TensorStats
from trtcal.core.ranges import apply_manual_ranges
from trtcal.core.scales import compute_amax
from trtcal.core.weights import SAFE_SCALE
from trtcal.errors import ConfigError, DataError, ModelError
from trtcal.orchestrator.config import CalibrationConfig
from trtcal.progress import NO_PROGRESS, ProgressCallback

if TYPE_CHECKING:
    from trtcal.runners.onnxruntime import LoadedModel, OnnxRuntimeRunner
    from trtcal.workers.batch_format import CalibrationBatch

__all__ = ["CalibrationResult", "calibrate", "SAFE_AMAX", "ARTIFACT_NAMES", "resolve_batch"]

logger = logging.getLogger(__name__)

SAFE_AMAX = float(np.float32(SAFE_SCALE) * np.float32(127.0))
_TINY_SCALE = float(np.finfo(np.float32).tiny)
# Methods whose amax is the pass-1 max |x|: when only these are asked for, pass 2 is skipped.
_HISTOGRAM_FREE_METHODS = frozenset({"minmax"})
MANIFEST = "manifest.json"
RANGES = "ranges.json"
HISTOGRAMS = "histograms.npy"
DEFAULT_CACHE = "calibration.cache"


def cache_name(method: str) -> str:
    return f"calibration.{method}.cache"


ARTIFACT_NAMES = (MANIFEST, RANGES, HISTOGRAMS, DEFAULT_CACHE)


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """What `calibrate` computed and wrote.

    Attributes:
        amax: method -> tensor -> amax written to that method's cache (manual ranges and the
            zero-range default applied), tensors in graph order.
        caches: method -> the TensorRT cache bytes.
        stats: tensor -> pass-1 statistics.
        histograms: tensor -> pass-2 histogram (empty when only histogram-free methods ran).
        tensor_names: calibrated tensors in graph order.
        output_dir: where the artifacts are (None when nothing was written); paths: name -> path.
        timings: stage -> seconds.  manifest: the manifest's content.
    """

    amax: dict[str, dict[str, float]]
    caches: dict[str, bytes]
    stats: dict[str, TensorStats]
    histograms: dict[str, Histogram]
    tensor_names: tuple[str, ...]
    output_dir: Path | None
    paths: dict[str, Path]
    timings: dict[str, float]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self.amax)


# ---------------------------------------------------------------------------------------------
# Pure helpers


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, fixed separators, UTF-8, trailing newline; NaN/Inf refused (use None)."""
    return (json.dumps(obj, sort_keys=True, separators=(",", ": "), indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode(
        "utf-8"
    )


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def safe_amax(amax: float) -> tuple[float, bool]:
    """(amax to write, whether the zero-range default replaced it)."""
    scale = np.float32(np.float32(amax) / np.float32(127.0)) if np.isfinite(amax) else np.float32(0.0)
    if not (np.isfinite(scale) and float(scale) >= _TINY_SCALE):
        return SAFE_AMAX, True
    return float(amax), False


def histogram_summary(hist: Histogram, row: int) -> dict[str, Any]:
    nonzero = np.flatnonzero(hist.counts)
    return {
        "row": row,
        "num_bins": hist.num_bins,
        "hist_amax": float(hist.hist_amax),
        "total": int(hist.counts.sum()),
        "nonzero_bins": int(nonzero.size),
        "first_nonzero_bin": int(nonzero[0]) if nonzero.size else None,
        "last_nonzero_bin": int(nonzero[-1]) if nonzero.size else None,
        "zero_bin_count": int(hist.counts[0]) if hist.num_bins else 0,
    }


def _npy_bytes(array: npt.NDArray[Any]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


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


def build_ranges(
    tensor_names: Sequence[str],
    stats: Mapping[str, TensorStats],
    histograms: Mapping[str, Histogram],
    amax: Mapping[str, Mapping[str, float]],
    sources: Mapping[str, Mapping[str, str]],
    config: CalibrationConfig,
) -> dict[str, Any]:
    hist_rows = [n for n in tensor_names if n in histograms]
    tensors: dict[str, Any] = {}
    order = list(tensor_names) + [n for n in config.manual_ranges if n not in stats]
    for name in order:
        entry: dict[str, Any] = {
            "amax": {m: amax[m][name] for m in config.algorithms},
            "source": {m: sources[m][name] for m in config.algorithms},
        }
        if name in stats:
            s = stats[name]
            entry.update(
                observed_amax=float(s.amax),
                min=_finite_or_none(s.min),
                max=_finite_or_none(s.max),
                count=int(s.count),
                nan_count=int(s.nan_count),
                inf_count=int(s.inf_count),
            )
        if name in histograms:
            entry["histogram"] = histogram_summary(histograms[name], hist_rows.index(name))
        tensors[name] = entry
    return {
        "format_version": FORMAT_VERSION,
        "algorithms": list(config.algorithms),
        "num_bins": config.num_bins,
        "tensor_order": order,
        "histogram_file": HISTOGRAMS if hist_rows else None,
        "histogram_tensors": hist_rows,
        "tensors": tensors,
    }


# ---------------------------------------------------------------------------------------------
# Inputs


def resolve_batch(batch: Any, input_names: Sequence[str]) -> Any:
    """A CalibrationBatch from a batch object, a path (.arrow/.npy/.npz) or a mapping of arrays."""
    from trtcal.workers.batch_format import CalibrationBatch, batch_from_arrays, batch_from_numpy, open_batch

    if isinstance(batch, CalibrationBatch):
        return batch
    if isinstance(batch, Mapping):
        return batch_from_arrays(batch)
    if isinstance(batch, np.ndarray):
        if len(input_names) != 1:
            raise DataError(f"an array feeds one input but the model has inputs {list(input_names)}; pass a mapping")
        return batch_from_arrays({input_names[0]: batch})
    if isinstance(batch, (str, os.PathLike)):
        text = os.fspath(batch)
        suffix = Path(text.split("?")[0]).suffix.lower()
        if suffix in (".npy", ".npz"):
            if "://" in text:
                raise ConfigError(f"{text}: .npy/.npz data must be a local file; use an .arrow batch for URLs")
            if suffix == ".npy" and len(input_names) != 1:
                raise DataError(
                    f"{text} holds one unnamed array but the model has inputs {list(input_names)}; "
                    "use an .npz with one array per input name"
                )
            return batch_from_numpy(text, input_name=input_names[0] if suffix == ".npy" else None)
        return open_batch(text)
    raise ConfigError(f"batch must be a CalibrationBatch, a path/URL or a mapping of arrays, got {type(batch).__name__}")


def _runner_for(cfg: CalibrationConfig, loaded: LoadedModel) -> OnnxRuntimeRunner:
    """ONNX Runtime on the CPU, or with its CUDA provider; for "cuda" without onnxruntime-gpu, the
    PyTorch runner (trtcal's ONNX interpreter on torch, statistics computed on the GPU)."""
    from trtcal.runners.onnxruntime import OnnxRuntimeRunner

    if cfg.device != "cpu":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers() and _torch_sees_cuda():
            from trtcal.runners.torch_runner import TorchRunner

            logger.info("onnxruntime has no CUDA provider here: collecting with the PyTorch runner on %s", cfg.device)
            return TorchRunner(loaded, tensors=cfg.tensors, device=cfg.device)  # type: ignore[return-value]
    return OnnxRuntimeRunner(loaded, tensors=cfg.tensors, device=cfg.device)


def _torch_sees_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


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


# ---------------------------------------------------------------------------------------------
# Output directory


def _check_output_dir(output_dir: Path) -> None:
    """Refuse early (before any computing) to replace a directory that is not a trtcal output."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ConfigError(f"output {str(output_dir)!r} exists and is not a directory")
    entries = [p.name for p in output_dir.iterdir()]
    if entries and MANIFEST not in entries:
        raise ConfigError(
            f"output directory {str(output_dir)!r} is not empty and holds no trtcal manifest; "
            "choose a new or empty directory (trtcal only replaces its own earlier output)"
        )


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _publish_dir(output_dir: Path, files: Mapping[str, bytes]) -> dict[str, Path]:
    """Write `files` into a temp dir beside `output_dir`, then rename it into place."""
    parent = output_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    _check_output_dir(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=parent))
    old: Path | None = None
    try:
        for name, data in files.items():
            _write_file(tmp / name, data)
        os.chmod(tmp, 0o755)
        if output_dir.exists():
            if any(output_dir.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=parent))
                os.rename(output_dir, old / "previous")
            else:
                output_dir.rmdir()
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not output_dir.exists():
            os.rename(old / "previous", output_dir)  # put the earlier output back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {name: output_dir / name for name in files}


# ---------------------------------------------------------------------------------------------
# The pipeline


_UNSET: Any = object()


def calibrate(
    model: Any,
    batch: Any,
    *,
    algorithms: Sequence[str] | str = _UNSET,
    output_dir: str | os.PathLike[str] | None = None,
    trt_version: str = _UNSET,
    micro_batch: int = _UNSET,
    num_bins: int = _UNSET,
    method_params: Mapping[str, Mapping[str, Any]] | None = _UNSET,
    tensors: str | Sequence[str] | None = _UNSET,
    nonfinite: str = _UNSET,
    manual_ranges: Mapping[str, float] | None = _UNSET,
    device: str = _UNSET,
    processes: int = _UNSET,
    config: CalibrationConfig | None = None,
    progress: ProgressCallback = NO_PROGRESS,
) -> CalibrationResult:
    """Calibrate `model` on `batch`: collect FP32 statistics once, compute every requested method.

    Args:
        model: ONNX model path, bytes or ModelProto.
        batch: a `CalibrationBatch`, a path/URL of an `.arrow` batch, a local `.npy`/`.npz`, or a
            mapping input name -> array.
        output_dir: where to publish the artifacts (None: compute only). Created atomically; an
            earlier trtcal output there is replaced, any other non-empty directory is refused.
        algorithms, trt_version, micro_batch, num_bins, method_params, tensors, nonfinite,
            manual_ranges, device, processes: fields of `CalibrationConfig` (defaults live there); an explicit
            keyword overrides the same field of `config`. None means the default.
        config: a full `CalibrationConfig`.
        progress: receives "statistics" and "histograms" stages in samples.

    Returns:
        CalibrationResult.

    Raises:
        ConfigError, DataError (incl. NonFiniteError), ModelError, BackendUnavailableError,
        StorageError. Nothing is left in `output_dir` when any of them is raised.
    """
    from trtcal.runners.onnxruntime import load_model

    given: dict[str, Any] = {
        "algorithms": algorithms, "trt_version": trt_version, "micro_batch": micro_batch, "num_bins": num_bins,
        "method_params": method_params, "tensors": tensors, "nonfinite": nonfinite,
        "manual_ranges": manual_ranges, "device": device, "processes": processes,
    }
    overrides = {k: v for k, v in given.items() if v is not _UNSET and v is not None}
    for key in ("algorithms", "tensors"):
        if key in overrides and not isinstance(overrides[key], str):
            overrides[key] = tuple(overrides[key])
    base = config.to_dict() if config is not None else {}
    cfg = CalibrationConfig.from_dict({**base, **overrides})

    out_path = None
    if output_dir is not None:
        if "://" in os.fspath(output_dir):
            raise ConfigError(f"output_dir must be a local directory, got {os.fspath(output_dir)!r}; publish to a store instead")
        out_path = Path(output_dir).absolute()
        _check_output_dir(out_path)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load_model(model)
    runner = _runner_for(cfg, loaded)
    timings["load_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cal_batch = resolve_batch(batch, sorted(runner.inputs))
    try:
        return _calibrate_open_batch(cfg, loaded, runner, cal_batch, out_path, progress, timings, t0)
    finally:
        if cal_batch is not batch:
            cal_batch.close()  # opened here: unmap it now rather than at garbage collection


def _calibrate_open_batch(
    cfg: CalibrationConfig,
    loaded: LoadedModel,
    runner: OnnxRuntimeRunner,
    cal_batch: CalibrationBatch,
    out_path: Path | None,
    progress: ProgressCallback,
    timings: dict[str, float],
    t0: float,
) -> CalibrationResult:
    if cal_batch.num_rows == 0:
        raise DataError(f"calibration batch {cal_batch.source!r} holds no rows; calibration needs at least one sample")
    layout = runner.layout(cal_batch)
    timings["open_batch"] = time.perf_counter() - t0
    logger.info(
        "calibrating %d tensors of %s on %d samples (%s), micro-batch %d",
        len(runner.tensor_names), loaded.source, cal_batch.num_rows, cal_batch.fingerprint,
        layout.micro_batch(cfg.micro_batch),
    )

    need_histograms = not set(cfg.algorithms) <= _HISTOGRAM_FREE_METHODS
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
            cfg, loaded, runner, source, cal_batch.num_rows, layout.micro_batch(cfg.micro_batch), workers,
            need_histograms, progress,
        )
        timings["statistics+histograms" if need_histograms else "statistics"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        stats = runner.collect_stats(
            cal_batch, micro_batch=cfg.micro_batch, nonfinite=cfg.nonfinite, progress=progress  # type: ignore[arg-type]
        )
        timings["statistics"] = time.perf_counter() - t0
        if need_histograms:
            t0 = time.perf_counter()
            counts = runner.collect_counts(
                cal_batch, {n: stats[n].amax for n in runner.tensor_names}, num_bins=cfg.num_bins,
                micro_batch=cfg.micro_batch, nonfinite=cfg.nonfinite, progress=progress,  # type: ignore[arg-type]
            )
            timings["histograms"] = time.perf_counter() - t0
    if need_histograms:
        histograms = {
            n: Histogram(counts=counts[n], hist_amax=stats[n].amax, stats=stats[n]) for n in runner.tensor_names
        }

    t0 = time.perf_counter()
    tensor_names = runner.tensor_names
    amax, sources = compute_method_amax(tensor_names, stats, histograms, cfg)
    caches = {m: write_trt_cache(amax[m], trt_version=cfg.trt_version, algorithm=m) for m in cfg.algorithms}
    ranges = build_ranges(tensor_names, stats, histograms, amax, sources, cfg)
    timings["scales"] = time.perf_counter() - t0

    files: dict[str, bytes] = {cache_name(m): caches[m] for m in cfg.algorithms}
    files[DEFAULT_CACHE] = caches[cfg.algorithms[0]]
    files[RANGES] = canonical_json(ranges)
    if histograms:
        files[HISTOGRAMS] = _npy_bytes(np.stack([histograms[n].counts for n in ranges["histogram_tensors"]]))
    manifest: dict[str, Any] = {
        "trtcal_version": __version__,
        "format_version": FORMAT_VERSION,
        "model": {"sha256": loaded.sha256, "source": os.path.basename(loaded.source)},
        "batch": {
            "fingerprint": cal_batch.fingerprint,
            "num_rows": cal_batch.num_rows,
            "row_range": list(cal_batch.row_range),
            "spec": dict(cal_batch.spec),
            "inputs": [info.to_dict() for info in cal_batch.inputs.values()],
        },
        "config": cfg.to_dict(),
        "runner": {**runner.info, "micro_batch": layout.micro_batch(cfg.micro_batch), "processes": workers if source else 1},
        "tensors": len(tensor_names),
        "default_cache": cache_name(cfg.algorithms[0]),
        "artifacts": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in sorted(files.items())
        },
    }

    paths: dict[str, Path] = {}
    if out_path is not None:
        t0 = time.perf_counter()
        # The manifest's own timing of the write is measured up to the rename, not included.
        manifest["timings_s"] = {k: round(v, 6) for k, v in timings.items()}
        files_with_manifest = {**files, MANIFEST: canonical_json(manifest)}
        paths = _publish_dir(out_path, files_with_manifest)
        timings["write"] = time.perf_counter() - t0
        logger.info("wrote %d artifacts to %s", len(paths), out_path)
    else:
        manifest["timings_s"] = {k: round(v, 6) for k, v in timings.items()}

    return CalibrationResult(
        amax=amax, caches=caches, stats=stats, histograms=histograms, tensor_names=tensor_names,
        output_dir=out_path, paths=paths, timings=timings, manifest=manifest,
    )
