"""`trtcal engine build`: an INT8 TensorRT 10 engine from a trtcal cache, or calibrated by TensorRT itself.

    trtcal engine build MODEL --cache calibration.cache -o model.engine
    trtcal engine build MODEL --calibrate --data batch.arrow --algorithm entropy2 --micro-batch 32 -o model.engine

Needs TensorRT 10.x (the `tensorrt` extra) and a GPU; without them it stops with an error that
says how to install TensorRT, before reading any data.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trtcal._io import write_atomic
from trtcal.errors import ConfigError, ModelError, StorageError

log = logging.getLogger(__name__)

_TENSORRT_ALGORITHMS = ("entropy2", "minmax", "entropy", "legacy")


def register(subparsers: Any) -> None:
    engine = subparsers.add_parser(
        "engine",
        help="build TensorRT engines (needs TensorRT 10)",
        description="Build INT8 TensorRT 10 engines from trtcal caches or with TensorRT's own calibrators.",
    )
    actions = engine.add_subparsers(dest="engine_command", metavar="ACTION")
    actions.required = True
    build = actions.add_parser(
        "build",
        help="build an INT8 engine",
        description=(
            "Build a serialized INT8 TensorRT engine of an ONNX model, either from a calibration cache "
            "(--cache: its header is rewritten for the installed TensorRT, so TensorRT uses its scales) "
            "or by letting TensorRT calibrate on a calibration batch (--calibrate --data)."
        ),
    )
    build.add_argument("model", help="the FP32 ONNX model")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--cache", metavar="FILE", help="a TensorRT calibration cache (e.g. trtcal's calibration.cache)"
    )
    source.add_argument(
        "--calibrate", action="store_true", default=None, help="let TensorRT calibrate on --data"
    )
    build.add_argument(
        "--data",
        metavar="BATCH",
        help="calibration batch: trtcal's Arrow batch file, or .npz (input name -> array) / .npy (single input)",
    )
    build.add_argument(
        "--algorithm",
        choices=_TENSORRT_ALGORITHMS,
        help="TensorRT calibrator (with --cache: the calibrator the cache is replayed as)",
    )
    build.add_argument("--micro-batch", type=int, metavar="N", help="samples per TensorRT calibration batch")
    build.add_argument(
        "--partial-batch",
        choices=("error", "drop"),
        help="a last micro-batch that is not full: fail, or drop it",
    )
    build.add_argument("--quantile", type=float, help="legacy calibrator quantile, in (0, 1]")
    build.add_argument(
        "--regression-cutoff", type=float, help="legacy calibrator regression cutoff, in (0, 1]"
    )
    build.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=DIMS",
        help="shape of a dynamic input, e.g. input=8x3x224x224, or min,opt,max: input=1x3x224x224,8x3x224x224,16x3x224x224",
    )
    build.add_argument(
        "--calibration-shape",
        action="append",
        metavar="NAME=DIMS",
        help="shape TensorRT calibrates a dynamic input at",
    )
    build.add_argument(
        "--ranges",
        metavar="JSON",
        help='manual dynamic ranges: {"tensor": amax | [min, max] | {"amax": amax}}',
    )
    build.add_argument("--workspace-mib", type=int, metavar="MIB", help="TensorRT workspace limit")
    build.add_argument(
        "--timing-cache", metavar="FILE",
        help="TensorRT timing cache: read if it exists, updated after the build (rebuilds skip kernel timing)",
    )
    build.add_argument("--fp16", action="store_true", default=None, help="also allow FP16 kernels")
    build.add_argument(
        "--calibrate-before-fusion",
        action="store_true",
        default=None,
        help="QuantizationFlag.CALIBRATE_BEFORE_FUSION (legacy and entropy calibrators)",
    )
    build.add_argument(
        "--save-cache", metavar="FILE", help="with --calibrate: also write the cache TensorRT produced"
    )
    build.add_argument("-o", "--output", required=True, metavar="ENGINE", help="where to write the engine")
    build.set_defaults(func=run_build)


def _parse_dims(text: str, option: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a shape like 8x3x224x224") from None
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"{option}: {text!r} must have positive dimensions")
    return dims


def parse_shape_options(values: Sequence[str] | None, option: str, *, allow_range: bool) -> dict[str, Any]:
    """`NAME=DIMS` (or `NAME=MIN,OPT,MAX` where allowed) options -> {name: shape or (min, opt, max)}."""
    shapes: dict[str, Any] = {}
    for value in values or ():
        name, sep, spec = value.rpartition("=")
        if not sep or not name:
            raise ConfigError(f"{option} takes NAME=DIMS, got {value!r}")
        if name in shapes:
            raise ConfigError(f"{option} names {name!r} twice")
        parts = spec.split(",")
        if len(parts) == 3 and allow_range:
            shapes[name] = tuple(_parse_dims(p, option) for p in parts)
        elif len(parts) == 1:
            shapes[name] = _parse_dims(parts[0], option)
        else:
            expected = "DIMS or MIN,OPT,MAX" if allow_range else "DIMS"
            raise ConfigError(f"{option} takes NAME={expected}, got {value!r}")
    return shapes


def read_ranges(path: Path) -> dict[str, Any]:
    """A JSON object tensor -> amax, [min, max] or {"amax": amax}."""
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--ranges: {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--ranges: cannot read {path} as JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"--ranges: {path} must hold a JSON object of tensor -> range")
    ranges: dict[str, Any] = {}
    for name, value in table.items():
        if isinstance(value, dict):
            if "amax" not in value:
                raise ConfigError(f"--ranges: entry {name!r} in {path} has no 'amax'")
            value = value["amax"]
        ranges[str(name)] = value
    return ranges


def open_batch(path: Path, model: Path) -> Any:
    """The calibration batch in `path`: trtcal's Arrow batch file, or .npz / .npy (one input)."""
    from trtcal.batch import open_any
    from trtcal.model import input_names

    if not path.is_file():
        raise ConfigError(f"--data: {path} does not exist")
    return open_any(path, lambda: input_names(model))


