"""The ONNX model, loaded once: bytes + sha256 + `onnx.ModelProto`, its fed inputs, tensor selection.

`load_model` is the one loader (a path, bytes or a ModelProto; external data is validated, hashed
and loaded). The hash covers the model file's bytes and, for models with external data, each
external file's name and bytes in sorted location order.

Tensor selection (`select_tensors`): every floating activation of the top-level graph, i.e. graph
inputs and node outputs that are not initializers, not `Constant` outputs and not computed from
constants only; or only the activation inputs of quantizable ops ("quantizable": Conv,
ConvTranspose, MatMul, Gemm data/weight inputs and the inputs of residual Adds whose two operands
are both activations); or a list of tensor names. Tensors inside subgraphs (If/Loop bodies) are
not reachable as graph outputs and are not calibrated.

onnx is imported lazily: importing this module costs numpy only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from trtcal.errors import BackendUnavailableError, ConfigError, ModelError

if TYPE_CHECKING:
    import onnx

__all__ = [
    "QUANTIZABLE_OP_TYPES",
    "LoadedModel",
    "ModelInput",
    "TensorSelection",
    "input_names",
    "load_model",
    "model_inputs",
    "select_tensors",
    "with_extra_outputs",
    "MASK_FILL_LIMIT",
    "mask_inputs",
    "mask_tensors",
    "token_axes",
]

logger = logging.getLogger(__name__)

QUANTIZABLE_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Which inputs of a quantizable op TensorRT quantizes (data and weights; never the bias).
_QUANTIZED_INPUTS = {"Conv": (0, 1), "ConvTranspose": (0, 1), "MatMul": (0, 1), "Gemm": (0, 1)}
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"})
TensorSelection = Literal["all", "quantizable"] | Sequence[str]
# In a masked activation (scores + additive mask), values at or below this are the mask's fill
# (-inf, finfo.min, -1e9, -1e4 plus a score), not data: half the smallest fill in common use.
MASK_FILL_LIMIT = -5000.0
# Ops through which a masked activation stays masked (values moved or selected, never mixed).
_MASK_PASSTHROUGH = frozenset({"Reshape", "Transpose", "Cast", "Unsqueeze", "Squeeze", "Identity", "Flatten", "Expand"})
_MASK_APPLY = frozenset({"Add", "Sub", "Where", "Mul", "Max", "Min"})

def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise BackendUnavailableError("the onnx package is required: pip install onnx") from exc
    return onnx


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
    proto = _parse(data, source)
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


def _parse(data: bytes, source: str) -> onnx.ModelProto:
    try:
        proto = _onnx().load_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(f"{source} is not a valid ONNX model ({type(exc).__name__}: {exc}); check the file") from None
    if not proto.graph.node and not proto.graph.input:
        raise ModelError(f"{source} holds no graph; is it an ONNX model?")
    return proto  # type: ignore[no-any-return]


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
        # Attention-mask tensors (computed from the mask input and constants only) are not calibrated.
        masks, _ = mask_tensors(model)
        order = [n for n in order if n not in masks]
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
# Inputs


@dataclass(frozen=True)
class ModelInput:
    """A graph input that must be fed: its dims (None where symbolic) and numpy dtype."""

    name: str
    dims: tuple[int | None, ...]
    dtype: str

    def describe(self) -> str:
        return f"[{', '.join('?' if d is None else str(d) for d in self.dims)}] {self.dtype}"


def model_inputs(model: onnx.ModelProto) -> dict[str, ModelInput]:
    """The graph inputs that must be fed (initializer-backed inputs are not), by name."""
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


def input_names(model: str | os.PathLike[str] | bytes | onnx.ModelProto | LoadedModel) -> list[str]:
    """Names of the inputs that must be fed, in graph order (external data is not read)."""
    onnx = _onnx()
    if isinstance(model, LoadedModel):
        proto = model.proto
    elif isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray, memoryview)):
        proto = _parse(bytes(model), "<bytes>")
    else:
        source = os.fspath(model)
        try:
            proto = onnx.load(source, load_external_data=False)
        except FileNotFoundError:
            raise ModelError(f"ONNX model {source!r} does not exist") from None
        except Exception as exc:
            raise ModelError(f"cannot read ONNX model {source}: {exc}") from None
    initializers = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in initializers]


# ---------------------------------------------------------------------------------------------
# Attention masks (docs/inputs.md, "Masks in statistics")


def mask_inputs(model: onnx.ModelProto, declared: str | None = None) -> set[str]:
    """The attention-mask inputs: the declared one, and integer/bool graph inputs named like "*mask*"."""
    names = {declared} if declared else set()
    for name, info in model_inputs(model).items():
        if "mask" in name.lower() and np.dtype(info.dtype).kind in "biu":
            names.add(name)
    return names


def mask_tensors(model: onnx.ModelProto, declared: str | None = None) -> tuple[set[str], set[str]]:
    """(mask tensors, masked activations) of the top-level graph.

    Mask tensors are computed from the mask inputs and constants only (the additive mask: 0 or a
    large negative fill); they are never calibrated. Masked activations are outputs of an
    Add/Sub/Where/Mul/Max/Min that takes a mask tensor and data (scores + mask), and what
    Reshape/Transpose/Cast/... pass on from them: their values at or below MASK_FILL_LIMIT
    (-inf included) are the fill and are left out of the statistics, never an error.
    """
    graph = model.graph
    sources = mask_inputs(model, declared)
    if not sources:
        return set(), set()
    constants = _constant_names(graph)
    masks: set[str] = set(sources)
    masked: set[str] = set()
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if not inputs or node.op_type == "Constant":
            continue
        if all(i in masks or i in constants for i in inputs) and any(i in masks for i in inputs):
            masks.update(o for o in node.output if o)
        elif node.op_type in _MASK_APPLY and any(i in masks for i in inputs):
            masked.update(o for o in node.output if o)
        elif node.op_type in _MASK_PASSTHROUGH and inputs[0] in masked:
            masked.update(o for o in node.output if o)
    return masks - sources, masked


def token_axes(model: onnx.ModelProto, mask_input: str) -> dict[str, tuple[bool, tuple[int, ...]]]:
    """tensor -> (batched, its sequence axes), by symbolic shape inference (the mask input must have
    symbolic [batch, sequence] dims). batched: axis 0 is the mask's batch dim and the sequence axes
    are >= 1; unbatched (a position table [S, D] or [1, S, D]): one sequence axis, no batch dim."""
    inputs = {vi.name: vi for vi in model.graph.input}
    if mask_input not in inputs:
        return {}
    dims = inputs[mask_input].type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[0].dim_param or not dims[1].dim_param:
        logger.warning(
            "mask input %r has no symbolic [batch, sequence] dims; padded positions are not left out of the "
            "statistics (export the model with dynamic axes)", mask_input,
        )
        return {}
    batch_sym, seq_sym = dims[0].dim_param, dims[1].dim_param
    inferred = _symbolic_shapes(model)
    out: dict[str, tuple[bool, tuple[int, ...]]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shape = list(vi.type.tensor_type.shape.dim) if vi.type.HasField("tensor_type") else []
        axes = tuple(k for k in range(len(shape)) if shape[k].dim_param == seq_sym)
        if not axes:
            continue
        if shape[0].dim_param == batch_sym and 0 not in axes:
            out[vi.name] = (True, axes)
        elif len(axes) == 1 and all(shape[k].dim_value == 1 for k in range(axes[0])) and not any(
            d.dim_param == batch_sym for d in shape
        ):
            out[vi.name] = (False, axes)
    return out


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's symbolic shape inference (keeps dim names through Reshape/MatMul), else onnx's."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=False)
        if inferred is not None:
            return inferred  # type: ignore[no-any-return]
    except Exception as exc:  # best effort: fall back to onnx's inference
        logger.info("symbolic shape inference failed (%s); using onnx shape inference", exc)
    try:
        return _onnx().shape_inference.infer_shapes(model, strict_mode=False)  # type: ignore[no-any-return]
    except Exception:
        return model
