"""Data-parallel statistics: k workers each take a contiguous slice of the batch rows.

Pass 1 results (exact max |x|, min, max, counts) and pass 2 results (integer histograms on the
merged amax) merge exactly (`trtcal.core.merge_stats`, integer addition), in any order, so the
merged statistics equal a single worker's bit for bit *given the same per-sample activations*.
Slices are cut on micro-batch boundaries (`plan_slices`): every micro-batch of the one-worker
run is a micro-batch of exactly one slice, so even kernels whose rounding depends on the batch
size see the same micro-batches. Two GPUs of the same model, driver and libraries then compute
the same activations (the runners use deterministic FP32 kernels, no TF32).

The per-slice functions (`stats_for_slice`, `counts_for_slice`) are pure given a runner (any
`trtcal.runners.base.Runner`; the same signatures) and a batch, so a Ray actor can call them as well as the worker processes of `DataParallelStatistics`
(one process per GPU, started once and reused for both passes).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from trtcal.core.histogram import DEFAULT_NUM_BINS, NonFinitePolicy, TensorStats, merge_stats
from trtcal.errors import ConfigError, WorkerError
from trtcal.progress import NO_PROGRESS, ProgressCallback
from trtcal.runners.base import Runner
from trtcal.runners.factory import make_runner

if TYPE_CHECKING:
    from trtcal.batch import CalibrationBatch

__all__ = [
    "WorkerSpec",
    "DataParallelStatistics",
    "plan_slices",
    "stats_for_slice",
    "counts_for_slice",
    "merge_slice_stats",
    "merge_slice_counts",
    "hist_amax_of",
    "collect_sliced",
    "open_runner",
    "open_batch_for",
]

log = logging.getLogger(__name__)

RunnerKind = Literal["torch", "onnxruntime", "onnxruntime-device"]


def plan_slices(num_rows: int, num_workers: int, micro_batch: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [start, stop) covering [0, num_rows), cut on micro-batch boundaries.

    Micro-batches are spread as evenly as possible (the first slices take one more when they do
    not divide); there are never more slices than micro-batches, and none is empty.

    Raises:
        ConfigError: num_rows < 0, num_workers < 1 or micro_batch < 1.
    """
    if num_rows < 0 or num_workers < 1 or micro_batch < 1:
        raise ConfigError(
            f"plan_slices needs num_rows >= 0, num_workers >= 1, micro_batch >= 1; got {num_rows}, {num_workers}, {micro_batch}"
        )
    batches = -(-num_rows // micro_batch)
    workers = min(num_workers, batches)
    if workers == 0:
        return []
    base, extra = divmod(batches, workers)
    slices, first = [], 0
    for i in range(workers):
        count = base + (1 if i < extra else 0)
        start, stop = first * micro_batch, min((first + count) * micro_batch, num_rows)
        slices.append((start, stop))
        first += count
    return slices


def stats_for_slice(
    runner: Runner, batch: CalibrationBatch, start: int, stop: int, *, micro_batch: int, nonfinite: NonFinitePolicy = "error"
) -> dict[str, TensorStats]:
    """Pass 1 over rows [start, stop) of `batch`."""
    return runner.collect_stats(batch, start=start, stop=stop, micro_batch=micro_batch, nonfinite=nonfinite)


def counts_for_slice(
    runner: Runner,
    batch: CalibrationBatch,
    hist_amax: Mapping[str, float],
    start: int,
    stop: int,
    *,
    num_bins: int = DEFAULT_NUM_BINS,
    micro_batch: int,
    nonfinite: NonFinitePolicy = "error",
) -> dict[str, npt.NDArray[np.int64]]:
    """Pass 2 over rows [start, stop) of `batch`, on the merged pass-1 ranges."""
    return runner.collect_counts(
        batch, hist_amax, num_bins=num_bins, start=start, stop=stop, micro_batch=micro_batch, nonfinite=nonfinite
    )


def merge_slice_stats(parts: Sequence[Mapping[str, TensorStats]]) -> dict[str, TensorStats]:
    """Exact merge of per-slice pass-1 results (every slice must hold the same tensors)."""
    if not parts:
        raise ConfigError("merge_slice_stats needs at least one slice result")
    names = list(parts[0])
    for p in parts[1:]:
        if list(p) != names:
            raise ConfigError("slice results hold different tensors; every worker must run the same tensor selection")
    return {n: merge_stats(p[n] for p in parts) for n in names}


def merge_slice_counts(parts: Sequence[Mapping[str, npt.NDArray[np.int64]]]) -> dict[str, npt.NDArray[np.int64]]:
    """Exact merge of per-slice pass-2 counts (integer addition)."""
    if not parts:
        raise ConfigError("merge_slice_counts needs at least one slice result")
    names = list(parts[0])
    out = {}
    for n in names:
        total = np.zeros_like(np.asarray(parts[0][n], dtype=np.int64))
        for p in parts:
            if n not in p or p[n].shape != total.shape:
                raise ConfigError(f"slice results disagree on tensor {n!r} (missing, or a different number of bins)")
            total += p[n]
        out[n] = total
    return out


def hist_amax_of(stats: Mapping[str, TensorStats]) -> dict[str, float]:
    """The pass-2 histogram range of each tensor: its merged exact amax."""
    return {n: float(s.amax) for n, s in stats.items()}


def collect_sliced(
    runner: Runner,
    batch: CalibrationBatch,
    slices: Sequence[tuple[int, int]],
    *,
    micro_batch: int,
    num_bins: int = DEFAULT_NUM_BINS,
    nonfinite: NonFinitePolicy = "error",
) -> tuple[dict[str, TensorStats], dict[str, npt.NDArray[np.int64]]]:
    """Both passes over `slices` in this process, one after another, merged (the k-worker result
    computed by one worker; used to check that slicing changes nothing)."""
    stats = merge_slice_stats(
        [stats_for_slice(runner, batch, a, b, micro_batch=micro_batch, nonfinite=nonfinite) for a, b in slices]
    )
    amax = hist_amax_of(stats)
    counts = merge_slice_counts(
        [
            counts_for_slice(runner, batch, amax, a, b, num_bins=num_bins, micro_batch=micro_batch, nonfinite=nonfinite)
            for a, b in slices
        ]
    )
    return stats, counts


# ------------------------------------------------------------------------------------------------
# Worker processes
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What one worker process opens (picklable; paths, not objects).

    Attributes:
        model: path of the ONNX model.
        batch: path of the calibration batch (.arrow, or .npy with `input_name`).
        input_name: the model input a .npy batch feeds.
        runner: "torch" (PyTorch interpreter), "onnxruntime" (CPU ORT, host kernels) or
            "onnxruntime-device" (ORT with device kernels; CUDA needs onnxruntime-gpu).
        device: "cuda:N" or "cpu"; `DataParallelStatistics` sets one per worker.
        tensors: "all", "quantizable" or tensor names.
        kernel_backend: device kernel backend ("auto", "torch", "cupy").
        verify_batch: recompute the batch fingerprint on open (the parent usually did).
        intra_op_num_threads: ONNX Runtime threads for the ORT runners (0: one per core).
    """

    model: str
    batch: str
    input_name: str | None = None
    runner: RunnerKind = "torch"
    device: str = "cuda:0"
    tensors: str | tuple[str, ...] = "all"
    kernel_backend: str = "auto"
    verify_batch: bool = False
    intra_op_num_threads: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.runner not in ("torch", "onnxruntime", "onnxruntime-device"):
            raise ConfigError(f"runner must be 'torch', 'onnxruntime' or 'onnxruntime-device', got {self.runner!r}")


def open_runner(spec: WorkerSpec) -> Runner:
    """Build the runner a spec names (imports the heavy modules here, in the worker)."""
    tensors: Any = spec.tensors if isinstance(spec.tensors, str) else list(spec.tensors)
    return make_runner(
        spec.model, kind=spec.runner, tensors=tensors, device=spec.device, kernel_backend=spec.kernel_backend,
        intra_op_num_threads=spec.intra_op_num_threads,
    )


def open_batch_for(spec: WorkerSpec) -> Any:
    """Open the spec's calibration batch (memory-mapped; every worker maps the same file)."""
    from trtcal.batch import open_any

    return open_any(spec.batch, [spec.input_name] if spec.input_name else [], verify=spec.verify_batch)


def _worker_main(conn: Any, spec: WorkerSpec) -> None:
    """One worker: open runner and batch once, then serve pass-1 / pass-2 requests."""
    try:
        started = time.perf_counter()
        if spec.device.startswith("cuda") and spec.runner != "onnxruntime":
            import torch

            # This process works on one GPU: make it the current one, so that every library
            # (PyTorch, CuPy, ONNX Runtime) allocates and launches there by default.
            torch.cuda.set_device(torch.device(spec.device))
        runner = open_runner(spec)
        batch = open_batch_for(spec)
        conn.send(("ready", {"device": spec.device, "seconds": time.perf_counter() - started, "rows": batch.num_rows}))
    except BaseException as exc:  # report, then exit: the parent raises it
        conn.send(("error", _portable(exc)))
        return
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request[0] == "close":
            return
        try:
            kind, kwargs = request
            if kind == "stats":
                result: Any = stats_for_slice(runner, batch, **kwargs)
            elif kind == "counts":
                result = counts_for_slice(runner, batch, **kwargs)
            else:
                raise ConfigError(f"unknown request {kind!r}")
            conn.send(("ok", result))
        except BaseException as exc:
            conn.send(("error", _portable(exc)))


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it pickles (trtcal errors do), else a WorkerError with the traceback."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return WorkerError(f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc))}")


