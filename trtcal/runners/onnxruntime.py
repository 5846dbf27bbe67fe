"""FP32 activation statistics with ONNX Runtime, streamed over a calibration batch.

Tensor selection (`select_tensors`): every floating activation of the top-level graph, i.e. graph
inputs and node outputs that are not initializers, not `Constant` outputs and not computed from
constants only; or only the activation inputs of quantizable ops ("quantizable": Conv,
ConvTranspose, MatMul, Gemm data/weight inputs and the inputs of residual Adds whose two operands
are both activations); or a list of tensor names. Tensors inside subgraphs (If/Loop bodies) are
not reachable as graph outputs and are not calibrated.

The selected tensors become extra graph outputs of a copy of the model, run with
`GraphOptimizationLevel.ORT_DISABLE_ALL`: every node executes as written, so each tensor's name and
values are those of the graph (ONNX Runtime's own calibrators do the same). Measured on
EfficientNet-Lite0 (onnxruntime 1.32, CPU): ORT_ENABLE_BASIC and ORT_ENABLE_EXTENDED give bitwise
the same values for all 95 tensors; ORT_ENABLE_ALL changes 94 of them by up to 1e-4 absolute
(NCHWc layout kernels) and is slower once they are outputs (reorders back to NCHW per tensor).

Streaming: `collect_stats` (pass 1: exact max |x|, min, max, NaN/Inf counts) and
`collect_counts` (pass 2: integer |x| histograms on the pass-1 amax) each walk a contiguous row
range of the batch in micro-batches; only one micro-batch of activations is alive at a time and
the batch's file pages are handed back after each micro-batch, so memory does not grow with the
number of samples. Both results merge exactly (`merge_stats`, integer addition), so data-parallel
actors can each take a row range and the merged result is bit-identical to one actor's.

Batch layouts: a model input of rank r takes samples of rank r-1 (stacked along a new leading
batch axis; a fixed leading dimension B means micro-batches of exactly B rows, B = 1 runs sample
by sample) or samples of rank r (the model has no batch axis: one sample per run).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from trtcal.errors import BackendUnavailableError, ConfigError, DataError, ModelError
from trtcal.runners.base import BaseRunner

if TYPE_CHECKING:
    import onnx


__all__ = [
    "QUANTIZABLE_OP_TYPES",
    "GRAPH_OPTIMIZATION_LEVEL",
    "LoadedModel",
    "ModelInput",
    "OnnxRuntimeRunner",
    "load_model",
    "select_tensors",
    "with_extra_outputs",
]

logger = logging.getLogger(__name__)

RUNNER_KIND = "onnxruntime"
GRAPH_OPTIMIZATION_LEVEL = "ORT_DISABLE_ALL"
QUANTIZABLE_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Which inputs of a quantizable op TensorRT quantizes (data and weights; never the bias).
_QUANTIZED_INPUTS = {"Conv": (0, 1), "ConvTranspose": (0, 1), "MatMul": (0, 1), "Gemm": (0, 1)}
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"})
TensorSelection = Literal["all", "quantizable"] | Sequence[str]


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise BackendUnavailableError("the onnx package is required: pip install onnx") from exc
    return onnx


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise BackendUnavailableError("onnxruntime is required: pip install onnxruntime") from exc
    return onnxruntime


def _float_elem_types() -> dict[int, np.dtype[Any]]:
    tp = _onnx().TensorProto
    return {tp.FLOAT: np.dtype("float32"), tp.FLOAT16: np.dtype("float16"), tp.DOUBLE: np.dtype("float64")}


def _elem_dtype(elem_type: int) -> np.dtype[Any] | None:
    onnx = _onnx()
    try:
        dtype: np.dtype[Any] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None
    return dtype


# ---------------------------------------------------------------------------------------------
# Model loading and tensor selection


@dataclass(frozen=True)
class LoadedModel:
    """An ONNX model and the sha256 of the bytes it was loaded from (external data included)."""

    proto: onnx.ModelProto
    sha256: str
    source: str


def load_model(model: str | os.PathLike[str] | bytes | onnx.ModelProto) -> LoadedModel:
    """Load an ONNX model from a path, bytes or a ModelProto; ModelError if it cannot be read.

    The hash covers the model file's bytes and, for models with external data, each external
    file's bytes in sorted location order.
    """
    onnx = _onnx()
    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
        return LoadedModel(proto=model, sha256=hashlib.sha256(data).hexdigest(), source="<ModelProto>")
    if isinstance(model, (bytes, bytearray, memoryview)):
        data, source = bytes(model), "<bytes>"
    else:
        source = os.fspath(model)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ModelError(f"ONNX model {source!r} does not exist") from None
        except OSError as exc:
            raise ModelError(f"cannot read ONNX model {source!r}: {exc}") from exc
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(f"{source} is not a valid ONNX model ({type(exc).__name__}: {exc}); check the file") from None
    if not proto.graph.node and not proto.graph.input:
        raise ModelError(f"{source} holds no graph; is it an ONNX model?")
    digest = hashlib.sha256(data)
    external = sorted(
        {
            entry.value
            for init in proto.graph.initializer
            if init.data_location == onnx.TensorProto.EXTERNAL
            for entry in init.external_data
            if entry.key == "location"
        }
    )
    if external:
        if source.startswith("<"):
            raise ModelError("a model with external data must be given as a path, not bytes")
        base = os.path.dirname(os.path.abspath(source))
        base_real = os.path.realpath(base)
        for location in external:
            # Validate before opening: relative, inside the model's folder after symlinks, a regular file
            # (a device or FIFO named here would hang the read).
            target = os.path.realpath(os.path.join(base, location))
            if os.path.isabs(location) or os.path.commonpath([base_real, target]) != base_real:
                raise ModelError(
                    f"{source}: external data {location!r} lies outside the model's folder; "
                    "keep external-data files next to the model"
                )
            if os.path.exists(target) and not stat.S_ISREG(os.stat(target).st_mode):
                raise ModelError(f"{source}: external data {location!r} is not a regular file")
            try:
                with open(target, "rb") as f:
                    digest.update(location.encode("utf-8"))
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
            except OSError as exc:
                raise ModelError(f"{source}: cannot read external data {location!r}: {exc}") from exc
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, base)
        except Exception as exc:
            raise ModelError(f"{source}: cannot load external data ({exc})") from exc
    return LoadedModel(proto=proto, sha256=digest.hexdigest(), source=source)


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    """Initializers, Constant outputs and outputs of nodes computed from constants only."""
    constants = {init.name for init in graph.initializer}
    constants.update(init.values.name for init in graph.sparse_initializer)
    for node in graph.node:
        inputs = [i for i in node.input if i]
        has_subgraph = any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)
        if node.op_type == "Constant" or (
            inputs and not has_subgraph and node.op_type not in _RANDOM_OPS and all(i in constants for i in inputs)
        ):
            constants.update(o for o in node.output if o)
    return constants


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor the graph declares or shape inference can infer."""
    onnx = _onnx()
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # inference is best effort; ORT reports the rest
        logger.info("shape inference failed (%s); tensor types come from ONNX Runtime", exc)
        inferred = model
    types: dict[str, int] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _activation_order(graph: onnx.GraphProto, constants: set[str]) -> list[str]:
    """Graph inputs then node outputs, in graph order, without constants and duplicates."""
    seen: set[str] = set()
    order = []
    for name in [*(i.name for i in graph.input), *(o for n in graph.node for o in n.output)]:
        if name and name not in constants and name not in seen:
            seen.add(name)
            order.append(name)
    return order


