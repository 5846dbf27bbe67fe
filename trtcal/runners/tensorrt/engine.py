"""INT8 engine builds: `build_engine` (parse, configure, profiles, calibrator, dynamic ranges, build)
and `resolve_profile_shapes`."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from trtcal.errors import (
    BackendUnavailableError,
    CacheFormatError,
    ConfigError,
    DataError,
    ModelError,
)
from trtcal.runners.tensorrt.calibrators import ArrowBatchCalibrator, make_replay_calibrator
from trtcal.runners.tensorrt.config import EngineBuildConfig, ShapeSpec, _config_from
from trtcal.runners.tensorrt.version import load_tensorrt, tensorrt_major

log = logging.getLogger(__name__)


def _as_shape(value: Any, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a sequence of integers, got {value!r}") from None
    if any(d < 1 for d in shape):
        raise ConfigError(f"{what} must have positive dimensions, got {list(shape)}")
    return shape


def _shape_triple(spec: Any, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    items = list(spec)
    if len(items) == 3 and all(isinstance(s, Sequence) and not isinstance(s, str) for s in items):
        lo, opt, hi = (_as_shape(s, f"input_shapes[{name!r}]") for s in items)
        if not (len(lo) == len(opt) == len(hi)) or any(not (a <= b <= c) for a, b, c in zip(lo, opt, hi)):
            raise ConfigError(
                f"input_shapes[{name!r}] must satisfy min <= opt <= max per dimension, got {items}"
            )
        return lo, opt, hi
    shape = _as_shape(items, f"input_shapes[{name!r}]")
    return shape, shape, shape


def _fits(network_shape: Sequence[int], shape: Sequence[int]) -> bool:
    return len(network_shape) == len(shape) and all(d in (-1, s) for d, s in zip(network_shape, shape))


def resolve_profile_shapes(
    network_inputs: Mapping[str, Sequence[int]],
    *,
    input_shapes: Mapping[str, ShapeSpec] | None = None,
    calibration_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) for every network input with a dynamic (-1) dimension.

    Priority: `input_shapes[name]` (one shape, or a (min, opt, max) triple); else the shape the
    calibrator will serve; else, when only the leading (batch) dimension is dynamic, batch 1.

    Raises:
        ConfigError: a shape does not fit the network input, names an unknown input, or an
            input has dynamic dimensions no rule can fill.
    """
    input_shapes = dict(input_shapes or {})
    calibration_shapes = dict(calibration_shapes or {})
    unknown = sorted(set(input_shapes) - set(network_inputs))
    if unknown:
        raise ConfigError(
            f"input_shapes names {unknown}, which are not network inputs {sorted(network_inputs)}"
        )
    resolved: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    for name, network_shape in network_inputs.items():
        network_shape = tuple(int(d) for d in network_shape)
        if name in input_shapes:
            triple = _shape_triple(input_shapes[name], name)
        elif -1 not in network_shape:
            continue
        elif name in calibration_shapes:
            shape = tuple(int(d) for d in calibration_shapes[name])
            triple = (shape, shape, shape)
        elif network_shape[0] == -1 and -1 not in network_shape[1:]:
            shape = (1, *network_shape[1:])
            log.info(
                "input %r has a dynamic batch dimension; building for batch 1 (set input_shapes to change)",
                name,
            )
            triple = (shape, shape, shape)
        else:
            raise ConfigError(
                f"input {name!r} has dynamic dimensions {list(network_shape)}; give its shape in input_shapes "
                "(one shape, or min/opt/max)"
            )
        for shape in triple:
            if not _fits(network_shape, shape):
                raise ConfigError(
                    f"shape {list(shape)} does not fit network input {name!r} {list(network_shape)}"
                )
        resolved[name] = triple
    return resolved