def _check_cache_is_for(model: Path, cache: Path) -> None:
    """A cache of a smoothed copy is refused before TensorRT is loaded, naming the model to use."""
    from trtcal.core import read_trt_cache
    from trtcal.errors import CacheFormatError
    from trtcal.export.model_io import load_model, model_tensor_names
    from trtcal.export.smoothed_names import check_not_smoothed_for

    try:
        names = read_trt_cache(cache.read_bytes()).scale
    except (CacheFormatError, OSError):
        return  # the adapter reports an unreadable cache as it always has
    check_not_smoothed_for(names, model_tensor_names(load_model(str(model))), model=str(model),
                           what=f"calibration cache {str(cache)!r}", beside=str(cache.parent))


def run_build(args: argparse.Namespace) -> int:
    # Cheap checks first: a wrong command line is reported before TensorRT is even looked for.
    if args.calibrate and not args.data:
        raise ConfigError("--calibrate needs --data BATCH (the calibration batch TensorRT calibrates on)")
    if args.cache is not None:
        stray = [
            flag
            for flag, value in (
                ("--data", args.data),
                ("--micro-batch", args.micro_batch),
                ("--partial-batch", args.partial_batch),
                ("--quantile", args.quantile),
                ("--regression-cutoff", args.regression_cutoff),
                ("--save-cache", args.save_cache),
            )
            if value is not None
        ]
        if stray:
            raise ConfigError(f"{', '.join(stray)} only apply with --calibrate")
        if not Path(args.cache).is_file():
            raise ConfigError(f"--cache: {args.cache} does not exist")
        if args.algorithm == "legacy":
            raise ConfigError(
                "--cache cannot be replayed as the legacy calibrator; use entropy2, minmax or entropy"
            )
    model = Path(args.model)
    if not model.is_file():
        raise ModelError(f"ONNX model {model} does not exist")
    if args.cache is not None:
        _check_cache_is_for(model, Path(args.cache))
    input_shapes = parse_shape_options(args.input_shape, "--input-shape", allow_range=True)
    calibration_shapes = parse_shape_options(args.calibration_shape, "--calibration-shape", allow_range=False)
    ranges = read_ranges(Path(args.ranges)) if args.ranges else None
    workspace = None if args.workspace_mib is None else int(args.workspace_mib) << 20
    output = Path(args.output)

    from trtcal.runners import tensorrt as adapter

    trt = adapter.load_tensorrt()
    build_options: dict[str, Any] = dict(
        dynamic_ranges=ranges,
        input_shapes=input_shapes or None,
        calibration_profile=calibration_shapes or None,
        calibrate_before_fusion=args.calibrate_before_fusion,
        workspace_bytes=workspace,
        timing_cache=args.timing_cache,
        fp16=args.fp16,
    )
    if args.cache is not None:
        engine = adapter.build_engine(
            model, cache=Path(args.cache), replay_algorithm=args.algorithm, **build_options
        )
        cache_bytes = None
    else:
        from trtcal.cli.progress import TqdmProgress

        batch = open_batch(Path(args.data), model)
        progress = TqdmProgress(enabled=not getattr(args, "quiet", False))
        with (
            batch,
            adapter.make_calibrator(
                args.algorithm,
                batch,
                micro_batch=args.micro_batch,
                partial_batch=args.partial_batch,
                quantile=args.quantile,
                regression_cutoff=args.regression_cutoff,
                progress=progress,
            ) as calibrator,
        ):
            engine = adapter.build_engine(model, calibrator=calibrator, **build_options)
            cache_bytes = calibrator.calibration_cache
    try:
        write_atomic(output, engine)
        if args.save_cache is not None:
            if cache_bytes is None:
                raise ModelError("TensorRT wrote no calibration cache, so --save-cache has nothing to save")
            write_atomic(Path(args.save_cache), cache_bytes)
    except OSError as exc:
        raise StorageError(
            f"cannot write {exc.filename or output}: {exc}", url=str(exc.filename or output)
        ) from exc
    log.info("wrote %s (%d bytes, TensorRT %s)", output, len(engine), trt.__version__)
    return 0