def select_tensors(model: onnx.ModelProto, selection: TensorSelection = "all") -> list[str]:
    """Names of the tensors to calibrate, in graph order.

    Args:
        model: the ONNX model.
        selection: "all" (every floating activation), "quantizable" (activation inputs of Conv,
            ConvTranspose, MatMul, Gemm and of residual Adds) or a sequence of tensor names.

    Raises:
        ConfigError: unknown selection, or a named tensor that is not a floating activation of the
            top-level graph (the message says what it is instead).
    """
    graph = model.graph
    constants = _constant_names(graph)
    types = _tensor_types(model)
    floating = set(_float_elem_types())
    order = _activation_order(graph, constants)

    def is_float(name: str) -> bool:
        # Unknown types stay in; the runner drops whatever ONNX Runtime reports as non-floating.
        return name not in types or types[name] in floating

    if isinstance(selection, str):
        if selection == "all":
            return [n for n in order if is_float(n)]
        if selection != "quantizable":
            raise ConfigError(f"tensors must be 'all', 'quantizable' or a list of tensor names, got {selection!r}")
        wanted: set[str] = set()
        for node in graph.node:
            if node.op_type in _QUANTIZED_INPUTS:
                wanted.update(node.input[i] for i in _QUANTIZED_INPUTS[node.op_type] if i < len(node.input))
            elif node.op_type == "Add" and len(node.input) == 2 and not (set(node.input) & constants):
                wanted.update(node.input)
        return [n for n in order if n in wanted and is_float(n)]
    names = list(selection)
    if not names:
        raise ConfigError("tensors: the list of tensor names is empty")
    bad = []
    known = set(order)
    for name in names:
        if not isinstance(name, str):
            bad.append(f"{name!r} (not a string)")
        elif name in constants:
            bad.append(f"{name!r} (a constant or initializer, not an activation)")
        elif name not in known:
            bad.append(f"{name!r} (not a tensor of the top-level graph)")
        elif not is_float(name):
            bad.append(f"{name!r} (not floating point)")
    if bad:
        raise ConfigError(
            f"tensors: cannot calibrate {', '.join(bad)}; name floating-point activation tensors of the model "
            "(graph inputs or node outputs, as in ranges.json or Netron), or use --tensors all|quantizable"
        )
    chosen = set(names)
    return [n for n in order if n in chosen]


