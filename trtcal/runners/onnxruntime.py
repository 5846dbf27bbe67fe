"""FP32 activation statistics with ONNX Runtime, streamed over a calibration batch.

The selected tensors (`trtcal.model.select_tensors`) become extra graph outputs of a copy of the
model, run with `GraphOptimizationLevel.ORT_DISABLE_ALL`: every node executes as written, so each
tensor's name and values are those of the graph (ONNX Runtime's own calibrators do the same).
Measured on EfficientNet-Lite0 (onnxruntime 1.32, CPU): ORT_ENABLE_BASIC and ORT_ENABLE_EXTENDED
give bitwise the same values for all 95 tensors; ORT_ENABLE_ALL changes 94 of them by up to 1e-4
absolute (NCHWc layout kernels) and is slower once they are outputs (reorders back to NCHW per
tensor).

The passes (`collect_stats`, `collect_counts`) are `trtcal.runners.base.BaseRunner`'s; this runner
supplies `infer_impl`: one session run per micro-batch, writing into the output buffers of the
previous run (IOBinding), so memory does not grow with the number of samples.

Batch layouts: a model input of rank r takes samples of rank r-1 (stacked along a new leading
batch axis; a fixed leading dimension B means micro-batches of exactly B rows, B = 1 runs sample
by sample) or samples of rank r (the model has no batch axis: one sample per run).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal.errors import BackendUnavailableError, ConfigError, DataError, ModelError
from trtcal.model import (
    LoadedModel,
    TensorSelection,
    load_model,
    model_inputs,
    select_tensors,
    with_extra_outputs,
)
from trtcal.runners.base import BaseRunner

if TYPE_CHECKING:
    import onnx


__all__ = ["GRAPH_OPTIMIZATION_LEVEL", "OnnxRuntimeRunner"]

logger = logging.getLogger(__name__)

RUNNER_KIND = "onnxruntime"
GRAPH_OPTIMIZATION_LEVEL = "ORT_DISABLE_ALL"


def _batch_of_one_hint(exc: BaseException, feed: Mapping[str, Any]) -> str:
    """A hint for the usual cause of a shape error on a micro-batch of several samples: a batch of 1
    fixed inside the graph (a Reshape to [1, ...]) behind an input whose batch axis looks dynamic."""
    rows = max((int(np.shape(a)[0]) for a in feed.values() if np.ndim(a) > 0), default=1)
    text = str(exc).lower()
    if rows > 1 and ("reshape" in text or "shape" in text or "broadcast" in text):
        return (
            f". The micro-batch had {rows} samples: if the model fixes a batch of 1 inside its graph (a Reshape to "
            "[1, ...] behind a dynamic input), rerun with --micro-batch 1"
        )
    return ""


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise BackendUnavailableError("onnxruntime is required: pip install onnxruntime") from exc
    return onnxruntime


# ---------------------------------------------------------------------------------------------
# The runner


def _providers(device: str) -> list[Any]:
    ort = _ort()
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                f"device {device!r} needs onnxruntime's CUDAExecutionProvider, which this install lacks "
                f"(available: {available}); install onnxruntime-gpu or use device='cpu'"
            )
        device_id = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


_FLOAT_ORT_TYPES = frozenset({"tensor(float)", "tensor(float16)", "tensor(double)"})


class OnnxRuntimeRunner(BaseRunner):
    """Runs the FP32 model with the selected tensors as extra outputs; collects statistics.

    Args:
        model: path, bytes, ModelProto or a `LoadedModel`.
        tensors: "all", "quantizable" or tensor names (see `select_tensors`).
        device: "cpu" (default) or "cuda"/"cuda:N" (needs onnxruntime-gpu).
        intra_op_num_threads: ONNX Runtime threads (0: one per core).

    Raises:
        ModelError: the model cannot be loaded or ONNX Runtime refuses it.
        BackendUnavailableError: CUDA asked for but not installed.
    """

    kind = RUNNER_KIND

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes | onnx.ModelProto | LoadedModel,
        *,
        tensors: TensorSelection = "all",
        device: str = "cpu",
        intra_op_num_threads: int = 0,
    ) -> None:
        ort = _ort()
        self.version: str = ort.__version__
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.device = device
        self.providers = _providers(device)
        self.inputs = model_inputs(self.model.proto)
        selected = select_tensors(self.model.proto, tensors)
        self._session_options = ort.SessionOptions()
        self._session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self._session_options.intra_op_num_threads = int(intra_op_num_threads)
        self._session_options.log_severity_level = 3
        session = self._make_session(selected)
        out_types = {o.name: o.type for o in session.get_outputs()}
        dropped = [n for n in selected if n not in self.inputs and out_types.get(n) not in _FLOAT_ORT_TYPES]
        if dropped:
            logger.info("not calibrating %d non-floating tensors: %s", len(dropped), dropped[:10])
            selected = [n for n in selected if n not in dropped]
            session = self._make_session(selected)
        if not selected:
            raise ModelError(f"model {self.model.source!r} has no floating activation tensors to calibrate")
        self._session = session
        self.tensor_names: tuple[str, ...] = tuple(selected)
        # Graph inputs are read from the feed; everything else is fetched from the session.
        self._fetch = [n for n in self.tensor_names if n not in self.inputs]
        self._reuse: tuple[Any, dict[str, npt.NDArray[Any]]] | None = None
        self._binding_ok = self.providers == ["CPUExecutionProvider"]

    def _make_session(self, names: Sequence[str]) -> Any:
        ort = _ort()
        augmented = with_extra_outputs(self.model.proto, [n for n in names if n not in self.inputs])
        try:
            data = augmented.SerializeToString()
        except ValueError as exc:
            raise ModelError(
                f"model {self.model.source!r} is too large to run from memory ({exc}); models over 2 GiB are "
                "not supported by the ONNX Runtime runner yet"
            ) from None
        try:
            return ort.InferenceSession(data, self._session_options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelError(f"ONNX Runtime cannot load model {self.model.source!r}: {exc}") from None

    # -- description
    @property
    def info(self) -> dict[str, Any]:
        """What identifies this runner in a manifest / cache key."""
        return {
            "kind": self.kind,
            "version": self.version,
            "device": self.device,
            "providers": [p if isinstance(p, str) else p[0] for p in self.providers],
            "graph_optimization_level": GRAPH_OPTIMIZATION_LEVEL,
        }

    # -- running
    def infer_impl(self, feed: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
        values = self._run_reusing(feed)
        for name in self.tensor_names:
            yield name, values.pop(name)  # drop each reference once reduced

    def run(self, feed: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """One inference: the selected tensors' values for one feed (graph inputs come from the feed).

        The arrays are the caller's to keep.
        """
        try:
            values = self._session.run(self._fetch, dict(feed))
        except Exception as exc:
            raise DataError(f"ONNX Runtime failed on model {self.model.source!r}: {exc}{_batch_of_one_hint(exc, feed)}") from None
        out = {n: np.asarray(feed[n]) for n in self.tensor_names if n in self.inputs}
        out.update(zip(self._fetch, values))
        return {n: out[n] for n in self.tensor_names}

    def _run_reusing(self, feed: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Like `run`, but the outputs land in buffers reused by the next call (valid until then).

        A fresh output array per run costs more than the convolutions (the pages of ~50 MB per
        EfficientNet-Lite0 image are faulted in and zeroed every time); ONNX Runtime writes into
        the buffers of an earlier run instead (IOBinding). Only one set of buffers is kept. A
        shorter last micro-batch writes into the leading rows of the same buffers when every
        output's first axis is the batch axis; ONNX Runtime checks the bound shapes, and anything
        that does not fit falls back to a plain run.
        """
        shapes = {n: a.shape for n, a in feed.items()}
        if self._reuse is not None and self._binding_ok:
            reuse_shapes, buffers = self._reuse
            if shapes == reuse_shapes:
                bound = self._bind_and_run(feed, buffers)
            else:
                bound = self._bind_and_run(feed, self._leading_rows(shapes, reuse_shapes, buffers))
            if bound is not None:
                out = {n: np.asarray(feed[n]) for n in self.tensor_names if n in self.inputs}
                out.update(bound)
                return {n: out[n] for n in self.tensor_names}
        self._reuse = None  # drop the old buffers first: one set of activations at a time
        values = self.run(feed)
        fetched = [values[n] for n in self._fetch]
        if self._binding_ok and all(a.flags.c_contiguous and a.flags.writeable for a in fetched):
            self._reuse = (shapes, dict(zip(self._fetch, fetched)))
        return values

    @staticmethod
    def _leading_rows(
        shapes: Mapping[str, tuple[int, ...]],
        reuse_shapes: Mapping[str, tuple[int, ...]],
        buffers: Mapping[str, npt.NDArray[Any]],
    ) -> dict[str, npt.NDArray[Any]] | None:
        """Views of the first `rows` rows of each buffer, when the feed is a shorter micro-batch."""
        if set(shapes) != set(reuse_shapes):
            return None
        leading = {s[0] for s in shapes.values() if s} | {-1 for s in shapes.values() if not s}
        full = {s[0] for s in reuse_shapes.values() if s} | {-1 for s in reuse_shapes.values() if not s}
        if len(leading) != 1 or len(full) != 1:
            return None
        rows, full_rows = leading.pop(), full.pop()
        if not 0 < rows < full_rows or any(shapes[n][1:] != reuse_shapes[n][1:] for n in shapes):
            return None
        if any(b.ndim == 0 or b.shape[0] != full_rows for b in buffers.values()):
            return None
        return {n: b[:rows] for n, b in buffers.items()}

    def _bind_and_run(
        self, feed: Mapping[str, npt.NDArray[Any]], buffers: Mapping[str, npt.NDArray[Any]] | None
    ) -> Mapping[str, npt.NDArray[Any]] | None:
        if buffers is None:
            return None
        binding = self._session.io_binding()
        try:
            for name, arr in feed.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(arr))
            for name, buf in buffers.items():
                binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            self._session.run_with_iobinding(binding)
        except Exception as exc:
            # A data-dependent output shape, or a first axis that is not the batch axis: run plainly.
            logger.debug("writing into reused output buffers failed (%s); running plainly", exc)
            return None
        return buffers

    def release_buffers(self) -> None:
        """Free the reused output buffers (about one micro-batch of activations)."""
        self._reuse = None

    def close(self) -> None:
        """Free the session too (its allocator keeps its peak); the runner cannot run afterwards."""
        self._reuse = None
        self._session = None
