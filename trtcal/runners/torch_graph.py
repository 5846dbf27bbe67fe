"""The ONNX graph run by PyTorch alone, node by node: trtcal's small ONNX interpreter.

`TorchGraph` runs the ops listed in `SUPPORTED_OPS` and yields each requested tensor under its ONNX
name as soon as it is computed, freeing every tensor after its last consumer. Why an interpreter
and not onnx2torch: calibration addresses tensors by their ONNX names, and an interpreter yields
exactly those tensors with no FX-graph renaming to undo; it adds no dependency (onnx2torch pins
its own onnx/torchvision ranges); each op's semantics are a few visible lines, tested against ONNX
Runtime; and unsupported ops fail up front with a `ModelError` naming them (use ONNX Runtime's
CUDA provider for those models). `trtcal.runners.torch_runner.TorchRunner` wraps it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal.errors import BackendUnavailableError, DataError, ModelError

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = ["SUPPORTED_OPS", "TorchGraph", "Value"]

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
