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
    smooth = actions.add_parser(
        "smooth",
        help="a SmoothQuant-smoothed FP32 copy of a transformer (calibrate and deploy it instead)",
        description=(
            "Move the per-channel outliers of LayerNorm outputs read by MatMuls into those MatMuls' weights "
            "(s = max|x|^alpha / max|W|^(1-alpha), per input channel, over the calibration data); the same "
            "FP32 function. docs/qdq.md, 'Smoothing'."
        ),
    )
    smooth.add_argument("model", help="the FP32 ONNX model")
    smooth.add_argument("--data", required=True, metavar="FILE", help="calibration data: .npz (one array per input) or .arrow batch")
    smooth.add_argument("--alpha", type=float, default=0.5, help="migration strength in [0, 1] (default 0.5)")
    smooth.add_argument("--mask-input", metavar="NAME", help="attention-mask input (0 = padding): padded positions do not count")
    smooth.add_argument("--micro-batch", type=int, default=32, metavar="N", help="rows per ONNX Runtime run (default 32)")
    smooth.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the smoothed model")
    smooth.set_defaults(func=run_smooth)


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
        from trtcal.export.model_io import load_model, model_tensor_names
        from trtcal.export.smoothed_names import check_not_smoothed_for

        check_not_smoothed_for(scales, model_tensor_names(load_model(args.model)), model=str(args.model),
                               what=f"calibration cache {str(path)!r}", beside=str(path.parent))
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


def run_smooth(args: argparse.Namespace) -> int:
    from trtcal.batch import open_any
    from trtcal.export.qdq import load_model, save_model
    from trtcal.export.smoothing import smooth_model
    from trtcal.model import model_inputs

    if args.micro_batch < 1:
        raise ConfigError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    model = load_model(args.model)
    batch = open_any(args.data, lambda: sorted(model_inputs(model)))
    if args.mask_input is not None and args.mask_input not in batch.input_names:
        raise ConfigError(f"--mask-input {args.mask_input!r} is not in the data (it holds {list(batch.input_names)})")
    arrays = {name: batch.array(name) for name in batch.input_names}
    feeds = [{k: v[i : i + args.micro_batch] for k, v in arrays.items()} for i in range(0, batch.num_rows, args.micro_batch)]
    smoothed, report = smooth_model(model, feeds, alpha=args.alpha, mask_input=args.mask_input)
    save_model(smoothed, args.output)
    print(f"smoothed {len(report.smoothed)} tensor(s) read by "
          f"{sum(len(v) for v in report.smoothed.values())} MatMul(s) (alpha {args.alpha}); wrote {args.output}")
    return 0
