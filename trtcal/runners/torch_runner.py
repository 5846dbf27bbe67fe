"""FP32 statistics passes on the GPU: activations are produced and reduced on the device.

Two engines feed the device kernels of `trtcal.runners.gpu_histogram`:

* `TorchRunner` runs the ONNX graph with PyTorch alone (`trtcal.runners.torch_graph.TorchGraph`,
  a small interpreter over the ops in `SUPPORTED_OPS`), so a PyTorch-only GPU image works. Each
  selected tensor is handed to the collectors as soon as it is computed, under its ONNX name,
  then freed after its last consumer.
* `OrtDeviceRunner` runs ONNX Runtime (CUDA provider when onnxruntime-gpu is installed) with the
  selected tensors bound as device outputs (IOBinding) and passes them to the kernels through
  DLPack without a copy. On a CPU-only install it runs the CPU provider with the same code.

Both are `trtcal.runners.base.BaseRunner`s: the same model loading, tensor selection, batch
layouts and collection loop as `OnnxRuntimeRunner`; they supply only `infer_impl`, device
collectors and the upload of each micro-batch. FP32 is kept honest: TF32 is off for convolutions
and matrix products, and cuDNN runs deterministic algorithms without autotuning, so two passes
(and two GPUs of one kind) compute the same activations bit for bit for the same micro-batches.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from trtcal.core.histogram import NonFinitePolicy
from trtcal.errors import BackendUnavailableError, ConfigError, DataError, ModelError
from trtcal.model import LoadedModel, TensorSelection, load_model, model_inputs, select_tensors
from trtcal.runners.base import BaseRunner, Collector
from trtcal.runners.gpu_histogram import DeviceHistogramCollector, DeviceStatsCollector, KernelBackend
from trtcal.runners.torch_graph import SUPPORTED_OPS, TorchGraph, Value, _torch

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = ["SUPPORTED_OPS", "TorchGraph", "TorchRunner", "OrtDeviceRunner", "torch_device", "fp32_exact"]

log = logging.getLogger(__name__)

def torch_device(device: str) -> torch.device:
    """Parse "cpu" / "cuda" / "cuda:N"; BackendUnavailableError if CUDA is asked for but absent."""
    th = _torch()
    if not isinstance(device, str) or not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "cpu":
        return cast("torch.device", th.device("cpu"))
    if not th.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU; use device='cpu'")
    index = int(device.partition(":")[2] or th.cuda.current_device())
    if index >= th.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {th.cuda.device_count()} CUDA device(s) are visible")
    return cast("torch.device", th.device("cuda", index))


@contextlib.contextmanager
def fp32_exact() -> Iterator[None]:
    """True FP32 (no TF32) and deterministic cuDNN algorithms without autotuning, restored after."""
    torch = _torch()
    saved = (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        ) = saved


class _Staging:
    """Host -> device copies of micro-batches through two pinned buffers per input.

    The host fills one buffer while the device still copies from the other, so reading the
    memory-mapped batch overlaps the GPU's work on the previous micro-batch.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._slots: list[dict[str, Any]] = [{}, {}]
        self._events: list[Any] = [None, None]
        self._turn = 0

    def upload(self, arrays: Mapping[str, npt.NDArray[Any]]) -> dict[str, Value]:
        torch = _torch()
        if self.device.type != "cuda":
            return {n: torch.from_numpy(np.array(a, copy=True)) for n, a in arrays.items()}
        slot, event = self._slots[self._turn], self._events[self._turn]
        if event is not None:
            event.synchronize()  # the device finished copying out of this pinned buffer
        out = {}
        for name, arr in arrays.items():
            buf = slot.get(name)
            if buf is None or buf.numel() < arr.size or buf.dtype != getattr(torch, arr.dtype.name):
                buf = slot[name] = torch.empty(arr.size, dtype=getattr(torch, arr.dtype.name), pin_memory=True)
            host = buf[: arr.size].view(arr.shape)
            np.copyto(host.numpy(), arr, casting="no")
            out[name] = host.to(self.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._events[self._turn] = done
        self._turn ^= 1
        return out


class _BoundCollector:
    """A device collector seen as a `trtcal.runners.base.Collector` (results copied back once)."""

    def __init__(self, update: Callable[[str, Value], None], result: Callable[[], dict[str, Any]]) -> None:
        self.update = update
        self.result = result


class _DeviceRunnerBase(BaseRunner):
    """The base loop with the reductions on the device, under exact FP32 and inference mode."""

    kind = "device"
    # No budget by default: the values live in GPU memory, and small runs are slow there (measured:
    # 5 samples per run instead of 128 made EfficientNet-Lite0 7x slower on an H100).
    default_activation_budget_mib = 0
    device: torch.device
    kernel_backend: KernelBackend

    def _stats_collector(self, nonfinite: NonFinitePolicy) -> Collector:
        collector = DeviceStatsCollector(self.tensor_names, device=self.device, backend=self.kernel_backend)
        return _BoundCollector(collector.update, lambda: collector.results(nonfinite=nonfinite))

    def _counts_collector(self, hist_amax: Mapping[str, float], num_bins: int, nonfinite: NonFinitePolicy) -> Collector:
        collector = DeviceHistogramCollector(
            {n: float(hist_amax[n]) for n in self.tensor_names},
            num_bins=num_bins,
            device=self.device,
            backend=self.kernel_backend,
        )
        return _BoundCollector(
            collector.update, lambda: {n: h.counts for n, h in collector.results(nonfinite=nonfinite).items()}
        )

    @contextlib.contextmanager
    def _pass_context(self) -> Iterator[None]:
        with fp32_exact(), _inference():
            yield

    def _uploader(self) -> Callable[[dict[str, npt.NDArray[Any]]], Mapping[str, Value]]:
        return _Staging(self.device).upload


@contextlib.contextmanager
def _inference() -> Iterator[None]:
    torch = _torch()
    with torch.inference_mode():
        yield


class TorchRunner(_DeviceRunnerBase):
    """The FP32 model run by PyTorch (no ONNX Runtime); statistics computed on the same device.

    Args:
        model: path, bytes, ModelProto or a `LoadedModel`.
        tensors: "all", "quantizable" or tensor names (see `trtcal.runners.onnxruntime.select_tensors`).
        device: "cuda" (default), "cuda:N" or "cpu".
        kernel_backend: "auto", "torch" or "cupy" (see `trtcal.runners.gpu_histogram`).

    Raises:
        ModelError: the model cannot be loaded or uses ops the interpreter lacks (see SUPPORTED_OPS).
        BackendUnavailableError: torch missing, or CUDA asked for but absent.
    """

    kind = "torch"

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes | onnx.ModelProto | LoadedModel,
        *,
        tensors: TensorSelection = "all",
        device: str = "cuda",
        kernel_backend: KernelBackend = "auto",
    ) -> None:
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.device = torch_device(device)
        self.kernel_backend = kernel_backend
        self.inputs = model_inputs(self.model.proto)
        self.graph = TorchGraph(self.model.proto, self.device)
        selected = select_tensors(self.model.proto, tensors)
        if not selected:
            raise ModelError(f"model {self.model.source!r} has no floating activation tensors to calibrate")
        self.tensor_names: tuple[str, ...] = tuple(selected)
        self._wanted = frozenset(selected)

    @property
    def info(self) -> dict[str, Any]:
        """What identifies this runner in a manifest / cache key."""
        torch = _torch()
        info: dict[str, Any] = {"kind": self.kind, "version": torch.__version__, "device": str(self.device)}
        if self.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.device)
            info["cuda"] = torch.version.cuda
            info["cudnn"] = torch.backends.cudnn.version()
        return info

    def infer_impl(self, feeds: Mapping[str, Value]) -> Iterator[tuple[str, Value]]:
        for name, value in self.graph.run(feeds, self._wanted):
            if not value.is_floating_point():
                # select_tensors keeps tensors of unknown type; integer ones are not calibrated.
                raise ModelError(
                    f"tensor {name!r} is {value.dtype}, not floating point; leave it out of `tensors`"
                )
            yield name, value

    def run(self, feed: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """One inference on host arrays: the selected tensors' values as numpy (for checks and tests)."""
        torch = _torch()
        feeds = {n: torch.from_numpy(np.array(a, copy=True)).to(self.device) for n, a in feed.items()}
        with fp32_exact(), _inference():
            return {n: v.detach().cpu().numpy() for n, v in self.infer_impl(feeds)}


class OrtDeviceRunner(_DeviceRunnerBase):
    """ONNX Runtime computes the activations; trtcal's kernels reduce them where ORT left them.

    With device "cuda"/"cuda:N" this needs onnxruntime-gpu (the CUDA execution provider): the
    selected tensors are bound as device outputs and reach the kernels through DLPack, never the
    host. With device "cpu" it is ONNX Runtime's CPU provider with the torch CPU kernels.

    Args:
        model, tensors: as for `OnnxRuntimeRunner`.
        device: "cuda" (default), "cuda:N" or "cpu".
        kernel_backend: see `trtcal.runners.gpu_histogram`.
        intra_op_num_threads: ONNX Runtime threads (0: one per core).
    """

    kind = "onnxruntime-device"

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes | onnx.ModelProto | LoadedModel,
        *,
        tensors: TensorSelection = "all",
        device: str = "cuda",
        kernel_backend: KernelBackend = "auto",
        intra_op_num_threads: int = 0,
    ) -> None:
        from trtcal.runners.onnxruntime import OnnxRuntimeRunner

        self.device = torch_device(device)
        self.kernel_backend = kernel_backend
        self._ort = OnnxRuntimeRunner(model, tensors=tensors, device=device, intra_op_num_threads=intra_op_num_threads)
        self.model = self._ort.model
        self.inputs = self._ort.inputs
        self.tensor_names = self._ort.tensor_names
        self._fetch = [n for n in self.tensor_names if n not in self.inputs]
        self._ort_device = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)

    @property
    def info(self) -> dict[str, Any]:
        return {**self._ort.info, "kind": self.kind}

    def infer_impl(self, feeds: Mapping[str, Value]) -> Iterator[tuple[str, Value]]:
        torch = _torch()
        session = self._ort._session
        binding = session.io_binding()
        device_type, device_id = self._ort_device
        held = []
        for name, tensor in feeds.items():
            tensor = tensor.contiguous()
            held.append(tensor)
            binding.bind_input(
                name, device_type, device_id, _ORT_ELEM[str(tensor.dtype)], list(tensor.shape), tensor.data_ptr()
            )
        for name in self._fetch:
            binding.bind_output(name, device_type, device_id)
        if device_type == "cuda":
            # ORT runs on its own stream: the inputs copied on torch's stream must be complete.
            torch.cuda.current_stream(self.device).synchronize()
        try:
            session.run_with_iobinding(binding)
        except Exception as exc:
            raise DataError(f"ONNX Runtime failed on model {self.model.source!r}: {exc}") from None
        outputs = dict(zip(self._fetch, binding.get_outputs()))
        for name in self.tensor_names:
            if name in feeds:
                yield name, feeds[name]
            else:
                value = outputs.pop(name)
                yield name, torch.from_dlpack(getattr(value, "_ortvalue", value))


_ORT_ELEM = {"torch.float32": np.float32, "torch.float16": np.float16, "torch.float64": np.float64,
             "torch.int64": np.int64, "torch.int32": np.int32, "torch.uint8": np.uint8, "torch.int8": np.int8}  # fmt: skip
