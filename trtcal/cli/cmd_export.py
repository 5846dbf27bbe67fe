"""`trtcal export qdq`: a Q/DQ ONNX model for TensorRT explicit quantization (TensorRT 11 and later).

    trtcal export qdq MODEL --ranges ranges.json --method entropy2 -o model.qdq.onnx
    trtcal export qdq MODEL --from-cache calibration.cache -o model.qdq.onnx      # TensorRT 10 -> 11
        [--exclude REGEX]... [--exclude-op-type REGEX]... [--no-noise-reduction] [--quantize-outputs]
        [--allow-missing-ranges] [--report-json FILE]

Ranges that name none of the model's tensors, or cover under half of the activations that need
Q/DQ, are taken for another model's calibration: an error (exit 2), not a model without Q/DQ.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from trtcal.errors import ConfigError

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    export = subparsers.add_parser(
        "export",
        help="export calibration results (Q/DQ ONNX)",
        description="Export calibration results to other formats.",
    )
    actions = export.add_subparsers(dest="export_command", metavar="FORMAT")
    actions.required = True
    qdq = actions.add_parser(
        "qdq",
        help="a Q/DQ ONNX model for TensorRT explicit quantization",
        description=(
            "Insert QuantizeLinear/DequantizeLinear pairs by TensorRT's placement rules: inputs of Conv, "
            "ConvTranspose, MatMul and Gemm (weights per output channel), the residual input of skip Adds; "
            "int8 zero points of 0. The ranges come from a trtcal ranges.json or from any TensorRT "
            "calibration cache (the TensorRT 10 -> 11 migration path)."
        ),
    )
    qdq.add_argument("model", help="the FP32 ONNX model")
    source = qdq.add_mutually_exclusive_group(required=True)
    source.add_argument("--ranges", metavar="JSON", help="ranges.json written by `trtcal calibrate`")
    source.add_argument("--from-cache", metavar="FILE", help="a TensorRT calibration cache, whoever wrote it")
    qdq.add_argument("--method", help="which method's ranges to use (with --ranges, when it holds several)")
    qdq.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the Q/DQ model")
    qdq.add_argument(
        "--exclude",
        action="append",
        metavar="REGEX",
        help="keep nodes in float whose name contains a match (re.search) or whose op type matches in full; repeatable",
    )
    qdq.add_argument(
        "--exclude-op-type", action="append", metavar="REGEX", help="keep nodes of matching op types in float; repeatable"
    )
    qdq.add_argument(
        "--no-noise-reduction",
        dest="noise_reduction",
        action="store_false",
        default=None,
        help="also quantize the last smoothing layer before each FP32 output (kept float by default)",
    )
    qdq.add_argument(
        "--quantize-outputs", action="store_true", default=None, help="also quantize the outputs of quantized layers"
    )
    qdq.add_argument(
        "--allow-missing-ranges",
        action="store_true",
        default=None,
        help="export even when the ranges cover under half of the activations that need Q/DQ (taken for another "
        "model's calibration otherwise; the layers without a range stay float)",
    )
    qdq.add_argument("--report-json", metavar="FILE", help="write what was quantized, kept float and missing as JSON")
    qdq.add_argument(
        "--allow-empty", action="store_true", default=False,
        help="write the model even when nothing gets quantized (otherwise an error naming why)",
    )
    qdq.set_defaults(func=run_qdq)


def qdq_config_from_args(args: argparse.Namespace) -> Any:
    """QdqConfig from the shared export options (None means "not given": the dataclass default applies)."""
    from trtcal.export.qdq import QdqConfig

    kwargs: dict[str, Any] = {}
    excludes = tuple(getattr(args, "exclude", None) or ())
    if excludes:
        kwargs["exclude_nodes"] = excludes
        kwargs["exclude_op_types"] = excludes
    if getattr(args, "exclude_op_type", None):
        kwargs["exclude_op_types"] = tuple(kwargs.get("exclude_op_types", ())) + tuple(args.exclude_op_type)
    if getattr(args, "noise_reduction", None) is not None:
        kwargs["keep_last_smoothing_float"] = bool(args.noise_reduction)
    if getattr(args, "allow_missing_ranges", None):
        kwargs["min_range_coverage"] = 0.0
    if getattr(args, "quantize_outputs", None) is not None:
        kwargs["quantize_outputs"] = bool(args.quantize_outputs)
    return QdqConfig(**kwargs)


def run_qdq(args: argparse.Namespace) -> int:
    from trtcal.core import read_trt_cache
    from trtcal.export.qdq import (
        activation_scales,
        amax_for_method,
        build_qdq,
        read_ranges,
        require_quantized,
        save_model,
        write_bytes_atomic,
    )

    config = qdq_config_from_args(args)
    if args.from_cache is not None:
        if args.method is not None:
            raise ConfigError("--method applies to --ranges only; a calibration cache holds one set of scales")
        path = Path(args.from_cache)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read calibration cache {str(path)!r}: {exc}") from None
        scales = read_trt_cache(data).scale
    else:
        scales = activation_scales(amax_for_method(read_ranges(args.ranges), args.method, source=args.ranges))
    export = build_qdq(args.model, scales, config)
    report = export.report
    require_quantized(report, allow_empty=args.allow_empty, what=f"exporting {args.model}")
    save_model(export.model, args.output)
    for line in report.float_in_subgraphs:
        print(f"kept float: {line}", file=sys.stderr)
    if args.report_json:
        text = json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n"
        write_bytes_atomic(args.report_json, text.encode("utf-8"))
    print(
        f"wrote {args.output}: {len(report.quantized_nodes)} layers and {len(report.residual_adds)} residual Adds "
        f"quantized; kept float: {len(report.kept_float_nodes)} (noise reduction), {len(report.excluded_nodes)} "
        f"(excluded), {len(report.skipped_nodes)} (no range: {len(report.missing_tensors)} tensors), "
        f"{len(report.float_in_subgraphs)} input(s) inside If/Loop/Scan bodies; {len(report.mask_adds)} mask Adds float",
        file=sys.stderr,
    )
    return 0
