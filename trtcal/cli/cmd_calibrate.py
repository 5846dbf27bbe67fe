"""`trtcal calibrate MODEL --data FILE --output DIR ...`: calibrate a model on a prepared batch.

The argument groups are built by functions (`add_calibration_arguments`, `add_data_arguments`)
so the orchestrator can extend the command (image folders, Ray, stores) without rewriting it.
Options default to None: `CalibrationConfig` is the only source of defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from trtcal.errors import ConfigError

__all__ = ["register", "add_calibration_arguments", "add_data_arguments", "config_from_args", "run"]


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", required=True, metavar="FILE",
        help="calibration batch: a trtcal .arrow batch (path or fsspec URL), a .npy (single-input models) "
        "or an .npz with one array per input name",
    )


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument(
        "--algorithm", "-a", action="append", dest="algorithms", metavar="METHOD", default=None,
        help="entropy2, entropy, minmax, percentile, mse or legacy; repeat for several (all computed from "
        "one collection; the first also becomes calibration.cache)",
    )
    group.add_argument("--trt-version", default=None, metavar="X.Y.Z", help="TensorRT version for the cache header")
    group.add_argument("--micro-batch", type=int, default=None, metavar="N", help="samples per ONNX Runtime run")
    group.add_argument("--num-bins", type=int, default=None, metavar="N", help="histogram bins per tensor")
    group.add_argument(
        "--percentile", type=float, default=None, metavar="P", help="percentile for --algorithm percentile (0-100]"
    )
    group.add_argument(
        "--tensors", default=None, metavar="WHICH",
        help="'all' floating activations, 'quantizable' op inputs, or a comma-separated list of tensor names",
    )
    group.add_argument(
        "--on-nonfinite", choices=("error", "ignore"), default=None, dest="nonfinite",
        help="NaN/Inf activations: fail naming the tensor, or skip those values",
    )
    group.add_argument(
        "--manual-ranges", default=None, metavar="FILE.json",
        help="JSON object tensor -> amax overriding (or adding to) the calibrated ranges",
    )
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (needs onnxruntime-gpu)")


def config_from_args(args: argparse.Namespace) -> Any:
    """A CalibrationConfig with only the options given on the command line set."""
    from trtcal.orchestrator.config import CalibrationConfig

    values: dict[str, Any] = {}
    if args.algorithms:
        values["algorithms"] = tuple(args.algorithms)
    for option in ("trt_version", "micro_batch", "num_bins", "nonfinite", "device"):
        value = getattr(args, option, None)
        if value is not None:
            values[option] = value
    if args.tensors is not None:
        values["tensors"] = args.tensors if args.tensors in ("all", "quantizable") else tuple(
            t.strip() for t in args.tensors.split(",") if t.strip()
        )
    if args.percentile is not None:
        values["method_params"] = {"percentile": {"percentile": args.percentile}}
    if args.manual_ranges is not None:
        try:
            with open(args.manual_ranges, encoding="utf-8") as f:
                manual = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--manual-ranges {args.manual_ranges!r}: {exc}") from None
        if not isinstance(manual, dict):
            raise ConfigError(f"--manual-ranges {args.manual_ranges!r} must hold a JSON object tensor -> amax")
        values["manual_ranges"] = manual
    return CalibrationConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    from trtcal.cli.progress import TqdmProgress
    from trtcal.orchestrator.pipeline import calibrate

    config = config_from_args(args)
    progress = TqdmProgress(enabled=not getattr(args, "quiet", False))
    result = calibrate(args.model, args.data, output_dir=args.output, config=config, progress=progress)
    out = sys.stdout
    print(f"calibrated {len(result.tensor_names)} tensors; artifacts in {result.output_dir}", file=out)
    for name in sorted(result.paths):
        print(f"  {name}", file=out)
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    print(f"timings: {timings}", file=out)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="calibrate an ONNX model on a calibration batch; write TensorRT caches and ranges",
        description="Run the FP32 model over the calibration batch once (two streaming passes), compute every "
        "requested method from the same histograms and publish the artifacts atomically into --output.",
    )
    parser.add_argument("model", metavar="MODEL", help="ONNX model file")
    add_data_arguments(parser)
    add_calibration_arguments(parser)
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="output directory (created atomically)")
    parser.set_defaults(func=run)
