"""FP32 statistics passes on the GPU: activations are produced and reduced on the device.

Two engines feed the device kernels of `trtcal.runners.gpu_histogram`:

* `TorchRunner` runs the ONNX graph with PyTorch alone, node by node (a small interpreter over
  the ops listed in `SUPPORTED_OPS`), so a PyTorch-only GPU image works. Each selected tensor is
  handed to the collectors as soon as it is computed, under its ONNX name, then freed after its
  last consumer. Why an interpreter and not onnx2torch: calibration addresses tensors by their
  ONNX names, and an interpreter yields exactly those tensors with no FX-graph renaming to undo;
  it adds no dependency (onnx2torch pins its own onnx/torchvision ranges); each op's semantics are
  a few visible lines, tested against ONNX Runtime; and unsupported ops fail up front with a
  `ModelError` naming them (use ONNX Runtime's CUDA provider for those models).
* `OrtDeviceRunner` runs ONNX Runtime (CUDA provider when onnxruntime-gpu is installed) with the
  selected tensors bound as device outputs (IOBinding) and passes them to the kernels through
  DLPack without a copy. On a CPU-only install it runs the CPU provider with the same code.

Both expose the interface of `trtcal.runners.onnxruntime.OnnxRuntimeRunner` (`tensor_names`,
`layout`, `collect_stats`, `collect_counts`, `info`): the same model loading, tensor selection
and batch layouts, so either can replace it in the pipeline. FP32 is kept honest: TF32 is off
for convolutions and matrix products, and cuDNN runs deterministic algorithms without
autotuning, so two passes (and two GPUs of one kind) compute the same activations bit for bit
for the same micro-batches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from trtcal.core.histogram import DEFAULT_NUM_BINS, NonFinitePolicy, TensorStats
from trtcal.errors import BackendUnavailableError, ConfigError, DataError, ModelError
from trtcal.progress import NO_PROGRESS, ProgressCallback
from trtcal.runners.gpu_histogram import DeviceHistogramCollector, DeviceStatsCollector, KernelBackend
from trtcal.runners.onnxruntime import (
    LoadedModel,
    ModelInput,
    TensorSelection,
    load_model,
    row_range,
    select_tensors,
)

if TYPE_CHECKING:
    import onnx
    import torch

    from trtcal.runners.onnxruntime import BatchLayout
    from trtcal.workers.batch_format import CalibrationBatch

__all__ = ["SUPPORTED_OPS", "TorchGraph", "TorchRunner", "OrtDeviceRunner", "torch_device", "fp32_exact"]

log = logging.getLogger(__name__)

SUPPORTED_OPS = (
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "Conv", "Div",
    "Flatten", "Gather", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish",
    "Identity", "LeakyRelu", "MatMul", "MaxPool", "Mul", "ReduceMean", "Relu", "Reshape", "Shape",
    "Sigmoid", "Softmax", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
)  # fmt: skip


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(
            "the PyTorch runner needs torch (the `gpu` extra): pip install 'trtcal[gpu]'"
        ) from exc
    return torch


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


# ------------------------------------------------------------------------------------------------
# The interpreter
# ------------------------------------------------------------------------------------------------

Value = Any  # torch.Tensor; integer shape tensors are kept on the CPU


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(value: Any) -> list[int]:
    """A shape-like value (tensor, array, list) as Python ints (syncs if it lives on a GPU)."""
    if hasattr(value, "tolist"):
        out = value.tolist()
        return [int(v) for v in (out if isinstance(out, list) else [out])]
    return [int(v) for v in value]


def _scalar(value: Any) -> float:
    return float(value.reshape(-1)[0].item()) if hasattr(value, "reshape") else float(value)


def _pads(node: str, attrs: Mapping[str, Any], spatial_in: Sequence[int], kernel: Sequence[int],
          strides: Sequence[int], dilations: Sequence[int]) -> list[int]:  # fmt: skip
    nd = len(kernel)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * (2 * nd)))
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial_in, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        return begins + ends
    raise ModelError(f"node {node!r}: auto_pad {auto_pad!r} is not supported")


def _pad_input(x: Value, pads: Sequence[int], value: float = 0.0) -> tuple[Value, list[int]]:
    """Symmetric pads go to the op; asymmetric ones are applied here (F.pad wants last dim first)."""
    torch = _torch()
    nd = len(pads) // 2
    begins, ends = list(pads[:nd]), list(pads[nd:])
    if begins == ends:
        return x, begins
    flat: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        flat += [b, e]
    return torch.nn.functional.pad(x, flat, value=value), [0] * nd


def _on(device: Any, *values: Value) -> list[Value]:
    """Move CPU integer helpers next to a device operand (0-dim tensors may stay on the CPU)."""
    return [v.to(device) if v.device != device and v.dim() > 0 else v for v in values]


def _binary(op: Callable[[Value, Value], Value]) -> Callable[[Any, Mapping[str, Any], list[Value]], list[Value]]:
    def run(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
        a, b = xs
        if a.device != b.device:
            dev = a.device if a.device.type != "cpu" else b.device
            a, b = _on(dev, a, b)
        return [op(a, b)]

    return run


def _div(a: Value, b: Value) -> Value:
    torch = _torch()
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _op_conv(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
    torch = _torch()
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    nd = w.dim() - 2
    if nd not in (1, 2, 3):
        raise ModelError(f"Conv {node.name!r}: {nd}-D convolution is not supported")
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    pads = _pads(node.name, attrs, x.shape[2:], w.shape[2:], strides, dilations)
    x, padding = _pad_input(x, pads)
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[nd - 1]
    return [conv(x, w, b, stride=strides, padding=padding, dilation=dilations, groups=int(attrs.get("group", 1)))]


def _op_pool(kind: str) -> Callable[[Any, Mapping[str, Any], list[Value]], list[Value]]:
    def run(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
        torch = _torch()
        f = torch.nn.functional
        x = xs[0]
        kernel = list(attrs["kernel_shape"])
        nd = len(kernel)
        strides = list(attrs.get("strides", [1] * nd))
        dilations = list(attrs.get("dilations", [1] * nd))
        pads = _pads(node.name, attrs, x.shape[2:], kernel, strides, dilations)
        ceil = bool(attrs.get("ceil_mode", 0))
        if kind == "max":
            if len(node.output) > 1 and node.output[1]:
                raise ModelError(f"MaxPool {node.name!r}: the Indices output is not supported")
            x, padding = _pad_input(x, pads, value=-math.inf)
            pool = (f.max_pool1d, f.max_pool2d, f.max_pool3d)[nd - 1]
            return [pool(x, kernel, strides, padding, dilations, ceil_mode=ceil)]
        if any(d != 1 for d in dilations):
            raise ModelError(f"AveragePool {node.name!r}: dilations are not supported")
        if pads[:nd] != pads[nd:]:
            raise ModelError(f"AveragePool {node.name!r}: asymmetric pads {pads} are not supported")
        pool = (f.avg_pool1d, f.avg_pool2d, f.avg_pool3d)[nd - 1]
        include = bool(attrs.get("count_include_pad", 0))
        return [pool(x, kernel, strides, pads[:nd], ceil_mode=ceil, count_include_pad=include)]

    return run


def _op_clip(node: Any, attrs: Mapping[str, Any], xs: list[Value], opset: int) -> list[Value]:
    torch = _torch()
    x = xs[0]
    if opset < 11:
        lo, hi = attrs.get("min", -math.inf), attrs.get("max", math.inf)
    elif "_min" in attrs:  # bounds known when the graph was loaded: no device read per run
        lo, hi = attrs["_min"], attrs["_max"]
    else:
        lo = _scalar(xs[1]) if len(xs) > 1 and xs[1] is not None else -math.inf
        hi = _scalar(xs[2]) if len(xs) > 2 and xs[2] is not None else math.inf
    return [torch.clamp(x, min=None if lo == -math.inf else lo, max=None if hi == math.inf else hi)]


def _op_gemm(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
    torch = _torch()
    a, b = xs[0], xs[1]
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if len(xs) > 2 and xs[2] is not None:
        return [torch.addmm(xs[2], a, b, beta=beta, alpha=alpha)]
    y = a @ b
    return [y * alpha if alpha != 1.0 else y]


def _op_reshape(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
    x, shape = xs[0], _ints(xs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _op_flatten(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
    x = xs[0]
    axis = int(attrs.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    lead = math.prod(x.shape[:axis])
    return [x.reshape(lead, -1) if x.numel() else x.reshape(lead, math.prod(x.shape[axis:]))]


def _axes(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[int] | None:
    if len(xs) > 1 and xs[1] is not None:
        return _ints(xs[1])
    return list(attrs["axes"]) if "axes" in attrs else None


def _op_squeeze(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
    x, axes = xs[0], _axes(node, attrs, xs)
    if axes is None:
        return [x.squeeze()]
    axes = sorted(a + x.dim() if a < 0 else a for a in axes)
    for a in reversed(axes):
        x = x.squeeze(a)
    return [x]


def _op_unsqueeze(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
    x, axes = xs[0], _axes(node, attrs, xs)
    if axes is None:
        raise ModelError(f"Unsqueeze {node.name!r} has no axes")
    rank = x.dim() + len(axes)
    for a in sorted(a + rank if a < 0 else a for a in axes):
        x = x.unsqueeze(a)
    return [x]


def _op_reduce_mean(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
    x, axes = xs[0], _axes(node, attrs, xs)
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(x.dim()))
    return [x.mean(dim=axes, keepdim=keep)]


def _op_softmax(node: Any, attrs: Mapping[str, Any], xs: list[Value], opset: int) -> list[Value]:
    torch = _torch()
    x = xs[0]
    if opset >= 13:
        return [torch.softmax(x, dim=int(attrs.get("axis", -1)))]
    axis = int(attrs.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return [torch.softmax(flat, dim=1).reshape(x.shape)]


def _op_batchnorm(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
    torch = _torch()
    if len([o for o in node.output if o]) > 1:
        raise ModelError(f"BatchNormalization {node.name!r}: training-mode outputs are not supported")
    x, scale, bias, mean, var = xs[:5]
    return [torch.nn.functional.batch_norm(x, mean, var, scale, bias, training=False, eps=float(attrs.get("epsilon", 1e-5)))]


def _op_gather(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
    torch = _torch()
    data, idx = xs
    axis = int(attrs.get("axis", 0))
    axis = axis + data.dim() if axis < 0 else axis
    idx = idx.to(data.device).long()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return [out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))]


def _op_concat(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
    torch = _torch()
    devices = {v.device for v in xs}
    if len(devices) > 1:
        dev = next(d for d in devices if d.type != "cpu")
        xs = [v.to(dev) for v in xs]
    return [torch.cat(xs, dim=int(attrs["axis"]))]


def _op_cast(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
    import onnx

    torch = _torch()
    np_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(attrs["to"])))
    return [xs[0].to(getattr(torch, np_dtype.name))]


def _op_transpose(node: Any, attrs: Mapping[str, Any], xs: list[Value]) -> list[Value]:
    x = xs[0]
    perm = list(attrs.get("perm", reversed(range(x.dim()))))
    return [x.permute(perm)]


def _simple(fn: Callable[..., Value]) -> Callable[[Any, Mapping[str, Any], list[Value]], list[Value]]:
    return lambda node, attrs, xs: [fn(xs[0], attrs)]


def _op_table(opset: int) -> dict[str, Callable[[Any, Mapping[str, Any], list[Value]], list[Value]]]:
    torch = _torch()
    f = torch.nn.functional

    def hard_sigmoid(x: Value, a: Mapping[str, Any]) -> Value:
        return torch.clamp(x * float(a.get("alpha", 0.2)) + float(a.get("beta", 0.5)), 0.0, 1.0)

    def hard_swish(x: Value, a: Mapping[str, Any]) -> Value:
        # ONNX: x * max(0, min(1, x/6 + 0.5)), written as the spec writes it
        return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)

    return {
        "Add": _binary(lambda a, b: a + b),
        "Sub": _binary(lambda a, b: a - b),
        "Mul": _binary(lambda a, b: a * b),
        "Div": _binary(_div),
        "MatMul": _binary(torch.matmul),
        "Conv": _op_conv,
        "MaxPool": _op_pool("max"),
        "AveragePool": _op_pool("avg"),
        "GlobalAveragePool": _simple(lambda x, a: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
        "GlobalMaxPool": _simple(lambda x, a: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
        "Relu": _simple(lambda x, a: torch.relu(x)),
        "LeakyRelu": _simple(lambda x, a: f.leaky_relu(x, float(a.get("alpha", 0.01)))),
        "Sigmoid": _simple(lambda x, a: torch.sigmoid(x)),
        "Tanh": _simple(lambda x, a: torch.tanh(x)),
        "HardSigmoid": _simple(hard_sigmoid),
        "HardSwish": _simple(hard_swish),
        "Identity": _simple(lambda x, a: x),
        "Clip": lambda node, attrs, xs: _op_clip(node, attrs, xs, opset),
        "Softmax": lambda node, attrs, xs: _op_softmax(node, attrs, xs, opset),
        "Gemm": _op_gemm,
        "Reshape": _op_reshape,
        "Flatten": _op_flatten,
        "Squeeze": _op_squeeze,
        "Unsqueeze": _op_unsqueeze,
        "ReduceMean": _op_reduce_mean,
        "BatchNormalization": _op_batchnorm,
        "Gather": _op_gather,
        "Concat": _op_concat,
        "Cast": _op_cast,
        "Transpose": _op_transpose,
        "Shape": _simple(lambda x, a: torch.tensor(list(x.shape), dtype=torch.int64)),
    }


def _constant_value(node: onnx.NodeProto) -> npt.NDArray[Any]:
    import onnx

    attrs = {a.name: a for a in node.attribute}
    if "value" in attrs:
        return onnx.numpy_helper.to_array(attrs["value"].t)
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(onnx.helper.get_attribute_value(attrs[key]), dtype=dtype)
    raise ModelError(f"Constant {node.name!r}: only value/value_float(s)/value_int(s) are supported")


class TorchGraph:
    """An ONNX graph executed op by op with PyTorch on one device.

    Float initializers live on the device; integer ones (shapes, axes) on the CPU so that shape
    arithmetic never synchronises with the GPU.

    Raises:
        ModelError: ops outside `SUPPORTED_OPS` (all of them are named), subgraphs, or an opset
            other than the default domain's.
    """

    def __init__(self, model: onnx.ModelProto, device: torch.device) -> None:
        import onnx

        self.device = device
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is None:
            raise ModelError("the model imports no default-domain opset; it is not a plain ONNX model")
        self.opset = int(opset)
        custom = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
        unsupported = sorted({n.op_type for n in graph.node if n.domain in ("", "ai.onnx")} - set(SUPPORTED_OPS))
        if custom or unsupported:
            raise ModelError(
                f"the PyTorch runner cannot run ops {unsupported + custom}; it supports {list(SUPPORTED_OPS)}. "
                "Use the ONNX Runtime runner (runner='onnxruntime', with onnxruntime-gpu for the GPU) for this model"
            )
        self._table = _op_table(self.opset)
        self.constants: dict[str, Value] = {}
        host: dict[str, npt.NDArray[Any]] = {}
        for init in graph.initializer:
            host[init.name] = onnx.numpy_helper.to_array(init)
        self.nodes = list(graph.node)
        for node in self.nodes:
            if node.op_type == "Constant":
                host[node.output[0]] = _constant_value(node)
        self.constants = {name: self._to_value(array) for name, array in host.items()}
        # Attributes parsed once; Clip bounds read from the host copy of their constants.
        self.attrs: list[dict[str, Any]] = []
        for node in self.nodes:
            attrs = _attrs(node)
            if node.op_type == "Clip" and self.opset >= 11:
                bounds = [node.input[i] if len(node.input) > i else "" for i in (1, 2)]
                if all(not b or b in host for b in bounds):
                    attrs["_min"] = float(host[bounds[0]].reshape(-1)[0]) if bounds[0] else -math.inf
                    attrs["_max"] = float(host[bounds[1]].reshape(-1)[0]) if bounds[1] else math.inf
            self.attrs.append(attrs)
        self.input_names = [i.name for i in graph.input if i.name not in self.constants]
        self.output_names = [o.name for o in graph.output]
        # Index of the last node that reads each tensor: it is freed after that node.
        self.last_use: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for name in node.input:
                if name:
                    self.last_use[name] = index

    def _to_value(self, array: npt.NDArray[Any]) -> Value:
        torch = _torch()
        tensor = torch.from_numpy(np.array(array, copy=True))
        return tensor.to(self.device) if tensor.is_floating_point() else tensor

    def run(self, feeds: Mapping[str, Value], wanted: frozenset[str]) -> Iterator[tuple[str, Value]]:
        """Run one micro-batch; yield (name, tensor) for every tensor in `wanted` as it is computed.

        Graph inputs in `wanted` are yielded first. A yielded tensor must not be modified; it may be
        freed once the generator resumes.
        """
        env: dict[str, Value] = dict(feeds)
        for name in self.input_names:
            if name not in env:
                raise DataError(f"no feed for model input {name!r}")
            if name in wanted:
                yield name, env[name]
        for index, node in enumerate(self.nodes):
            if node.op_type == "Constant":
                continue
            xs = [
                (self.constants[n] if n in self.constants else env[n]) if n else None for n in node.input
            ]
            try:
                outs = self._table[node.op_type](node, self.attrs[index], xs)
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise ModelError(
                    f"node {node.name or index!r} ({node.op_type}) failed in the PyTorch runner: {exc}"
                ) from exc
            for name, value in zip(node.output, outs):
                if name:
                    env[name] = value
            for name in node.output:
                if name in wanted:
                    yield name, env[name]
            for name in node.input:
                if name and self.last_use.get(name) == index and name in env and name not in self.output_names:
                    del env[name]


# ------------------------------------------------------------------------------------------------
# Runners
# ------------------------------------------------------------------------------------------------


def _model_inputs(model: onnx.ModelProto) -> dict[str, ModelInput]:
    from trtcal.runners import onnxruntime as ort_runner

    return ort_runner._model_inputs(model)


def _layout(inputs: Mapping[str, ModelInput], batch: CalibrationBatch, source: str) -> BatchLayout:
    from trtcal.runners import onnxruntime as ort_runner

    return ort_runner._layout(inputs, batch, source)


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


class _DeviceRunnerBase:
    """collect_stats / collect_counts over a row range, with the reductions on the device."""

    kind = "device"
    tensor_names: tuple[str, ...]
    inputs: dict[str, ModelInput]
    model: LoadedModel
    device: torch.device
    kernel_backend: KernelBackend

    def layout(self, batch: CalibrationBatch) -> BatchLayout:
        """Validate `batch` against the model's inputs (DataError naming the input if it does not fit)."""
        return _layout(self.inputs, batch, self.model.source)

    def _forward(self, feeds: Mapping[str, Value]) -> Iterator[tuple[str, Value]]:
        raise NotImplementedError

    def _micro_batches(
        self, batch: CalibrationBatch, start: int, stop: int, micro_batch: int
    ) -> Iterator[tuple[dict[str, Value], int]]:
        if not isinstance(micro_batch, int) or micro_batch < 1:
            raise ConfigError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
        layout = self.layout(batch)
        size = layout.micro_batch(micro_batch)
        if layout.fixed_batch is not None and layout.fixed_batch > 1 and (stop - start) % layout.fixed_batch:
            raise DataError(
                f"the model's batch size is fixed at {layout.fixed_batch} but rows [{start}, {stop}) hold "
                f"{stop - start} samples; give a multiple of {layout.fixed_batch} (padding would change the statistics)"
            )
        staging = _Staging(self.device)
        for chunk in batch.iter_micro_batches(size, start=start, stop=stop):
            rows = next(iter(chunk.values())).shape[0]
            feed = chunk if layout.stacked else {n: a[0] for n, a in chunk.items()}
            yield staging.upload(feed), rows

    def collect_stats(
        self,
        batch: CalibrationBatch,
        *,
        start: int = 0,
        stop: int | None = None,
        micro_batch: int = 32,
        nonfinite: NonFinitePolicy = "error",
        progress: ProgressCallback = NO_PROGRESS,
        stage: str = "statistics",
    ) -> dict[str, TensorStats]:
        """Pass 1 over rows [start, stop): exact per-tensor stats (merge shards with `merge_stats`)."""
        start, stop = row_range(batch, start, stop)
        collector = DeviceStatsCollector(self.tensor_names, device=self.device, backend=self.kernel_backend)
        progress.start(stage, stop - start, "sample")
        with fp32_exact(), _inference():
            for feeds, rows in self._micro_batches(batch, start, stop, micro_batch):
                for name, value in self._forward(feeds):
                    collector.update(name, value)
                progress.advance(stage, rows)
            result = collector.results(nonfinite=nonfinite)
        progress.finish(stage)
        return result

    def collect_counts(
        self,
        batch: CalibrationBatch,
        hist_amax: Mapping[str, float],
        *,
        num_bins: int = DEFAULT_NUM_BINS,
        start: int = 0,
        stop: int | None = None,
        micro_batch: int = 32,
        nonfinite: NonFinitePolicy = "error",
        progress: ProgressCallback = NO_PROGRESS,
        stage: str = "histograms",
    ) -> dict[str, npt.NDArray[np.int64]]:
        """Pass 2 over rows [start, stop): int64 |x| counts on [0, hist_amax[t]] (shards merge by adding)."""
        missing = [n for n in self.tensor_names if n not in hist_amax]
        if missing:
            raise ConfigError(f"hist_amax lacks tensors {missing[:5]}; run collect_stats over the whole batch first")
        start, stop = row_range(batch, start, stop)
        collector = DeviceHistogramCollector(
            {n: float(hist_amax[n]) for n in self.tensor_names},
            num_bins=num_bins,
            device=self.device,
            backend=self.kernel_backend,
        )
        progress.start(stage, stop - start, "sample")
        with fp32_exact(), _inference():
            for feeds, rows in self._micro_batches(batch, start, stop, micro_batch):
                for name, value in self._forward(feeds):
                    collector.update(name, value)
                progress.advance(stage, rows)
            result = {n: h.counts for n, h in collector.results(nonfinite=nonfinite).items()}
        progress.finish(stage)
        return result


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
        self.inputs = _model_inputs(self.model.proto)
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

    def _forward(self, feeds: Mapping[str, Value]) -> Iterator[tuple[str, Value]]:
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
            return {n: v.detach().cpu().numpy() for n, v in self._forward(feeds)}


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

    def _forward(self, feeds: Mapping[str, Value]) -> Iterator[tuple[str, Value]]:
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
