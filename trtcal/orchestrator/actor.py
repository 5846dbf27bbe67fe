"""The calibration actor: one Ray actor (a GPU when the job has one) that runs `run_calibration`.

The driver sends an `ActorRequest` (model bytes, where the batch is, the CalibrationConfig) and gets
an `ActorResult` (artifact bytes, amax per method, counts, timings, the runner that really ran).
`run_calibration` is a plain function, testable without Ray; `CalibrationActor` only adds a progress
log the driver polls (`follow`), and `run_actor` turns Ray's failures into trtcal's errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trtcal.config import CalibrationConfig
from trtcal.errors import BackendUnavailableError, ConfigError, InternalError, TrtcalError, WorkerError
from trtcal.export.artifacts import MANIFEST
from trtcal.progress import NO_PROGRESS, ProgressCallback

__all__ = [
    "ActorRequest", "ActorResult", "BatchSource", "CalibrationActor", "ProgressLog", "run_actor", "run_calibration",
    "resolve_device", "cuda_runner_available", "open_given_batch", "model_inputs", "QDQ_ARTIFACT", "RUN_RECORD",
]

logger = logging.getLogger(__name__)

QDQ_ARTIFACT = "model.qdq.onnx"
# The pipeline's manifest.json is stored as run.json (the store's own manifest.json commits an entry)
# and copied back to --output as manifest.json, next to entry.json (the store entry's manifest).
RUN_RECORD = "run.json"
_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ActorRequest:
    """What the actor calibrates: the model, where the batch is, and how.

    `batch_url` is a local path (memory-mapped) or any fsspec URL; a batch only the driver's node
    holds travels as bytes beside the request (`run_actor` sends them through the object store).
    """

    model_bytes: bytes
    batch_url: str
    calibration: CalibrationConfig
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    export_qdq: bool = True
    backend: str = "onnxruntime"
    model_label: str = ""  # the user's path or URL of the model: errors name it, not the actor's temp copy
    # The driver's storage credentials (`trtcal._secrets.driver_env`), set while the actor calibrates.
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    inputs: Mapping[str, Any] = field(default_factory=dict)  # declared input specs (JSON form) for a .npy/.npz batch


@dataclass(frozen=True)
class ActorResult:
    """What the actor computed: artifact name -> bytes (as stored), amax per method, and what ran."""

    files: dict[str, bytes]
    amax: dict[str, dict[str, float]]
    num_tensors: int
    num_samples: int
    timings: dict[str, float]
    runner: dict[str, Any]  # at least "kind" and "version"
    warnings: tuple[str, ...] = ()  # for the user: what stayed float and why (subgraphs, empty export)
    verdict: dict[str, Any] | None = None  # held-out quality per method (trtcal.export.auto.verdict)
    smoothing: dict[str, Any] | None = None  # what calibrate smoothed (CalibrationResult.smoothing); None: nothing

    @property
    def runner_id(self) -> tuple[str, str]:
        return (str(self.runner["kind"]), str(self.runner["version"]))


# --- the work, a plain function -------------------------------------------------------------------


class ProgressLog:
    """A thread-safe ProgressCallback that keeps events until `drain()`: the actor's progress, polled by the driver.

    Events are tuples ("start", stage, total, unit), ("advance", stage, n), ("finish", stage); consecutive
    advances of one stage are merged so a poll stays small however many micro-batches ran.
    """

    def __init__(self) -> None:
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
        if self.searching and stage in ("auto", "verdict"):  # their own bars follow the scale search's
            self.done()
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
    request: ActorRequest, progress: ProgressCallback = NO_PROGRESS, batch_bytes: bytes | None = None
) -> ActorResult:
    """The actor's work: calibrate, optionally export Q/DQ, return the artifact bytes.

    With `batch_bytes` (a batch that only the driver's node holds) the batch is read from those
    bytes under `request.batch_url`'s file name. `progress` gets the pipeline's "statistics" (pass 1)
    and "histograms" (pass 2) stages, then "search" (scale search and artifacts) and "export" (Q/DQ).
    """
    from trtcal.orchestrator.calibrate import calibrate, needs_histograms

    config = request.calibration
    # The pipeline skips pass 2 when every method is histogram-free (minmax): search follows pass 1 then.
    stages = _SearchStage(progress, "histograms" if needs_histograms(config) else "statistics")
    with _actor_tempdir() as tmp, _user_paths_in_errors(tmp, request.model_label):
        model_path = Path(tmp) / "model.onnx"
        model_path.write_bytes(request.model_bytes)
        batch_url = request.batch_url
        if batch_bytes is not None:
            shipped = Path(tmp) / Path(batch_url.split("?")[0]).name
            shipped.write_bytes(batch_bytes)
            batch_url = str(shipped)
        batch = open_given_batch(batch_url, request.model_bytes, request.storage_options, request.inputs)
        if request.backend == "tensorrt":
            return _run_tensorrt(model_path, batch, request, progress)
        try:
            result = calibrate(str(model_path), batch, config=config, progress=stages)
        finally:
            stages.done()
        files = dict(result.files)
        files[RUN_RECORD] = files.pop(MANIFEST)  # the store's own manifest.json commits an entry
        timings = dict(result.timings)
        warnings: list[str] = []
        if result.smoothing is not None:  # the scales are of the smoothed copy: so is the Q/DQ model
            from trtcal.export.smoothed_names import SMOOTHED_MODEL

            model_path = Path(tmp) / SMOOTHED_MODEL
            model_path.write_bytes(files[SMOOTHED_MODEL])
        if request.export_qdq:
            t0 = time.perf_counter()
            progress.start("export", None, "")
            files[QDQ_ARTIFACT], warnings = _qdq_bytes(model_path, result.amax[config.algorithms[0]], config.allow_empty)
            progress.finish("export")
            timings["export_qdq"] = time.perf_counter() - t0
        else:
            warnings = _subgraph_warning(request.model_bytes, len(result.tensor_names))
        return ActorResult(
            files=files, amax=result.amax, num_tensors=len(result.tensor_names), num_samples=batch.num_rows,
            timings=timings, runner=dict(result.manifest.get("runner", {})), warnings=tuple(warnings),
            verdict=result.manifest.get("verdict"), smoothing=result.smoothing,
        )


@contextlib.contextmanager
def _actor_tempdir() -> Iterator[str]:
    from trtcal._io import owned_temp_dir

    path = owned_temp_dir("actor")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _user_paths_in_errors(tmp: str, model_label: str) -> Iterator[None]:
    """A TrtcalError naming the actor's temp copy of the model names the user's model instead."""
    try:
        yield
    except TrtcalError as exc:
        if model_label:
            model_copy = str(Path(tmp) / "model.onnx")
            exc.args = tuple(
                a.replace(model_copy, model_label).replace(tmp, "(the calibration actor's work folder)") if isinstance(a, str) else a
                for a in exc.args
            )
        raise


def _qdq_bytes(model_path: Path, amax: Mapping[str, float], allow_empty: bool = False) -> tuple[bytes, list[str]]:
    """The Q/DQ model's bytes and one warning per tensor it had to leave float inside a subgraph."""
    from trtcal.export.qdq import activation_scales, build_qdq, require_quantized, serialize_model

    export = build_qdq(str(model_path), activation_scales(amax))
    require_quantized(export.report, allow_empty=allow_empty, what="the Q/DQ export of the calibrated model")
    warnings = [f"kept float: {line}" for line in export.report.float_in_subgraphs]
    if export.report.is_empty:
        warnings.append(f"the Q/DQ model quantizes nothing (allowed): {export.report.empty_reason()}")
    return serialize_model(export.model), warnings


def _subgraph_warning(model_bytes: bytes, num_tensors: int) -> list[str]:
    """--no-qdq on a model with If/Loop/Scan bodies: only the top-level tensors were calibrated."""
    import onnx

    from trtcal.export.graph_rules import iter_subgraphs

    bodies = [label for label, _ in iter_subgraphs(onnx.load_from_string(model_bytes).graph)]
    if not bodies:
        return []
    return [
        f"the model has {len(bodies)} If/Loop/Scan bodies ({', '.join(bodies[:4])}{', ...' if len(bodies) > 4 else ''}); "
        f"only the {num_tensors} top-level tensors were calibrated, tensors inside the bodies have no range"
    ]


def _run_tensorrt(model_path: Path, batch: Any, request: ActorRequest, progress: ProgressCallback) -> ActorResult:
    """`--backend tensorrt`: TensorRT's own calibrator, fed from the batch, on this actor's GPU.

    TensorRT's advice is one calibration batch of every sample (its entropy histograms depend on
    how samples are grouped and ordered), so the whole batch is one TensorRT batch when it fits in
    GPU memory; otherwise the largest batch that fits, with a warning (`--micro-batch` sizes
    ONNX Runtime runs, not this).
    """
    from trtcal.core import read_trt_cache
    from trtcal.runners.tensorrt import calibrate_with_tensorrt
    from trtcal.runners.tensorrt.calibrate import bytes_per_sample, single_batch_plan
    from trtcal.runners.tensorrt.device_memory import load_device_memory
    from trtcal.runners.tensorrt.version import load_tensorrt

    config = request.calibration
    method = config.algorithms[0]
    load_tensorrt()  # TensorRT missing is the first thing to say
    memory = load_device_memory()
    sample_bytes = bytes_per_sample(model_path)
    free_bytes = memory.free_bytes() if hasattr(memory, "free_bytes") else None
    micro_batch, dropped = single_batch_plan(batch.num_rows, sample_bytes, free_bytes)
    warnings: list[str] = []
    if micro_batch < batch.num_rows:
        warnings.append(
            f"TensorRT calibrates the {batch.num_rows} samples in batches of {micro_batch}"
            f"{f', leaving out the last {dropped}' if dropped else ''}: one batch of all of them needs about "
            f"{batch.num_rows * sample_bytes / 2**30:.1f} GiB of GPU memory and {free_bytes / 2**30:.1f} GiB are free. "
            "TensorRT's entropy scales then depend on the order and grouping of the samples; trtcal's own "
            "backend (the default) gives the same scales for any grouping"
        )
        logger.warning("%s", warnings[-1])
    t0 = time.perf_counter()
    progress.start("tensorrt", None, "")
    cache = calibrate_with_tensorrt(
        str(model_path), batch, algorithm=method, micro_batch=micro_batch, trt_version=config.trt_version,
        partial_batch="drop" if dropped else None, device_memory=memory, progress=progress,
    )
    progress.finish("tensorrt")
    timings = {"tensorrt_calibration": time.perf_counter() - t0}
    amax = {method: read_trt_cache(cache).amax}
    files = {"calibration.cache": cache, f"calibration.{method}.cache": cache}
    if request.export_qdq:
        files[QDQ_ARTIFACT], _ = _qdq_bytes(model_path, amax[method], config.allow_empty)
    import tensorrt

    return ActorResult(
        files=files, amax=amax, num_tensors=len(amax[method]), num_samples=batch.num_rows, timings=timings,
        runner={"kind": "tensorrt-cuda", "version": str(tensorrt.__version__), "tensorrt_batch": micro_batch},
        warnings=tuple(warnings),
    )


def model_inputs(model_bytes: bytes) -> list[str]:
    """The model's graph inputs that are not initializers."""
    from trtcal.model import input_names

    return input_names(model_bytes)


def open_given_batch(
    url: str, model_bytes: bytes, storage_options: Mapping[str, Any], inputs: Mapping[str, Any] | None = None
) -> Any:
    """An .arrow batch (any fsspec URL) or a local .npy/.npz as a CalibrationBatch.

    `inputs` (declared input specs, JSON form) go into a .npy/.npz batch's spec, so the runners feed
    its arrays as declared (batch axes, constants, masks); an .arrow batch carries the specs it was
    built with, and different ones are a ConfigError (rebuild it with them)."""
    from trtcal.batch import open_any

    spec = {"inputs": dict(inputs)} if inputs else None
    batch = open_any(url, lambda: model_inputs(model_bytes), spec=spec, **dict(storage_options))
    if inputs and dict(batch.spec.get("inputs") or {}) != dict(inputs):
        raise ConfigError(
            f"--inputs {json.dumps(dict(inputs), sort_keys=True)} differ from the input specs batch {url!r} was built with "
            f"({json.dumps(batch.spec.get('inputs') or {}, sort_keys=True)}); a built batch keeps its own: rebuild it "
            "with these --inputs, or leave --inputs out"
        )
    return batch


# --- the actor and its driver side ----------------------------------------------------------------


class CalibrationActor:
    """Made remote by `run_actor`. Two threads: `calibrate` runs in one while the driver polls `progress`."""

    def __init__(self) -> None:
        from trtcal.orchestrator.process_memory import return_freed_memory_early

        return_freed_memory_early()  # this process is trtcal's: its freed tensors go back to the system
        self.log = ProgressLog()

    def ready(self) -> dict[str, Any]:
        import socket

        import ray

        return {"pid": os.getpid(), "host": socket.gethostname(), "gpu_ids": list(ray.get_gpu_ids()), "node_id": _node_id(ray)}

    def progress(self) -> tuple[int, list[tuple[Any, ...]]]:
        return os.getpid(), self.log.drain()

    def calibrate(self, request: ActorRequest, batch_bytes: bytes | None) -> ActorResult:
        from trtcal._secrets import forwarded_env

        with forwarded_env(request.env):
            return run_calibration(request, progress=self.log, batch_bytes=batch_bytes)


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


def run_actor(
    ray: Any, device: str, request: ActorRequest, source: BatchSource, progress: ProgressCallback
) -> ActorResult:
    """Start a calibration actor on `device` ("cpu"/"gpu"), run `request`, relay its progress, kill it."""
    from trtcal._secrets import driver_env

    if device == "gpu" and request.calibration.device == "cpu":
        request = replace(request, calibration=replace(request.calibration, device="cuda"))
    # An actor on another node reads the store with the driver's credentials (an argument, never a runtime env).
    request = replace(request, env={**driver_env(), **request.env})
    # Restarted by Ray if its process dies; the call is retried against the stored batch.
    actor_cls = ray.remote(CalibrationActor).options(
        num_cpus=1, num_gpus=1.0 if device == "gpu" else 0.0, max_restarts=2, max_task_retries=2, max_concurrency=2,
    )
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
        result_ref = actor.calibrate.remote(replace(request, batch_url=batch_url), batch_bytes)
        _follow(ray, actor, result_ref, forward)
        result: ActorResult = ray.get(result_ref)
        return result
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