def with_extra_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (nothing else changes)."""
    onnx_module = _onnx()
    augmented = model.__class__()
    augmented.CopyFrom(model)
    graph = augmented.graph
    existing = {o.name for o in graph.output} | {i.name for i in graph.input}
    typed = {vi.name: vi for vi in graph.value_info}
    for name in names:
        if name in existing:
            continue
        vi = onnx_module.ValueInfoProto()
        if name in typed:
            vi.CopyFrom(typed[name])
        else:
            vi.name = name
        graph.output.append(vi)
    return augmented


# ---------------------------------------------------------------------------------------------
# Inputs and batch layout


@dataclass(frozen=True)
class ModelInput:
    """A graph input that must be fed: its dims (None where symbolic) and numpy dtype."""

    name: str
    dims: tuple[int | None, ...]
    dtype: str

    def describe(self) -> str:
        return f"[{', '.join('?' if d is None else str(d) for d in self.dims)}] {self.dtype}"


def _model_inputs(model: onnx.ModelProto) -> dict[str, ModelInput]:
    initializers = {i.name for i in model.graph.initializer}
    inputs = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue  # an input with a default value (IR < 4 style); not fed
        if not vi.type.HasField("tensor_type"):
            raise ModelError(f"model input {vi.name!r} is not a tensor; only tensor inputs are supported")
        tt = vi.type.tensor_type
        dtype = _elem_dtype(tt.elem_type)
        if dtype is None:
            raise ModelError(f"model input {vi.name!r} has element type {tt.elem_type}, which numpy cannot hold")
        dims: tuple[int | None, ...] = ()
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        inputs[vi.name] = ModelInput(name=vi.name, dims=dims, dtype=dtype.name)
    return inputs


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
        self.inputs = _model_inputs(self.model.proto)
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
            raise DataError(f"ONNX Runtime failed on model {self.model.source!r}: {exc}") from None
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