def _make_trt_logger(trt: ModuleType) -> Any:
    class _TrtLogger(trt.ILogger):  # type: ignore[name-defined,misc]
        """Routes TensorRT's messages into logging and keeps the errors for error messages."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = getattr(severity, "name", str(severity)).rsplit(".", 1)[-1]
            if level in ("INTERNAL_ERROR", "ERROR"):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif level == "WARNING":
                log.warning("TensorRT: %s", msg)
            else:  # INFO is chatty; VERBOSE more so
                log.debug("TensorRT: %s", msg)

    return _TrtLogger()


def _network_tensors(network: Any) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        tensors[tensor.name] = tensor
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            tensor = layer.get_output(j)
            tensors.setdefault(tensor.name, tensor)
    return tensors


def _range_bounds(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, (int, float, np.floating)):
        amax = float(value)
        lo, hi = -amax, amax
    else:
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"dynamic range of {name!r} must be an amax or (min, max), got {value!r}"
            ) from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < 0.0 < hi):
        raise ConfigError(f"dynamic range of {name!r} must be finite with min < 0 < max, got ({lo}, {hi})")
    return lo, hi


def _apply_dynamic_ranges(network: Any, ranges: Mapping[str, Any]) -> int:
    """Set ranges on the network's tensors; names TensorRT's network lacks are reported, not fatal.

    A range table covers every ONNX activation, and TensorRT's parser folds some of them away
    (constant subgraphs), so a few unknown names are expected; none matching is an error.
    """
    tensors = _network_tensors(network)
    bounds = {name: _range_bounds(name, value) for name, value in ranges.items()}
    missing = [name for name in bounds if name not in tensors]
    if len(missing) == len(bounds):
        raise ConfigError(
            f"none of the {len(bounds)} dynamic_ranges names a tensor of this network (e.g. {missing[:5]}); "
            "names must be the ONNX tensor names"
        )
    if missing:
        log.warning(
            "%d of %d dynamic ranges name tensors TensorRT's network does not have (folded or renamed), e.g. %s",
            len(missing),
            len(bounds),
            missing[:5],
        )
    for name, (lo, hi) in bounds.items():
        if name in tensors and not tensors[name].set_dynamic_range(lo, hi):
            raise ConfigError(f"TensorRT refused the dynamic range ({lo}, {hi}) of tensor {name!r}")
    return len(bounds) - len(missing)


def _check_cache_names(network: Any, cache: bytes, model_path: Path) -> None:
    """A replayed cache must name this network's tensors: TensorRT itself silently builds a float engine.

    Measured on TensorRT 8.5.3: a cache of another export of the same model was accepted, every
    layer fell back to FP32 with one "Missing scale" warning per tensor, and the build succeeded.
    """
    from trtcal.core import read_trt_cache
    from trtcal.export.smoothed_names import check_not_smoothed_for

    names = set(read_trt_cache(cache).scale)
    tensors = set(_network_tensors(network))
    # A cache of the smoothed copy matches most names of the original: refused, naming the model to use.
    check_not_smoothed_for(names, tensors, model=str(model_path), what="the calibration cache")
    matched = names & tensors
    if not matched:
        raise CacheFormatError(
            f"the calibration cache names none of the tensors of {model_path} (cache: {sorted(names)[:3]}, "
            f"network: {sorted(tensors)[:3]}); it was computed for another model or another export of it. "
            "Calibrate this model file, or pass the model the cache was made for"
        )
    unknown = sorted(names - tensors)
    if len(unknown) > len(names) // 2:
        log.warning(
            "%d of %d tensors of the calibration cache are not in %s (e.g. %s): layers without a scale stay in float",
            len(unknown), len(names), model_path, unknown[:3],
        )


def _calibration_dtype(trt_dtype: Any) -> np.dtype:
    # TensorRT reads calibration data for float inputs as float32, whatever the network type (Polygraphy does the same).
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
    return np.dtype({"INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}.get(name, np.float32))


def _parse_onnx(trt: ModuleType, network: Any, logger: Any, model_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(model_path)):
        return
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    detail = "; ".join(errors[:10]) or "; ".join(logger.errors[-5:]) or "no detail given"
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    raise ModelError(f"TensorRT's ONNX parser rejected {model_path}: {detail}{more}")


# Over 80 lines only by its docstring (every argument documented); the body is ~45 lines of named steps.
def build_engine(
    model_path: str | os.PathLike[str],
    *,
    cache: bytes | str | os.PathLike[str] | None = None,
    calibrator: Any = None,
    dynamic_ranges: Mapping[str, Any] | None = None,
    input_shapes: Mapping[str, ShapeSpec] | None = None,
    calibration_profile: Mapping[str, Sequence[int]] | None = None,
    calibrate_before_fusion: bool | None = None,
    workspace_bytes: int | None = None,
    fp16: bool | None = None,
    builder_optimization_level: int | None = None,
    replay_algorithm: str | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
) -> bytes:
    """Build a serialized INT8 TensorRT engine from an ONNX model.

    Args:
        model_path: the FP32 ONNX model (external data next to it is found by TensorRT).
        cache: a calibration cache (bytes or file) to replay; its header is rewritten for the
            installed TensorRT and `replay_algorithm`, so TensorRT takes its scales as they are.
        calibrator: a live calibrator (e.g. from `make_calibrator`); exclusive with `cache`.
        dynamic_ranges: tensor name -> amax (range ±amax) or (min, max), set with
            ITensor.set_dynamic_range; TensorRT lets them win over calibrated scales. Names
            the network lacks are logged; none matching is a ConfigError.
        input_shapes: optimization-profile shapes of dynamic inputs (see resolve_profile_shapes).
        calibration_profile: input name -> shape TensorRT calibrates at (dynamic inputs only);
            default: the calibrator's first micro-batch, else the profile's opt shape.
        calibrate_before_fusion, workspace_bytes, fp16, builder_optimization_level,
        replay_algorithm: see EngineBuildConfig.
        timing_cache: a TensorRT timing-cache file, read when it exists and rewritten (atomically)
            after the build; rebuilds of one network with other scales then skip kernel timing.

    Returns:
        The serialized engine.

    Raises:
        ConfigError: neither or both of cache/calibrator (dynamic ranges alone are allowed),
            bad shapes or ranges. ModelError: missing model, parser errors, failed build.
        BackendUnavailableError: TensorRT missing, 11+, or no usable GPU.
        Any exception raised inside the calibrator's TensorRT callbacks, after the build.
    """
    build = _config_from(
        EngineBuildConfig,
        workspace_bytes=workspace_bytes,
        calibrate_before_fusion=calibrate_before_fusion,
        fp16=fp16,
        builder_optimization_level=builder_optimization_level,
        replay_algorithm=replay_algorithm,
    )
    if cache is not None and calibrator is not None:
        raise ConfigError(
            "pass either cache= (replay trtcal's scales) or calibrator= (TensorRT calibrates), not both"
        )
    if cache is None and calibrator is None and not dynamic_ranges:
        raise ConfigError("an INT8 engine needs scales: pass cache=, calibrator= or dynamic_ranges=")
    path = Path(model_path)
    if not path.is_file():
        raise ModelError(f"ONNX model {path} does not exist")

    trt = load_tensorrt()
    if cache is not None:
        calibrator = make_replay_calibrator(cache, algorithm=build.replay_algorithm)
    live = isinstance(calibrator, ArrowBatchCalibrator)
    with warnings.catch_warnings():
        # Every calibration API is deprecated since TensorRT 10.1; using them is this adapter's purpose.
        warnings.simplefilter("ignore", DeprecationWarning)
        logger, builder, network = _parse_network(trt, path)
        config = _builder_config(trt, builder, build)
        if timing_cache is not None:
            _load_timing_cache(config, Path(timing_cache))
        inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
        served = _served_shapes(calibrator) if live else {}
        profile_shapes = _add_profile(builder, config, inputs, input_shapes, calibration_profile or served)
        if calibrator is not None:
            _attach_calibrator(builder, config, calibrator, inputs, profile_shapes, calibration_profile, served)
        if cache is not None:
            _check_cache_names(network, calibrator.cache_bytes, path)
        if dynamic_ranges:
            count = _apply_dynamic_ranges(network, dynamic_ranges)
            log.info("set %d manual dynamic ranges", count)

        log.info("building the INT8 engine of %s with TensorRT %s", path, trt.__version__)
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            if live:
                calibrator.close()
    # Calibrators not made by trtcal (Polygraphy's, say) keep no errors.
    raise_if_failed = getattr(calibrator, "raise_if_failed", None)
    if callable(raise_if_failed):
        raise_if_failed()
    if serialized is None:
        said = "; ".join(logger.errors[-5:]) or "see the TensorRT log"
        raise ModelError(f"TensorRT could not build an INT8 engine of {path}: {said}")
    if timing_cache is not None:
        _save_timing_cache(config, Path(timing_cache))
    return bytes(serialized)


def _load_timing_cache(config: Any, path: Path) -> None:
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as exc:
        raise ConfigError(f"cannot read the timing cache {path}: {exc}") from exc
    # A cache from another TensorRT or GPU is refused by TensorRT itself (ignore_mismatch=False).
    if not config.set_timing_cache(config.create_timing_cache(data), False):
        raise ConfigError(f"TensorRT refused the timing cache {path} (another TensorRT version or GPU?); delete it")


def _save_timing_cache(config: Any, path: Path) -> None:
    from trtcal._io import write_atomic

    cache = config.get_timing_cache()
    if cache is not None:
        write_atomic(path, bytes(cache.serialize()))


def _parse_network(trt: ModuleType, path: Path) -> tuple[Any, Any, Any]:
    """(logger, builder, network) with the ONNX model parsed into the network."""
    logger = _make_trt_logger(trt)
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(logger, "")
    try:
        builder = trt.Builder(logger)
    except Exception as exc:
        said = "; ".join(logger.errors[-3:])
        raise BackendUnavailableError(
            f"TensorRT could not create a builder ({exc}{'; TensorRT said: ' + said if said else ''}); "
            "TensorRT needs an NVIDIA GPU with a working driver"
        ) from exc
    # TensorRT 8.x parses ONNX only into explicit-batch networks; in 10.x that is the only kind (flag 0).
    flags = 0 if tensorrt_major(trt) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    _parse_onnx(trt, network, logger, path)
    return logger, builder, network


def _builder_config(trt: ModuleType, builder: Any, build: EngineBuildConfig) -> Any:
    """The builder config: memory, optimization level, INT8 (+FP16), calibrate before fusion."""
    config = builder.create_builder_config()
    if build.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, build.workspace_bytes)
    if build.builder_optimization_level is not None:
        if not hasattr(config, "builder_optimization_level"):
            raise ConfigError(
                f"TensorRT {trt.__version__} has no builder optimization level (it came in 8.6); "
                "leave builder_optimization_level unset"
            )
        config.builder_optimization_level = build.builder_optimization_level
    sources = os.environ.get(TACTIC_SOURCES_ENV, "").strip()
    if sources:
        config.set_tactic_sources(_tactic_source_mask(trt, sources))
    if not builder.platform_has_fast_int8:
        log.warning("this GPU has no fast INT8; TensorRT may fall back to higher precision")
    config.set_flag(trt.BuilderFlag.INT8)
    if build.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if build.calibrate_before_fusion:
        config.set_quantization_flag(trt.QuantizationFlag.CALIBRATE_BEFORE_FUSION)
    return config


# Machines without cuBLAS/cuDNN (TensorRT 8.x enables both by default and dlopens them): e.g.
# TRTCAL_TRT_TACTIC_SOURCES=EDGE_MASK_CONVOLUTIONS,JIT_CONVOLUTIONS. A deployment knob, like
# CUDA_VISIBLE_DEVICES, not a calibration setting, so it lives outside EngineBuildConfig.
TACTIC_SOURCES_ENV = "TRTCAL_TRT_TACTIC_SOURCES"


def _tactic_source_mask(trt: ModuleType, names: str) -> int:
    mask = 0
    for name in filter(None, (n.strip().upper() for n in names.split(","))):
        source = getattr(trt.TacticSource, name, None)
        if source is None:
            known = sorted(n for n in dir(trt.TacticSource) if n.isupper())
            raise ConfigError(f"{TACTIC_SOURCES_ENV}: unknown tactic source {name!r}; TensorRT {trt.__version__} has {known}")
        mask |= 1 << int(source)
    return mask


def _served_shapes(calibrator: ArrowBatchCalibrator) -> dict[str, tuple[int, ...]]:
    """The shapes the calibrator will serve; none when a usable cache means no data is read at all."""
    cached = calibrator.read_calibration_cache() is not None
    calibrator.raise_if_failed()
    return {} if cached else calibrator.peek_shapes()


def _add_profile(
    builder: Any,
    config: Any,
    inputs: Mapping[str, Any],
    input_shapes: Mapping[str, ShapeSpec] | None,
    calibration_shapes: Mapping[str, Sequence[int]],
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """The optimization profile of the dynamic inputs (added to `config` when there are any)."""
    network_shapes = {name: tuple(tensor.shape) for name, tensor in inputs.items()}
    profile_shapes = resolve_profile_shapes(
        network_shapes, input_shapes=input_shapes, calibration_shapes=calibration_shapes
    )
    if profile_shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    return profile_shapes


def _attach_calibrator(
    builder: Any,
    config: Any,
    calibrator: Any,
    inputs: Mapping[str, Any],
    profile_shapes: Mapping[str, tuple[tuple[int, ...], ...]],
    calibration_profile: Mapping[str, Sequence[int]] | None,
    served: Mapping[str, tuple[int, ...]],
) -> None:
    """Calibration profile of the dynamic inputs, the live calibrator's input metadata, then attach."""
    network_shapes = {name: tuple(tensor.shape) for name, tensor in inputs.items()}
    calibration_shapes: dict[str, tuple[int, ...]] = dict(network_shapes)
    dynamic = [name for name, shape in network_shapes.items() if -1 in shape]
    if dynamic:
        chosen = dict(calibration_profile or {})
        unknown = sorted(set(chosen) - set(dynamic))
        if unknown:
            raise ConfigError(
                f"calibration_profile names {unknown}, which are not dynamic network inputs {dynamic}"
            )
        calibration = builder.create_optimization_profile()
        for name in dynamic:
            shape = _as_shape(
                chosen.get(name, served.get(name, profile_shapes[name][1])),
                f"calibration_profile[{name!r}]",
            )
            if not _fits(network_shapes[name], shape):
                raise ConfigError(
                    f"calibration shape {list(shape)} does not fit input {name!r} {list(network_shapes[name])}"
                )
            calibration.set_shape(name, shape, shape, shape)
            calibration_shapes[name] = shape
        if not config.set_calibration_profile(calibration):
            raise ConfigError(f"TensorRT refused the calibration profile {calibration_shapes}")
    if isinstance(calibrator, ArrowBatchCalibrator):
        for name, shape in served.items():
            if name in calibration_shapes and not _fits(calibration_shapes[name], shape):
                raise DataError(
                    f"the calibration batch's micro-batches of input {name!r} are {list(shape)}, but "
                    f"TensorRT calibrates it at {list(calibration_shapes[name])}; set micro_batch (or the "
                    "calibration profile) to match"
                )
        calibrator.set_input_metadata(
            {name: (calibration_shapes[name], _calibration_dtype(t.dtype)) for name, t in inputs.items()}
        )
    config.int8_calibrator = calibrator
