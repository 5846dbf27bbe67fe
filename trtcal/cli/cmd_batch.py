"""`trtcal batch build|show`: build one calibration batch from a dataset on Ray, or describe a batch.

    trtcal batch build --data URL -o BATCH_URL [--num-samples N|all] [--seed S] [--preprocess P]
        [--workers W] [--address A] [--on-bad-input skip|fail] [--stratify] [--input-name NAME]
        [--layout NCHW|NHWC] [--dtype float32|float16] [--interpolation NAME] [--report-json FILE]
    trtcal batch show BATCH_URL [--json] [--no-verify]

S3 credentials and endpoints come from the usual AWS environment variables (AWS_ENDPOINT_URL
included) or `--storage-option KEY=VALUE`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from trtcal.cli._options import add_storage_option, parse_storage_options
from trtcal.config import OnBadInput, choices

__all__ = ["register", "add_input_options", "batch_config_from_args", "run_build", "run_show"]


def add_input_options(parser: Any) -> None:
    """--inputs / --tokenizer / --text-field (shared by `batch build` and `calibrate`; docs/inputs.md)."""
    parser.add_argument(
        "--inputs", metavar="JSON|FILE",
        help="declared model inputs: {name: {dtype, length, pad_value, batch_axis, value, shape, mask, column}}",
    )
    parser.add_argument("--tokenizer", metavar="MOD:FN|tokenizer.json", help="tokenize raw text (JSONL field, .txt lines)")
    parser.add_argument("--text-field", metavar="NAME", help="the JSONL/Parquet field holding raw text (default: text)")


def register(subparsers: Any) -> None:
    batch = subparsers.add_parser(
        "batch",
        help="build or inspect a calibration batch",
        description="Build ONE calibration batch (Arrow IPC) from a dataset with Ray workers, or inspect one.",
    )
    actions = batch.add_subparsers(dest="batch_command", metavar="ACTION")
    actions.required = True

    build = actions.add_parser(
        "build",
        help="preprocess a dataset into one calibration batch",
        description=(
            "Select samples deterministically (sorted listing, seeded draw), preprocess them in Ray tasks and "
            "publish one Arrow IPC record batch, rows sorted by sample id: the same bytes for any --workers."
        ),
    )
    build.add_argument("--data", required=True, metavar="URL", help="folder/prefix, .txt/.csv list, Parquet, .npy/.npz")
    build.add_argument("-o", "--output", required=True, metavar="BATCH_URL", help="where to publish the .arrow batch")
    build.add_argument("--num-samples", metavar="N|all", help="how many samples to draw (default: the config's)")
    build.add_argument("--seed", type=int, metavar="S", help="seed of the sample draw")
    build.add_argument(
        "--preprocess",
        metavar="P",
        help="preset (imagenet, efficientnet-lite, raw), 'package.module:function', or a JSON spec / .json file",
    )
    build.add_argument("--layout", choices=("NCHW", "NHWC"), help="override the preset's layout")
    build.add_argument("--dtype", choices=("float32", "float16"), help="override the preset's dtype")
    build.add_argument(
        "--interpolation",
        choices=("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"),
        help="override the preset's resize filter",
    )
    build.add_argument("--workers", type=int, metavar="W", help="tasks in flight (default: the cluster's CPUs)")
    build.add_argument("--address", metavar="A", help="Ray cluster address (default: an embedded local Ray)")
    build.add_argument("--on-bad-input", choices=choices(OnBadInput), help="corrupt/unreadable inputs: fail (default) or skip")
    build.add_argument("--stratify", action="store_true", default=None, help="draw evenly per class folder / label")
    build.add_argument("--input-name", metavar="NAME", help="the model input the arrays feed (default: input)")
    build.add_argument("--max-image-pixels", type=int, metavar="N", help="decompression-bomb limit per image")
    add_input_options(build)
    add_storage_option(build, what="the dataset and the output")
    build.add_argument("--report-json", metavar="FILE", help="write the build report (skipped files, timings) as JSON")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(func=run_build)

    show = actions.add_parser("show", help="describe a calibration batch", description="Print a batch's schema, rows, fingerprint and spec.")
    show.add_argument("batch", metavar="BATCH_URL")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--no-verify", action="store_true", help="do not recompute the fingerprint")
    add_storage_option(show, what="the batch")
    show.set_defaults(func=run_show)


# BatchConfig fields that `batch build` and `calibrate` both take from options of the same name.
_BATCH_OPTIONS = (
    "num_samples", "seed", "workers", "on_bad_input", "stratify", "input_name", "max_image_pixels", "inputs",
    "tokenizer", "text_field",
)


def batch_config_from_args(args: argparse.Namespace) -> Any:
    """A BatchConfig from the options given (None means "not given": BatchConfig's default applies).

    Shared by `batch build` and `calibrate`; options a command does not have count as not given.
    """
    from dataclasses import replace

    from trtcal.config import BatchConfig
    from trtcal.workers.preprocess import parse_preprocess

    overrides = {k: getattr(args, k, None) for k in ("layout", "dtype", "interpolation")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    values: dict[str, Any] = {name: getattr(args, name, None) for name in _BATCH_OPTIONS}
    if getattr(args, "preprocess", None) is not None:
        values["preprocess"] = parse_preprocess(args.preprocess, **overrides)
    elif overrides:
        values["preprocess"] = replace(BatchConfig().preprocess, **overrides)
    return BatchConfig().with_overrides(**values)


def run_build(args: argparse.Namespace) -> int:
    from trtcal.cli.progress import stage_progress
    from trtcal.workers.build import build_batch

    config = batch_config_from_args(args)
    progress = stage_progress(quiet=bool(args.no_progress or getattr(args, "quiet", False)))
    report = build_batch(
        args.data, args.output, config, address=args.address, progress=progress,
        storage_options=parse_storage_options(args.storage_option),
    )
    if args.report_json:
        with open(args.report_json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
    seconds = report.wall_seconds.get("total", 0.0)
    process = report.wall_seconds.get("process", 0.0)
    rate = report.num_selected / process if process > 0 else 0.0
    shapes = ", ".join(f"{i.name} {list(i.shape)} {i.dtype}" for i in report.inputs)
    print(
        f"wrote {report.output_url}: {report.num_rows} rows ({shapes}), {report.fingerprint}, "
        f"{report.nbytes / 2**20:.1f} MiB in {seconds:.1f} s ({rate:.1f} samples/s preprocessing, "
        f"{report.workers} workers)"
    )
    for bad in report.refused:
        print(f"refused {bad}", file=sys.stderr)
    for bad in report.skipped:
        print(f"skipped {bad}", file=sys.stderr)
    for message in report.warnings:
        print(f"trtcal: warning: {message}", file=sys.stderr)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from trtcal.batch import FINGERPRINT_SCHEME, open_batch

    with open_batch(args.batch, verify=not args.no_verify, **parse_storage_options(args.storage_option)) as batch:
        inputs = [info.to_dict() for info in batch.inputs.values()]
        spec = dict(batch.spec)
        description = {
            "batch": args.batch,
            "rows": batch.num_rows,
            "fingerprint": batch.fingerprint,
            "verified": not args.no_verify,
            "schema": [{"name": "sample_id", "type": "string"}]
            + [
                {"name": i["name"], "type": f"arrow.fixed_shape_tensor<{i['dtype']}>", "shape": i["shape"]}
                for i in inputs
            ],
            "spec": spec,
            "skipped_inputs": spec.get("skipped_inputs"),
            "nbytes": batch.nbytes,
            "fingerprint_scheme": FINGERPRINT_SCHEME,
        }
        if args.json:
            print(json.dumps(description, indent=2, sort_keys=True))
            return 0
        ids = batch.sample_ids
        print(f"batch:        {args.batch}")
        print(f"rows:         {batch.num_rows}")
        print(f"fingerprint:  {batch.fingerprint}" + ("  (verified)" if not args.no_verify else "  (not verified)"))
        print("schema:")
        for column in description["schema"]:
            shape = f" {column['shape']}" if "shape" in column else ""
            print(f"  {column['name']}: {column['type']}{shape}")
        skipped = spec.get("skipped_inputs")
        print(f"skipped:      {skipped if skipped is not None else 'not recorded'}")
        print(f"first/last:   {ids[0]!r} .. {ids[-1]!r}" if ids else "first/last:   (empty)")
        print("spec:")
        print("  " + json.dumps(spec, indent=2, sort_keys=True).replace("\n", "\n  "))
    return 0
