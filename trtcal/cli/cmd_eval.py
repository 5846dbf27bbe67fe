"""`trtcal eval`: INT8-vs-FP32 accuracy of each calibration method, simulated exactly.

    trtcal eval MODEL (--ranges ranges.json | --result DIR) --data BATCH.arrow|.npy|.npz
        [--labels labels.npy] [--methods entropy2,minmax] [--limit N] [-o DIR]
        [--output-kind NAME=KIND]... [--sensitivity]
        [--fallback auto (--target-agreement 0.99 | --target-sqnr DB) [--max-float-fraction F]] [--method M]
        [--exclude REGEX]... [--no-noise-reduction] [--fused-int8]

Writes evaluation.json (and sensitivity.json, fallback.json, qdq_report.json and the fallback
model when asked) into -o DIR, or into the --result DIR when -o is not given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trtcal.cli.cmd_export import qdq_config_from_args
from trtcal.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="INT8-vs-FP32 accuracy per calibration method (exact Q/DQ simulation)",
        description=(
            "Build the Q/DQ model of each calibration method and compare every output with the FP32 model on real "
            "inputs: SQNR, cosine and max abs error; top-1 agreement, top-5 overlap and KL only where an output has "
            "a class axis (accuracy with --labels); the SQNR of a Softmax/Sigmoid's input too. INT8 is simulated "
            "exactly (ONNX Runtime with graph optimisations off)."
        ),
    )
    p.add_argument("model", help="the FP32 ONNX model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ranges", metavar="JSON", help="ranges.json written by `trtcal calibrate`")
    source.add_argument("--result", metavar="DIR", help="a `trtcal calibrate` output directory (reads its ranges.json)")
    p.add_argument("--data", required=True, metavar="BATCH", help="evaluation inputs: trtcal Arrow batch, .npz or .npy")
    p.add_argument("--labels", metavar="NPY", help="integer class index per input (.npy), for top-1 accuracy")
    p.add_argument("--methods", metavar="M1,M2", help="evaluate only these methods (default: every method in the ranges)")
    p.add_argument("--limit", type=int, metavar="N", help="use only the first N inputs (and labels)")
    p.add_argument("-o", "--output", metavar="DIR", help="where to write the JSON results (default: --result DIR)")
    p.add_argument("--output-name", help="the primary output: labels, method choice, sensitivity (default: the first)")
    p.add_argument("--output-kind", action="append", metavar="NAME=KIND",
                   help="what an output is: classes ([N, C]), sequence ([N, T, C]), values (boxes, embeddings, maps) "
                   "or auto (default)")
    p.add_argument("--batch-size", type=int, metavar="N", help="inputs per ONNX Runtime call")
    p.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime intra-op threads (0: ONNX Runtime decides)")
    p.add_argument("--fused-int8", action="store_true", default=None, help="also report ONNX Runtime's fused int8 path, labelled apart")
    p.add_argument("--sensitivity", action="store_true", default=None, help="rank layers by quantization sensitivity")
    p.add_argument("--sensitivity-inputs", type=int, metavar="N", help="inputs used for the sensitivity ranking")
    p.add_argument("--fallback", choices=("auto",), help="keep the most harmful blocks float until the target holds")
    p.add_argument("--target-agreement", type=float, metavar="T", help="top-1 agreement the fallback must reach")
    p.add_argument("--target-sqnr", type=float, metavar="DB", help="primary-output SQNR (dB) the fallback must reach")
    p.add_argument("--max-float-fraction", type=float, metavar="F",
                   help="most blocks the fallback may keep float, as a share (default 0.25); beyond it: unreachable")
    p.add_argument("--method", help="the method for --sensitivity/--fallback (default: the best by logit SQNR)")
    p.add_argument("--exclude", action="append", metavar="REGEX", help="as in `trtcal export qdq`")
    p.add_argument("--exclude-op-type", action="append", metavar="REGEX", help="as in `trtcal export qdq`")
    p.add_argument("--no-noise-reduction", dest="noise_reduction", action="store_false", default=None)
    p.add_argument("--quantize-outputs", action="store_true", default=None)
    p.set_defaults(func=run_eval)


def model_input_names(model: Any) -> list[str]:
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def load_inputs(path: str, input_names: Sequence[str], limit: int | None = None) -> dict[str, np.ndarray]:
    """Model inputs from a trtcal Arrow batch, an .npz (input name -> array) or an .npy (one input)."""
    from trtcal.batch import open_any

    batch = open_any(path, input_names)
    missing = [n for n in input_names if n not in batch.input_names]
    if missing:
        raise DataError(f"{path} lacks the model input(s) {missing}; it holds {list(batch.input_names)}")
    n = batch.num_rows if limit is None else min(limit, batch.num_rows)
    if n < 1:
        raise DataError(f"{path} holds no inputs")
    return {name: np.array(batch.array(name)[:n]) for name in input_names}


def _configs(args: argparse.Namespace) -> tuple[Any, Any]:
    from trtcal.export.evaluate import EvalConfig
    from trtcal.export.sensitivity import SensitivityConfig

    common = {
        k: v
        for k, v in {
            "batch_size": args.batch_size,
            "intra_op_threads": args.threads,
            "output_name": args.output_name,
        }.items()
        if v is not None
    }
    eval_kwargs = dict(common)
    if args.fused_int8 is not None:
        eval_kwargs["fused_int8"] = bool(args.fused_int8)
    sens_kwargs = dict(common)
    if args.sensitivity_inputs is not None:
        sens_kwargs["max_inputs"] = args.sensitivity_inputs
    if args.target_agreement is not None:
        sens_kwargs["target_agreement"] = args.target_agreement
    if args.target_sqnr is not None:
        sens_kwargs["target_sqnr"] = args.target_sqnr
    if args.max_float_fraction is not None:
        sens_kwargs["max_float_fraction"] = args.max_float_fraction
    kinds = _output_kinds(args.output_kind or ())
    if kinds:
        eval_kwargs["output_kinds"] = kinds
    return EvalConfig(**eval_kwargs), SensitivityConfig(**sens_kwargs)


def _output_kinds(items: Sequence[str]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for item in items:
        name, sep, kind = item.rpartition("=")
        if not sep or not name:
            raise ConfigError(f"--output-kind {item!r}: write NAME=KIND, e.g. boxes=values")
        kinds[name] = kind
    return kinds


def load_labels(path: str, limit: int | None) -> np.ndarray:
    """Integer class indices from an .npy, cut to --limit like the inputs."""
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read labels {path!r}: {exc}") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"labels {path!r}: need a 1-D array of integer class indices, got {labels.dtype} {list(labels.shape)}")
    cut: np.ndarray = labels if limit is None else labels[:limit]
    return cut


def _write_json(directory: Path, name: str, payload: Any) -> Path:
    from trtcal.export.qdq import write_bytes_atomic

    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return write_bytes_atomic(directory / name, text.encode("utf-8"))


def run_eval(args: argparse.Namespace) -> int:
    from trtcal.cli.progress import TqdmProgress
    from trtcal.export.evaluate import evaluate
    from trtcal.export.qdq import activation_scales, build_qdq, load_model, read_ranges, save_model
    from trtcal.export.sensitivity import fallback_auto, rank_sensitivity

    for flag, value in (("--target-agreement", args.target_agreement), ("--target-sqnr", args.target_sqnr),
                        ("--max-float-fraction", args.max_float_fraction)):
        if value is not None and args.fallback is None:
            raise ConfigError(f"{flag} needs --fallback auto")
    ranges_path = args.ranges if args.ranges is not None else str(Path(args.result) / "ranges.json")
    out_dir = Path(args.output) if args.output is not None else (Path(args.result) if args.result is not None else None)
    ranges = read_ranges(ranges_path)
    methods = list(ranges)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in ranges]
        if unknown:
            raise ConfigError(f"--methods: {unknown} not in {ranges_path} (it holds {methods})")
        methods = wanted
    qdq_config = qdq_config_from_args(args)
    eval_config, sens_config = _configs(args)
    fp32 = load_model(args.model)
    primary = args.output_name or fp32.graph.output[0].name
    if primary in eval_config.output_kinds:
        sens_config = dataclasses.replace(sens_config, output_kind=eval_config.output_kinds[primary])
    inputs = load_inputs(args.data, model_input_names(fp32), args.limit)
    labels = None
    if args.labels is not None:
        labels = load_labels(args.labels, args.limit)
        n = len(next(iter(inputs.values())))
        if labels.shape[0] != n:
            raise DataError(f"labels {args.labels!r}: {labels.shape[0]} labels for {n} inputs in {args.data!r}")
    progress = TqdmProgress(enabled=not getattr(args, "quiet", False) and sys.stderr.isatty())
    scales = {m: activation_scales(ranges[m]) for m in methods}
    exports = {m: build_qdq(fp32, scales[m], qdq_config) for m in methods}
    try:
        result = evaluate(fp32, {m: e.model for m, e in exports.items()}, inputs, labels, config=eval_config, progress=progress)
    except DataError as exc:
        if labels is not None and "label" in str(exc):
            raise DataError(f"labels {args.labels!r}: {exc}") from None
        raise
    print(result.to_markdown())
    if out_dir is not None:
        _write_json(out_dir, "evaluation.json", result.to_dict())

    chosen = args.method or result.best().label
    if chosen not in exports:
        raise ConfigError(f"--method {chosen!r} is not among the evaluated methods {methods}")
    if out_dir is not None:
        _write_json(out_dir, "qdq_report.json", {"method": chosen, **exports[chosen].report.to_dict()})
    ranking = None
    if args.sensitivity or args.fallback:
        ranking = rank_sensitivity(fp32, scales[chosen], inputs, qdq_config=qdq_config, config=sens_config, progress=progress)
        print(f"\nsensitivity ({ranking.method}, {ranking.num_inputs} inputs, method {chosen}), most harmful first:")
        for k, r in enumerate(ranking.ranking[:10], start=1):
            extra = f" + {', '.join(r.layers[1:])}" if len(r.layers) > 1 else ""
            print(f"  {k:2d}. {r.node} ({r.op_type}){extra}: noise {r.noise_ratio:.3e}, SQNR alone {r.sqnr_db:.2f} dB")
        if out_dir is not None:
            _write_json(out_dir, "sensitivity.json", {"method_evaluated": chosen, **ranking.to_dict()})
    if args.fallback:
        fb = fallback_auto(
            fp32, scales[chosen], inputs, ranking=ranking, qdq_config=qdq_config, config=sens_config, progress=progress
        )
        share = "n/a" if fb.float_mac_fraction is None else f"{100 * fb.float_mac_fraction:.1f}% of quantized MACs"
        agreement = (
            "" if fb.before.top1_agreement is None or fb.after.top1_agreement is None
            else f"agreement {fb.before.top1_agreement:.4f} -> {fb.after.top1_agreement:.4f}, "
        )
        print(
            f"\nfallback ({chosen}): target {fb.target} {'met' if fb.met else 'NOT met'}; {fb.float_blocks} of "
            f"{len(ranking.ranking) if ranking else '?'} blocks ({len(fb.float_nodes)} of {fb.quantized_layers} layers) "
            f"kept float ({share}); {agreement}SQNR {fb.before.sqnr_db:.2f} -> {fb.after.sqnr_db:.2f} dB"
        )
        if fb.reason:
            print(f"fallback: {fb.reason}")
        if out_dir is not None:
            _write_json(out_dir, "fallback.json", {"method": chosen, **fb.to_dict()})
            if fb.model is not None:
                safe = re.sub(r"[^A-Za-z0-9._-]", "_", chosen)
                save_model(fb.model, out_dir / f"model.{safe}.fallback.qdq.onnx")
    return 0