class DataParallelStatistics:
    """One persistent worker process per device; both passes split by `plan_slices`, merged exactly.

    Args:
        spec: what each worker opens (its `device` is replaced by each entry of `devices`).
        devices: one worker per entry, e.g. ["cuda:0", "cuda:1"] (or ["cpu", "cpu"]).
        start_method: multiprocessing start method ("spawn": CUDA cannot be forked).

    Use as a context manager; `ready_seconds` holds each worker's start-up time.

    Raises:
        WorkerError: a worker died or could not start (the device is named).
        TrtcalError: what a worker raised (e.g. NonFiniteError), re-raised in the parent.
    """

    def __init__(self, spec: WorkerSpec, devices: Sequence[str], *, start_method: str = "spawn") -> None:
        if not devices:
            raise ConfigError("devices: give at least one device")
        self.devices = list(devices)
        ctx: Any = multiprocessing.get_context(start_method)
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self.ready_seconds: list[float] = []
        try:
            for device in self.devices:
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main, args=(child, replace(spec, device=device)), name=f"trtcal-stats-{device}", daemon=True
                )
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            for info in self._gather():
                self.ready_seconds.append(float(info["seconds"]))
        except BaseException:
            self.close()
            raise

    def _gather(self, count: int | None = None) -> list[Any]:
        """Replies of the first `count` workers (all by default), in worker order."""
        results = []
        failure: BaseException | None = None
        chosen = list(zip(self.devices, self._conns, self._procs))[:count]
        for device, conn, proc in chosen:
            try:
                status, payload = conn.recv()
            except (EOFError, OSError):
                proc.join(timeout=5)
                failure = failure or WorkerError(
                    f"statistics worker on {device} died (exit code {proc.exitcode}); see its log for the cause",
                    actor_id=proc.name,
                )
                continue
            if status == "error":
                failure = failure or payload
            else:
                results.append(payload)
        if failure is not None:
            raise failure
        return results

    def _run(self, kind: str, slices: Sequence[tuple[int, int]], **kwargs: Any) -> list[Any]:
        for conn, (start, stop) in zip(self._conns, slices):
            conn.send((kind, {"start": start, "stop": stop, **kwargs}))
        return self._gather(len(slices))

    def collect(
        self,
        num_rows: int,
        *,
        micro_batch: int,
        num_bins: int = DEFAULT_NUM_BINS,
        nonfinite: NonFinitePolicy = "error",
        progress: ProgressCallback = NO_PROGRESS,
        histograms: bool = True,
    ) -> tuple[dict[str, TensorStats], dict[str, npt.NDArray[np.int64]]]:
        """Pass 1 on every worker, merge, pass 2 on the merged amax, merge. Returns (stats, counts);
        counts is empty with `histograms=False` (pass 1 only)."""
        slices = plan_slices(num_rows, len(self.devices), micro_batch)
        if not slices:
            raise ConfigError("the calibration batch is empty: nothing to collect")
        progress.start("statistics", (2 if histograms else 1) * len(slices), "slice")
        stats = merge_slice_stats(self._run("stats", slices, micro_batch=micro_batch, nonfinite=nonfinite))
        progress.advance("statistics", len(slices))
        if not histograms:
            progress.finish("statistics")
            return stats, {}
        amax = hist_amax_of(stats)
        counts = merge_slice_counts(
            self._run("counts", slices, hist_amax=amax, num_bins=num_bins, micro_batch=micro_batch, nonfinite=nonfinite)
        )
        progress.advance("statistics", len(slices))
        progress.finish("statistics")
        return stats, counts

    def close(self) -> None:
        """Stop the workers (they exit on request; any still alive after 10 s is terminated)."""
        for conn in self._conns:
            try:
                conn.send(("close",))
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def __enter__(self) -> DataParallelStatistics:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
