"""`calibrate_dataset`: the end-to-end job behind `trtcal calibrate MODEL --data URL`.

Flow (each step skipped when the store already holds its result):

    key the batch request  ──hit──►  batch fingerprint  ──►  key the calibration ──hit──► copy out, done
          │ miss                                                   │ miss
          ▼                                                        ▼
    Ray workers build ONE Arrow batch ──► publish it ──►  calibration actor (GPU if any) ──► publish ──► copy out

* The **batch entry** is keyed by the request (dataset URL without credentials, sample count, seed,
  stratification, preprocessing spec, bad-input policy): a retry never preprocesses again. Its
  manifest records the batch's content fingerprint. The dataset is not listed to compute this
  key (listing 10^5+ objects would dominate a cache hit), so a dataset changed in place under the
  same URL is not noticed: publish changed data under a new (versioned) prefix.
* The **calibration entry** is keyed by content (`trtcal.storage.KeyInputs`): model sha256, batch
  fingerprint, preprocessing spec, the methods and their parameters, runner kind and version,
  tensor selection, micro-batch, format version. Same key, same artifact bytes.
* Artifacts are copied to `output` through a temp dir and one rename, so `output` never holds a
  half-written set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trtcal._version import FORMAT_VERSION, __version__
from trtcal.errors import (
    BackendUnavailableError,
    ConfigError,
    InternalError,
    ModelError,
    TrtcalError,
    WorkerError,
)
from trtcal.orchestrator.config import CalibrationConfig
from trtcal.progress import NO_PROGRESS, ProgressCallback

__all__ = ["JobConfig", "DatasetResult", "calibrate_dataset", "default_store_url"]

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
BACKENDS = ("onnxruntime", "tensorrt")
TENSORRT_ALGORITHMS = ("entropy2", "minmax", "entropy", "legacy")  # TensorRT 10's own calibrators
BATCH_ARTIFACT = "batch.arrow"
QDQ_ARTIFACT = "model.qdq.onnx"
# The pipeline's manifest.json is stored as run.json (the store's own manifest.json commits an entry)
# and copied back to --output as manifest.json, next to entry.json (the store entry's manifest).
RUN_RECORD = "run.json"
ENTRY_RECORD = "entry.json"
GIVEN_BATCH_SUFFIXES = (".arrow", ".npy", ".npz")  # a prepared batch: no preprocessing
# (timing key, what the user reads), in the order the stages run.
STAGE_LABELS = (
    ("start_ray", "start Ray"),
    ("preprocess", "preprocess"),
    ("publish_batch", "store batch"),
    ("calibrate.load_model", "load model"),
    ("calibrate.statistics", "pass 1 (max |x|)"),
    ("calibrate.histograms", "pass 2 (histograms)"),
    ("calibrate.scales", "scale search"),
    ("calibrate.export_qdq", "Q/DQ export"),
    ("publish", "publish"),
    ("total", "total"),
)


def default_store_url() -> str:
    """`$TRTCAL_CACHE_DIR/store`, else `~/.cache/trtcal/store`."""
    root = os.environ.get("TRTCAL_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "trtcal"
    return str(base / "store")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """Everything `trtcal calibrate MODEL --data URL` can be told. The one place defaults live.

    Attributes:
        num_samples: samples drawn from the dataset (None: all).
        seed: seeds the draw.
        preprocess: preset name (imagenet, efficientnet-lite, raw) or "package.module:function".
        stratify: draw evenly per class folder.
        store: cache store URL (None: `default_store_url()`).
        read_from: other stores searched (read-only) before computing.
        namespace: the store namespace (e.g. a team).
        read_only: never write to the store (consumers); a miss then computes without publishing.
        output: directory that receives the artifacts (None: leave them in the store only).
        address: Ray cluster address (None: an embedded local Ray; "auto"; "ray://…").
        workers: preprocessing tasks in flight (None: the cluster's CPUs).
        device: "auto" (GPU when the cluster has one and onnxruntime-gpu is installed), "cpu" or "gpu"
            (an error at once when the cluster has no GPU).
        on_bad_input: "fail" or "skip" for corrupt or unreadable inputs.
        export_qdq: also write the Q/DQ ONNX model of the first method.
        storage_options: fsspec options for the store and the dataset (credentials stay out of every artifact).
        calibration: the calibration itself (methods, TensorRT header version, micro-batch, bins, …).
    """

    num_samples: int | None = 500
    seed: int = 0
    preprocess: str = "imagenet"
    stratify: bool = False
    store: str | None = None
    read_from: tuple[str, ...] = ()
    namespace: str | None = None
    read_only: bool = False
    output: str | None = None
    address: str | None = None
    workers: int | None = None
    device: str = "auto"
    on_bad_input: str = "fail"
    export_qdq: bool = True
    backend: str = "onnxruntime"
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if self.num_samples is not None and (isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1):
            raise ConfigError(f"num_samples must be a positive integer or None (all), got {self.num_samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "tensorrt":
            algos = self.calibration.algorithms
            if len(algos) != 1 or algos[0] not in TENSORRT_ALGORITHMS:
                raise ConfigError(
                    f"--backend tensorrt runs one TensorRT calibrator: give exactly one --algorithm of "
                    f"{TENSORRT_ALGORITHMS}, got {list(algos)}"
                )
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.on_bad_input not in ("fail", "skip"):
            raise ConfigError(f"on_bad_input must be 'fail' or 'skip', got {self.on_bad_input!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError(f"workers must be a positive integer, got {self.workers!r}")
        object.__setattr__(self, "read_from", tuple(self.read_from))
        object.__setattr__(self, "storage_options", dict(self.storage_options))
        if not isinstance(self.calibration, CalibrationConfig):
            raise ConfigError("calibration must be a CalibrationConfig")


@dataclass(frozen=True)
class DatasetResult:
    """What a job did: the key, where the artifacts are, and what it cost.

    `found_in` is the store that holds the entry (a read-from store on a read-through hit; empty when
    the result was not stored). `timings` has seconds per internal step; `stage_seconds` the same for
    the stages a user sees.
    """

    key: str
    batch_key: str
    store_url: str
    entry_url: str
    cache_hit: bool
    batch_reused: bool
    output_dir: Path | None
    artifacts: tuple[str, ...]
    num_tensors: int
    num_samples: int
    algorithms: tuple[str, ...]
    runner: str
    timings: Mapping[str, float]
    amax: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    published: bool = True
    warnings: tuple[str, ...] = ()
    found_in: str = ""

    @property
    def stage_seconds(self) -> dict[str, float]:
        """Seconds per user-facing stage, in the order they ran (the table's and --json's `stages_s`)."""
        return {label: self.timings[name] for name, label in STAGE_LABELS if name in self.timings}

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "batch_key": self.batch_key,
            "store": self.store_url,
            "entry": self.entry_url,
            "cache_hit": self.cache_hit,
            "batch_reused": self.batch_reused,
            "output_dir": str(self.output_dir) if self.output_dir else None,
            "artifacts": list(self.artifacts),
            "tensors": self.num_tensors,
            "samples": self.num_samples,
            "algorithms": list(self.algorithms),
            "runner": self.runner,
            "published": self.published,
            "found_in": self.found_in or None,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "stages_s": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "warnings": list(self.warnings),
        }


# --- keys ---------------------------------------------------------------------------------------


def _read_model(model: str | os.PathLike[str], storage_options: Mapping[str, Any]) -> bytes:
    text = os.fspath(model)
    try:
        if "://" in text and not text.startswith("file://"):
            import fsspec

            with fsspec.open(text, "rb", **dict(storage_options)) as f:
                return bytes(f.read())
        return Path(text.removeprefix("file://")).read_bytes()
    except FileNotFoundError:
        raise ModelError(f"ONNX model {text!r} does not exist; give the path or URL of an ONNX file") from None
    except IsADirectoryError:
        raise ModelError(f"model {text!r} is a directory; give the path of an ONNX file") from None
    except OSError as exc:
        raise ModelError(f"cannot read model {text!r}: {exc}") from None


def _redact_url(url: str) -> str:
    from trtcal.workers.sources import _redact

    return _redact(url)


def batch_key_inputs(data: str, config: JobConfig, spec: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a batch request (not its content: the dataset is only listed when building)."""
    return {
        "kind": "calibration-batch",
        "data": _redact_url(os.fspath(data)),
        "num_samples": config.num_samples,
        "seed": config.seed,
        "stratify": config.stratify,
        "preprocess": dict(spec),
        "on_bad_input": config.on_bad_input,
        "format_version": FORMAT_VERSION,
    }


def runner_id(device: str, backend: str = "onnxruntime") -> tuple[str, str]:
    """Runner kind and version that determine the activations (part of the key)."""
    if backend == "tensorrt":
        try:
            import tensorrt

            return ("tensorrt-cuda", str(tensorrt.__version__))
        except ImportError:
            return ("tensorrt-cuda", "unknown")  # the actor reports the real version; no hit is possible here
    import onnxruntime

    return (f"onnxruntime-{device}", str(onnxruntime.__version__))


def calibration_key_inputs(model_sha256: str, fingerprint: str, spec: Mapping[str, Any], cal: CalibrationConfig, runner: tuple[str, str]) -> Any:
    from trtcal.storage import KeyInputs

    return KeyInputs(
        model_sha256=model_sha256,
        batch_fingerprint=fingerprint,
        preprocessing=dict(spec),
        algorithm="+".join(cal.algorithms),
        algorithm_params={"num_bins": cal.num_bins, "method_params": {k: dict(v) for k, v in sorted(cal.method_params.items())}},
        runner=runner[0],
        runner_version=runner[1],
        extra={
            "micro_batch": cal.micro_batch,
            "tensors": cal.tensors if isinstance(cal.tensors, str) else list(cal.tensors),
            "nonfinite": cal.nonfinite,
            "manual_ranges": dict(sorted(cal.manual_ranges.items())),
        },
    )


# --- the calibration actor ----------------------------------------------------------------------


class ProgressLog:
    """A thread-safe ProgressCallback that keeps events until `drain()`: the actor's progress, polled by the driver.

    Events are tuples ("start", stage, total, unit), ("advance", stage, n), ("finish", stage); consecutive
    advances of one stage are merged so a poll stays small however many micro-batches ran.
    """

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._events: list[tuple[Any, ...]] = []

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        with self._lock:
            self._events.append(("start", stage, total, unit))

    def advance(self, stage: str, n: int = 1) -> None:
        with self._lock:
            last = self._events[-1] if self._events else None
            if last is not None and last[0] == "advance" and last[1] == stage:
                self._events[-1] = ("advance", stage, last[2] + n)
            else:
                self._events.append(("advance", stage, n))

    def finish(self, stage: str) -> None:
        with self._lock:
            self._events.append(("finish", stage))

    def drain(self) -> list[tuple[Any, ...]]:
        with self._lock:
            events, self._events = self._events, []
        return events


class _SearchStage:
    """Adds a "search" stage (scale search + artifact encoding) after the pipeline's last pass."""

    def __init__(self, inner: ProgressCallback, last_pass: str) -> None:
        self.inner = inner
        self.last_pass = last_pass
        self.searching = False

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        self.inner.start(stage, total, unit)

    def advance(self, stage: str, n: int = 1) -> None:
        self.inner.advance(stage, n)

    def finish(self, stage: str) -> None:
        self.inner.finish(stage)
        if stage == self.last_pass and not self.searching:
            self.searching = True
            self.inner.start("search", None, "")

    def done(self) -> None:
        if self.searching:
            self.searching = False
            self.inner.finish("search")


def run_calibration(
    model_bytes: bytes, batch_url: str, storage_options: Mapping[str, Any], cal: dict[str, Any], export_qdq: bool,
    progress: ProgressCallback = NO_PROGRESS, batch_bytes: bytes | None = None, backend: str = "onnxruntime",
) -> dict[str, Any]:
    """The actor's work, a plain function: calibrate, optionally export Q/DQ, return the artifact bytes.

    The batch is read from `batch_url` (a local path is memory-mapped), or, when `batch_bytes` is given
    (a batch that only the driver's node holds), from those bytes under `batch_url`'s file name.
    `progress` gets the pipeline's "statistics" (pass 1) and "histograms" (pass 2) stages, then
    "search" (scale search and artifacts) and "export" (the Q/DQ model).
    """
    from trtcal.orchestrator.pipeline import _HISTOGRAM_FREE_METHODS, calibrate

    config = CalibrationConfig.from_dict(cal)
    # The pipeline skips pass 2 when every method is histogram-free (minmax): search follows pass 1 then.
    last_pass = "statistics" if set(config.algorithms) <= _HISTOGRAM_FREE_METHODS else "histograms"
    stages = _SearchStage(progress, last_pass)
    with tempfile.TemporaryDirectory(prefix="trtcal-actor-") as tmp:
        model_path = Path(tmp) / "model.onnx"
        model_path.write_bytes(model_bytes)
        if batch_bytes is not None:
            shipped = Path(tmp) / Path(batch_url.split("?")[0]).name
            shipped.write_bytes(batch_bytes)
            batch_url = str(shipped)
        batch = _open_given_batch(batch_url, model_bytes, storage_options)
        if backend == "tensorrt":
            return _run_tensorrt(model_path, batch, config, export_qdq, progress)
        out = Path(tmp) / "out"
        try:
            result = calibrate(str(model_path), batch, config=config, output_dir=out, progress=stages)
        finally:
            stages.done()
        files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
        if "manifest.json" in files:
            files[RUN_RECORD] = files.pop("manifest.json")
        timings = dict(result.timings)
        if export_qdq:
            from trtcal.export.qdq import export_qdq as make_qdq

            t0 = time.perf_counter()
            progress.start("export", None, "")
            qdq = make_qdq(str(model_path), result.amax[config.algorithms[0]])
            files[QDQ_ARTIFACT] = qdq.SerializeToString(deterministic=True)
            progress.finish("export")
            timings["export_qdq"] = time.perf_counter() - t0
        runner = result.manifest.get("runner", {})
        return {
            "files": files,
            "amax": result.amax,
            "num_tensors": len(result.tensor_names),
            "num_samples": batch.num_rows,
            "timings": timings,
            "runner": runner,
        }


def _run_tensorrt(model_path: Path, batch: Any, config: CalibrationConfig, export_qdq: bool, progress: ProgressCallback) -> dict[str, Any]:
    """`--backend tensorrt`: TensorRT 10's own calibrator, fed from the batch, on this actor's GPU."""
    from trtcal.core import read_trt_cache
    from trtcal.runners.tensorrt import calibrate_with_tensorrt

    method = config.algorithms[0]
    t0 = time.perf_counter()
    progress.start("tensorrt", None, "")
    cache = calibrate_with_tensorrt(
        str(model_path), batch, algorithm=method, micro_batch=config.micro_batch, trt_version=config.trt_version,
        progress=progress,
    )
    progress.finish("tensorrt")
    timings = {"tensorrt_calibration": time.perf_counter() - t0}
    amax = {method: read_trt_cache(cache).amax}
    files = {"calibration.cache": cache, f"calibration.{method}.cache": cache}
    if export_qdq:
        from trtcal.export.qdq import export_qdq as make_qdq

        files[QDQ_ARTIFACT] = make_qdq(str(model_path), amax[method]).SerializeToString(deterministic=True)
    import tensorrt

    return {
        "files": files, "amax": amax, "num_tensors": len(amax[method]), "num_samples": batch.num_rows,
        "timings": timings, "runner": {"kind": "tensorrt-cuda", "version": str(tensorrt.__version__)},
    }


def _actor_class(ray: Any, num_gpus: float) -> Any:
    # Restarted by Ray if its process dies; the call is retried against the stored batch.
    # Two threads: `calibrate` runs in one while the driver polls `progress` in the other.
    @ray.remote(num_cpus=1, num_gpus=num_gpus, max_restarts=2, max_task_retries=2, max_concurrency=2)
    class CalibrationActor:
        def __init__(self) -> None:
            self.log = ProgressLog()

        def ready(self) -> dict[str, Any]:
            import socket

            return {
                "pid": os.getpid(), "host": socket.gethostname(), "gpu_ids": list(ray.get_gpu_ids()),
                "node_id": _node_id(ray),
            }

        def progress(self) -> tuple[int, list[tuple[Any, ...]]]:
            return os.getpid(), self.log.drain()

        def calibrate(
            self, model_bytes: bytes, batch_url: str, batch_bytes: bytes | None, storage_options: Mapping[str, Any],
            cal: dict[str, Any], export_qdq: bool, backend: str = "onnxruntime",
        ) -> dict[str, Any]:
            return run_calibration(
                model_bytes, batch_url, storage_options, cal, export_qdq, progress=self.log, batch_bytes=batch_bytes,
                backend=backend,
            )

    return CalibrationActor


def _node_id(ray: Any) -> str | None:
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # Ray Client drivers have no node
        return None


@dataclass(frozen=True)
class BatchSource:
    """Where the calibration batch is: a file on the driver's node and/or a URL that every node can read."""

    local_path: str | None = None
    shared_url: str | None = None

    @classmethod
    def at(cls, url: str) -> BatchSource:
        if "://" in url and not url.startswith("file://"):
            return cls(shared_url=url)
        return cls(local_path=os.path.abspath(url.removeprefix("file://")))

    def for_actor(self, same_node: bool) -> tuple[str, bool]:
        """(what the actor opens, whether this process must send the file's bytes along).

        On the driver's node the local file is used (memory-mapped); elsewhere the shared URL, and
        without one the bytes travel through Ray's object store.
        """
        if self.local_path is not None and (same_node or self.shared_url is None):
            return self.local_path, not same_node
        if self.shared_url is None:
            raise InternalError("a BatchSource needs a local path or a shared URL")
        return self.shared_url, False


def resolve_device(ray: Any, device: str) -> str:
    """"cpu" or "gpu" for the calibration actor; never waits for a GPU that does not exist."""
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if device == "gpu" and gpus < 1:
        raise BackendUnavailableError(
            "--device gpu was asked for but the Ray cluster has no GPU; use --device cpu or auto, "
            "or add a GPU worker group to the cluster"
        )
    if device == "auto" and gpus >= 1 and not cuda_runner_available():
        logger.warning(
            "the Ray cluster has a GPU but this onnxruntime has no CUDAExecutionProvider; calibrating on CPU "
            "(install onnxruntime-gpu to use the GPU)"
        )
        return "cpu"
    if device == "auto":
        return "gpu" if gpus >= 1 else "cpu"
    return device


def cuda_runner_available() -> bool:
    """Whether this process's onnxruntime can run on CUDA (the workers are assumed to share the image)."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


# --- the job ------------------------------------------------------------------------------------


def _copy_out(entry: Any, output: Path, trt_version: str, algorithms: Sequence[str]) -> tuple[str, ...]:
    """Artifacts into `output` via a sibling temp dir and one rename (an earlier trtcal output is replaced)."""
    from trtcal.storage import retarget_trt_cache

    output = output.expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {str(output)!r} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / "calibration.cache").exists():
        raise ConfigError(f"--output {str(output)!r} is a non-empty directory that holds no trtcal artifacts; choose an empty or new directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        names = []
        for name in entry.names:
            if name == BATCH_ARTIFACT:
                continue
            data = entry.read(name)
            if name.startswith("calibration") and name.endswith(".cache"):
                method = name[len("calibration.") : -len(".cache")] if name != "calibration.cache" else algorithms[0]
                data = retarget_trt_cache(data, trt_version=trt_version, algorithm=method)
            if name == RUN_RECORD:
                name = "manifest.json"  # the calibration's manifest (hashes, versions, timings)
            (tmp / name).write_bytes(data)
            names.append(name)
        (tmp / ENTRY_RECORD).write_bytes(_manifest_bytes(entry))
        names.append(ENTRY_RECORD)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
        os.replace(tmp, output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return tuple(sorted(names))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        from trtcal.errors import StorageError

        raise StorageError(
            f"cannot write the artifacts to --output {str(output)!r} ({exc.strerror or exc}); the store entry is "
            "complete — free space (or fix permissions) and rerun, which copies it out without recomputing",
            url=str(output),
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _manifest_bytes(entry: Any) -> bytes:
    import json

    return (json.dumps(entry.manifest, sort_keys=True, indent=2) + "\n").encode("utf-8")


def _open_store(config: JobConfig) -> Any:
    from trtcal.storage import CacheStore

    return CacheStore(
        config.store or default_store_url(),
        namespace=config.namespace,
        read_only=config.read_only,
        read_from=config.read_from,
        **dict(config.storage_options),
    )


def _preprocess_spec(name: str) -> dict[str, Any]:
    from trtcal.workers.preprocess import parse_preprocess

    return parse_preprocess(name).to_dict()


def calibrate_dataset(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    config: JobConfig | None = None,
    progress: ProgressCallback = NO_PROGRESS,
    **overrides: Any,
) -> DatasetResult:
    """Calibrate `model` on a dataset URL end to end (see the module docstring for the flow).

    Args:
        model: path or fsspec URL of the FP32 ONNX model.
        data: dataset URL (image folder/prefix, list file, Parquet, .npy/.npz) or an `.arrow` batch.
        config: a JobConfig; keyword `overrides` replace its fields (`calibration=` too).
        progress: receives, in order, "list" (shards), "preprocess" (images), "write" (the batch),
            "store batch", then from the calibration actor (relayed to this process) "statistics"
            (pass 1, samples), "histograms" (pass 2, samples), "search", "export", and "publish".
            Only the stages a run needs are reported (a cache hit reports none).

    Raises:
        ConfigError, DataError, ModelError, StorageError, WorkerError, BackendUnavailableError.
    """
    cfg = replace(config or JobConfig(), **overrides) if overrides else (config or JobConfig())
    timings: dict[str, float] = {}
    warnings: list[str] = []
    t_start = time.perf_counter()

    model_bytes = _read_model(model, cfg.storage_options)
    model_sha = hashlib.sha256(model_bytes).hexdigest()
    store = _open_store(cfg)
    data_text = os.fspath(data)
    given_batch = Path(data_text.split("?")[0]).suffix.lower() in GIVEN_BATCH_SUFFIXES

    if given_batch:
        batch = _open_given_batch(data_text, model_bytes, cfg.storage_options)
        spec: dict[str, Any] = dict(batch.spec)
        batch_key = batch.fingerprint
        fingerprint = batch.fingerprint
        batch_entry = None
    else:
        spec = _preprocess_spec(cfg.preprocess)
        from trtcal.storage import compute_cache_key

        batch_inputs = batch_key_inputs(data_text, cfg, spec)
        batch_key = compute_cache_key(batch_inputs)
        batch_entry = store.get(batch_key, lazy=True)
        fingerprint = batch_entry.extra.get("fingerprint") if batch_entry is not None else None

    # A hit needs no Ray at all: try the runner(s) the device setting allows, CPU first.
    if fingerprint is not None:
        from trtcal.storage import compute_cache_key

        candidates = {"cpu": ["cpu"], "gpu": ["cuda"], "auto": ["cpu", "cuda"]}[cfg.device]
        if cfg.backend == "tensorrt":
            candidates = ["cuda"]
        for kind in candidates:
            hit_runner = runner_id(kind, cfg.backend)
            key = compute_cache_key(calibration_key_inputs(model_sha, str(fingerprint), spec, cfg.calibration, hit_runner))
            hit = store.get(key)
            if hit is not None:
                timings["total"] = time.perf_counter() - t_start
                logger.info("cache hit %s: no preprocessing, no inference", key)
                return _finish(cfg, hit, key, batch_key, store, True, True, timings, warnings, hit_runner, hit.extra)

    from trtcal.workers.ray_runtime import ray_session

    t0 = time.perf_counter()
    with ray_session(cfg.address, num_cpus=cfg.workers):
        import ray

        timings["start_ray"] = time.perf_counter() - t0
        if cfg.backend == "tensorrt" and float(ray.cluster_resources().get("GPU", 0.0)) < 1:
            raise BackendUnavailableError(
                "--backend tensorrt runs TensorRT 10's calibrator on a GPU, but the Ray cluster has no GPU; "
                "use the default onnxruntime backend, or run on a cluster with a GPU node that has TensorRT 10"
            )
        device = resolve_device(ray, "gpu" if cfg.backend == "tensorrt" else cfg.device)
        runner = runner_id("cuda" if device == "gpu" else "cpu", cfg.backend)

        def lookup() -> tuple[Any, str]:
            from trtcal.storage import compute_cache_key

            key = compute_cache_key(calibration_key_inputs(model_sha, str(fingerprint), spec, cfg.calibration, runner))
            return store.get(key), key

        batch_reused = batch_entry is not None or given_batch
        with tempfile.TemporaryDirectory(prefix="trtcal-job-") as tmp:
            if given_batch:
                source = BatchSource.at(data_text)
            elif batch_entry is not None:
                source = BatchSource.at(_local_or_remote(batch_entry, Path(tmp)))
            else:
                from trtcal.workers.build import build_batch

                t0 = time.perf_counter()
                local_batch = Path(tmp) / BATCH_ARTIFACT
                report = build_batch(
                    data_text, str(local_batch), num_samples=cfg.num_samples, seed=cfg.seed,
                    preprocess=cfg.preprocess, workers=cfg.workers, address=cfg.address,
                    on_bad_input=cfg.on_bad_input, progress=progress, storage_options=cfg.storage_options,
                    stratify=cfg.stratify, input_name=_model_input_name(model_bytes),
                )
                warnings.extend(report.warnings)
                timings["preprocess"] = time.perf_counter() - t0
                fingerprint = report.fingerprint
                source = BatchSource(local_path=str(local_batch))
                if not store.read_only:
                    t0 = time.perf_counter()
                    progress.start("store batch", None, "")
                    stored = store.publish(
                        batch_key, {BATCH_ARTIFACT: local_batch}, key_inputs=batch_inputs,
                        extra={"fingerprint": report.fingerprint, "num_rows": report.num_rows,
                               "skipped": len(report.skipped), "build": _build_summary(report)},
                    )
                    progress.finish("store batch")
                    timings["publish_batch"] = time.perf_counter() - t0
                    # An actor on another node reads the stored copy (s3://…) rather than this node's file.
                    source = replace(source, shared_url=BatchSource.at(stored.artifact_url(BATCH_ARTIFACT)).shared_url)
                hit_key = lookup()
                if hit_key[0] is not None:  # someone calibrated this batch content already
                    timings["total"] = time.perf_counter() - t_start
                    return _finish(cfg, hit_key[0], hit_key[1], batch_key, store, True, False, timings, warnings, runner, hit_key[0].extra)

            from trtcal.storage import compute_cache_key

            key_inputs = calibration_key_inputs(model_sha, str(fingerprint), spec, cfg.calibration, runner)
            key = compute_cache_key(key_inputs)
            t0 = time.perf_counter()
            out = _run_actor(ray, device, model_bytes, source, cfg, progress)
            if cfg.backend == "tensorrt":  # key by the TensorRT version that really calibrated
                runner = (str(out["runner"]["kind"]), str(out["runner"]["version"]))
                key_inputs = calibration_key_inputs(model_sha, str(fingerprint), spec, cfg.calibration, runner)
                key = compute_cache_key(key_inputs)
            timings["calibrate"] = time.perf_counter() - t0
            for stage, seconds in out["timings"].items():
                timings[f"calibrate.{stage}"] = seconds
            extra = {
                "trtcal_version": __version__,
                "runner": out["runner"],
                "num_samples": out["num_samples"],
                "num_tensors": out["num_tensors"],
                "timings_s": {k: round(v, 3) for k, v in timings.items()},
                "batch_key": batch_key,
            }
            progress.start("publish", None, "")
            t0 = time.perf_counter()
            if store.read_only:
                entry = _MemoryEntry(key, out["files"], key_inputs, extra)
                published = False
                warnings.append("read-only store: the result was computed but not published")
            else:
                entry = store.publish(key, out["files"], key_inputs=key_inputs, extra=extra)
                published = True
            timings["publish"] = time.perf_counter() - t0
            progress.finish("publish")
            timings["total"] = time.perf_counter() - t_start
            result = _finish(cfg, entry, key, batch_key, store, False, batch_reused, timings, warnings, runner, extra, amax=out["amax"])
            return replace(result, published=published)


def _model_inputs(model_bytes: bytes) -> list[str]:
    import onnx

    try:
        graph = onnx.load_from_string(model_bytes).graph
    except Exception as exc:  # onnx raises DecodeError and others
        raise ModelError(f"the model is not a valid ONNX file ({type(exc).__name__}: {exc}); re-export it") from None
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


def _open_given_batch(url: str, model_bytes: bytes, storage_options: Mapping[str, Any]) -> Any:
    """An .arrow batch (any fsspec URL) or a local .npy/.npz as a CalibrationBatch."""
    if url.split("?")[0].lower().endswith(".arrow"):
        from trtcal.workers.batch_format import open_batch

        return open_batch(url, **dict(storage_options))
    from trtcal.orchestrator.pipeline import resolve_batch

    return resolve_batch(url, _model_inputs(model_bytes))


def _model_input_name(model_bytes: bytes) -> str:
    inputs = _model_inputs(model_bytes)
    if len(inputs) != 1:
        raise ConfigError(
            f"the model has {len(inputs)} inputs {inputs}; image datasets feed models with one input — "
            "build the batch with a preprocessing function that returns every input, then pass the .arrow file"
        )
    return inputs[0]


def _build_summary(report: Any) -> dict[str, Any]:
    return {
        "num_candidates": report.num_candidates,
        "num_selected": report.num_selected,
        "skipped": [b.to_dict() for b in report.skipped][:1000],
        "workers": report.workers,
        "wall_seconds": {k: round(v, 3) for k, v in report.wall_seconds.items()},
    }


def _local_or_remote(entry: Any, tmp: Path) -> str:
    url = str(entry.artifact_url(BATCH_ARTIFACT))
    if url.startswith("memory://"):
        return str(entry.download(BATCH_ARTIFACT, tmp / BATCH_ARTIFACT))
    return url


def _run_actor(
    ray: Any, device: str, model_bytes: bytes, source: BatchSource, cfg: JobConfig, progress: ProgressCallback
) -> dict[str, Any]:
    cal = cfg.calibration
    if device == "gpu" and cal.device == "cpu":
        cal = replace(cal, device="cuda")
    actor_cls = _actor_class(ray, 1.0 if device == "gpu" else 0.0)
    actor = actor_cls.remote()
    forward = _ProgressForwarder(progress)
    try:
        info = ray.get(actor.ready.remote())
        forward.pid = int(info["pid"])
        driver_node = _node_id(ray)
        same_node = driver_node is not None and info.get("node_id") == driver_node
        batch_url, send_bytes = source.for_actor(same_node)
        logger.info(
            "calibration actor pid %s on %s (GPU ids %s) reads the batch from %s%s", info["pid"], info["host"],
            info["gpu_ids"], batch_url, " (sent through the object store)" if send_bytes else "",
        )
        batch_bytes = ray.put(Path(batch_url).read_bytes()) if send_bytes else None
        result_ref = actor.calibrate.remote(
            model_bytes, batch_url, batch_bytes, dict(cfg.storage_options), cal.to_dict(), cfg.export_qdq, cfg.backend
        )
        _follow(ray, actor, result_ref, forward)
        return dict(ray.get(result_ref))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, TrtcalError):
            raise cause from exc  # the paragraph is the cause's; -v shows the actor's traceback too
        what = f"{type(cause).__name__}: {cause}" if cause is not None else _first_line(exc)
        raise WorkerError(f"the calibration actor failed ({what}); run with -v for its traceback") from exc
    except ray.exceptions.RayActorError as exc:
        raise WorkerError(
            f"the calibration actor died {forward.restarts + 1} times and was not restarted again "
            f"({_first_line(exc)}); check the memory of the node it ran on (out-of-memory kills are the usual cause)"
        ) from exc
    finally:
        forward.close()
        ray.kill(actor, no_restart=True)


_POLL_SECONDS = 0.2


def _follow(ray: Any, actor: Any, result_ref: Any, forward: _ProgressForwarder) -> None:
    """Relay the actor's progress to the driver's callback until `result_ref` is ready.

    At most one `progress` call is in flight; progress is best effort (a poll lost with a dying actor
    is dropped), the result is not.
    """
    poll_ref: Any = None
    next_poll = 0.0
    while True:
        waiting = [result_ref] if poll_ref is None else [result_ref, poll_ref]
        ready, _ = ray.wait(waiting, num_returns=1, timeout=_POLL_SECONDS)
        if poll_ref is not None and (poll_ref in ready or result_ref in ready):
            forward.take(ray, poll_ref, timeout=None if poll_ref in ready else 5.0)
            poll_ref = None
        if result_ref in ready:
            # The last events (the end of the search, export) are still in the actor: fetch them.
            forward.take(ray, actor.progress.remote(), timeout=5.0)
            return
        if poll_ref is None and time.monotonic() >= next_poll:
            poll_ref = actor.progress.remote()
            next_poll = time.monotonic() + _POLL_SECONDS


class _ProgressForwarder:
    """Replays the actor's events into the driver's callback; a restarted actor starts its stages again."""

    def __init__(self, progress: ProgressCallback) -> None:
        self.progress = progress
        self.open: set[str] = set()
        self.pid: int | None = None
        self.restarts = 0

    def take(self, ray: Any, ref: Any, *, timeout: float | None) -> None:
        try:
            pid, events = ray.get(ref, timeout=timeout)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            logger.debug("a progress poll of the calibration actor was lost: %s", _first_line(exc))
            return
        self.replay(pid, events)

    def replay(self, pid: int, events: Sequence[tuple[Any, ...]]) -> None:
        """Pass on the events that the actor process `pid` logged since the last poll."""
        if self.pid is not None and pid != self.pid:
            self.restarts += 1
            logger.warning(
                "the calibration actor (pid %s) died; Ray restarted it (pid %s) and it calibrates again from "
                "the stored batch", self.pid, pid,
            )
            self.close()
        self.pid = pid
        for event in events:
            kind, stage = event[0], event[1]
            if kind == "start":
                if stage in self.open:  # the stage started again (a retried call): a fresh bar
                    self.progress.finish(stage)
                self.open.add(stage)
                self.progress.start(stage, event[2], event[3])
            elif kind == "advance" and stage in self.open:
                self.progress.advance(stage, event[2])
            elif kind == "finish" and stage in self.open:
                self.open.discard(stage)
                self.progress.finish(stage)

    def close(self) -> None:
        for stage in sorted(self.open):
            self.progress.finish(stage)
        self.open.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class _MemoryEntry:
    """A computed but unpublished result (read-only stores), shaped like a store Entry for copying out."""

    key: str
    files: dict[str, bytes]
    key_inputs: Any
    extra_data: dict[str, Any]
    url: str = "(not published: read-only store)"

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    @property
    def extra(self) -> dict[str, Any]:
        return self.extra_data

    @property
    def manifest(self) -> dict[str, Any]:
        from trtcal.storage.keys import key_inputs_dict

        return {"key": self.key, "key_inputs": key_inputs_dict(self.key_inputs), "extra": self.extra_data, "published": False}

    def read(self, name: str) -> bytes:
        return self.files[name]


def _finish(
    cfg: JobConfig, entry: Any, key: str, batch_key: str, store: Any, hit: bool, batch_reused: bool,
    timings: dict[str, float], warnings: list[str], runner: tuple[str, str], extra: Mapping[str, Any],
    amax: Mapping[str, Mapping[str, float]] | None = None,
) -> DatasetResult:
    output = Path(cfg.output) if cfg.output else None
    names: tuple[str, ...] = tuple(n for n in entry.names if n != BATCH_ARTIFACT)
    if output is not None:
        names = _copy_out(entry, output, cfg.calibration.trt_version, cfg.calibration.algorithms)
    if amax is None:
        amax = {}
    return DatasetResult(
        key=key, batch_key=batch_key, store_url=store.url, entry_url=getattr(entry, "url", ""), cache_hit=hit,
        batch_reused=batch_reused, output_dir=output.expanduser().resolve() if output else None, artifacts=names,
        num_tensors=int(extra.get("num_tensors", 0)), num_samples=int(extra.get("num_samples", 0)),
        algorithms=cfg.calibration.algorithms, runner=f"{runner[0]} {runner[1]}", timings=dict(timings),
        amax=amax, warnings=tuple(warnings), found_in=str(getattr(entry, "store_url", "")),
    )


__all__ += ["run_calibration", "resolve_device", "batch_key_inputs", "calibration_key_inputs"]

