"""`trtcal calibrate MODEL --data URL [--store URL] [--output DIR] ...`: the whole job, one command.

Runs `trtcal.orchestrator.job.calibrate_dataset`: a store hit copies the artifacts out; a miss
preprocesses the dataset on Ray workers (or takes a prepared .arrow/.npy/.npz batch), calibrates in
the calibration actor and publishes. Progress bars per stage go to stderr (on a terminal), the final
table (or `--json`) to stdout; errors are one paragraph on stderr (with `--json`, also a JSON
object `{"error": {"type", "message"}}` on stdout, plus `"internal": true` for a bug in trtcal), the
traceback only with -v.

The argument groups are built by functions (`add_calibration_arguments`, `add_data_arguments`,
`add_job_arguments`) so other commands reuse them. Options default to None: the dataclasses of
`trtcal.config` are the only source of defaults (and of the choices offered).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from trtcal.cli._options import add_storage_option, parse_storage_options
from trtcal.config import ActorDevice, Backend, Nonfinite, OnBadInput, SmoothMode, TensorSelection, choices
from trtcal.errors import ConfigError, TrtcalError

__all__ = ["register", "add_calibration_arguments", "add_data_arguments", "add_job_arguments", "config_from_args", "job_config_from_args", "run"]


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
        help="auto (per tensor the candidate range with the least measured output noise), entropy2, "
        "entropy, minmax, percentile, mse or legacy; repeat for several (all computed from one collection; the "
        "first also becomes calibration.cache)",
    )
    group.add_argument(
        "--min-sqnr", type=float, default=None, metavar="DB",
        help="fail (nothing published) when the written method's worst output SQNR on the held-out verdict slice "
        "is below DB",
    )
    group.add_argument(
        "--no-verdict", action="store_false", default=None, dest="verdict",
        help="skip the quality verdict (each method's Q/DQ model judged on the held-out slice)",
    )
    group.add_argument("--trt-version", default=None, metavar="X.Y.Z", help="TensorRT version for the cache header")
    group.add_argument("--micro-batch", type=int, default=None, metavar="N", help="samples per ONNX Runtime run")
    group.add_argument(
        "--activation-budget", type=int, default=None, metavar="MIB", dest="activation_budget_mib",
        help="most MiB of calibrated tensor values one run holds (fewer samples per run; same results; "
        "default 256 on the CPU, none on a GPU; 0: no limit)",
    )
    group.add_argument("--num-bins", type=int, default=None, metavar="N", help="histogram bins per tensor")
    group.add_argument(
        "--processes", type=int, default=None, metavar="N",
        help="CPU processes collecting the statistics on slices of a local .arrow/.npy batch, merged exactly "
        "(same bytes as 1); 0: one per 2 cores, at most 8. Each holds its own ONNX Runtime session (~2 GB)",
    )
    group.add_argument(
        "--percentile", type=float, default=None, metavar="P", help="percentile for --algorithm percentile (0-100]"
    )
    group.add_argument(
        "--tensors", default=None, metavar="WHICH",
        help="'all' floating activations, 'quantizable' op inputs, or a comma-separated list of tensor names",
    )
    group.add_argument(
        "--on-nonfinite", choices=choices(Nonfinite), default=None, dest="nonfinite",
        help="NaN/Inf activations: fail naming the tensor, or skip those values",
    )
    group.add_argument(
        "--allow-empty", action="store_true", default=None,
        help="accept a Q/DQ export that quantizes nothing (otherwise an error naming why)",
    )
    group.add_argument(
        "--smooth", choices=choices(SmoothMode), default=None,
        help="SmoothQuant-style smoothing of normalisation outputs read by MatMuls (BERT-class encoders): auto "
        "smooths only models with that pattern, on requires it, off never; a smoothed run also writes "
        "model.smoothed.onnx, the model its caches and Q/DQ model belong to",
    )
    group.add_argument(
        "--smooth-alpha", type=float, default=None, metavar="A", help="smoothing migration strength in [0, 1]"
    )
    group.add_argument(
        "--manual-ranges", default=None, metavar="FILE.json",
        help="JSON object tensor -> amax overriding (or adding to) the calibrated ranges",
    )


def config_from_args(args: argparse.Namespace) -> Any:
    """A CalibrationConfig with only the options given on the command line set."""
    from trtcal.config import CalibrationConfig

    values: dict[str, Any] = {}
    if args.algorithms:
        values["algorithms"] = tuple(args.algorithms)
    for option in ("trt_version", "micro_batch", "activation_budget_mib", "num_bins", "nonfinite", "processes", "allow_empty", "min_sqnr", "verdict",
                   "smooth", "smooth_alpha"):
        value = getattr(args, option, None)
        if value is not None:
            values[option] = value
    if args.tensors is not None:
        values["tensors"] = args.tensors if args.tensors in choices(TensorSelection) else tuple(
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


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset, Ray and store options of `trtcal calibrate` (fields of JobConfig)."""
    data = parser.add_argument_group("dataset and preprocessing")
    data.add_argument("--num-samples", default=None, metavar="N|all", help="samples drawn from the dataset")
    data.add_argument("--seed", type=int, default=None, help="seeds the sample draw")
    data.add_argument("--preprocess", default=None, metavar="P",
                      help="imagenet, efficientnet-lite, raw, or package.module:function")
    data.add_argument("--input-name", default=None, metavar="NAME",
                      help="the model input the dataset feeds (default: the model's only input); part of the batch key")
    data.add_argument("--stratify", action="store_true", default=None, help="draw evenly per class folder")
    data.add_argument("--on-bad-input", choices=choices(OnBadInput), default=None,
                      help="corrupt/unreadable inputs: fail listing them, or skip and report them")
    from trtcal.cli.cmd_batch import add_input_options

    add_input_options(data)
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--address", default=None, help="Ray address (absent: an embedded local Ray; auto; ray://…)")
    cluster.add_argument("--workers", type=int, default=None, help="preprocessing tasks in flight (default: cluster CPUs)")
    cluster.add_argument("--backend", choices=choices(Backend), default=None,
                         help="FP32 statistics by ONNX Runtime (default), or TensorRT 10's own calibrator on a GPU")
    cluster.add_argument("--device", choices=choices(ActorDevice), default=None,
                         help="where the calibration actor runs (auto: GPU when the cluster has one)")
    store = parser.add_argument_group("store")
    store.add_argument("--store", default=None, metavar="URL", help="cache store ($TRTCAL_CACHE_DIR/store when set)")
    store.add_argument("--read-from", action="append", default=None, metavar="URL",
                       help="other stores searched (read-only) before computing; repeat")
    store.add_argument("--namespace", default=None, help="store namespace (e.g. your team)")
    store.add_argument("--read-only", action="store_true", default=None, help="never write to the store")
    store.add_argument("--on-corrupt", choices=("fail", "recompute"), default=None,
                       help="a stored entry that fails verification: stop with an error (default), or recompute and replace it")
    add_storage_option(store, what="the store and the dataset")
    store.add_argument("--no-qdq", action="store_true", default=None, help="do not export the Q/DQ ONNX model")


def job_config_from_args(args: argparse.Namespace) -> Any:
    """A JobConfig with only the options given on the command line set."""
    from trtcal.cli.cmd_batch import batch_config_from_args
    from trtcal.config import ClusterConfig, JobConfig, StoreSettings

    def given(*names: str, **renamed: str) -> dict[str, Any]:
        pairs = [(n, n) for n in names] + list(renamed.items())
        return {field: getattr(args, option) for field, option in pairs if getattr(args, option, None) is not None}

    values: dict[str, Any] = given("output", "backend", "force")
    if args.storage_option:
        values["storage_options"] = parse_storage_options(args.storage_option)
    if args.no_qdq:
        values["export_qdq"] = False
    return JobConfig(
        batch=batch_config_from_args(args),
        calibration=config_from_args(args),
        store=StoreSettings(**given("namespace", "read_only", "read_from", "on_corrupt", url="store")),
        cluster=ClusterConfig(**given("address", "device")),
        **values,
    )


# What the progress bars say for the library's stage names.
PROGRESS_LABELS = {
    "list dataset": "listing dataset",
    "start Ray": "starting Ray",
    "list": "listing",
    "preprocess": "preprocessing",
    "write": "writing batch",
    "store batch": "storing batch",
    "statistics": "pass 1: max |x|",
    "histograms": "pass 2: histograms",
    "smoothing": "smoothing: channel max",
    "search": "scale search",
    "auto": "auto search",
    "verdict": "quality verdict",
    "export": "Q/DQ export",
    "publish": "publishing",
}


class LabelledProgress:
    """Passes progress on under the labels the user reads (`PROGRESS_LABELS`).

    A stage without a total (search, publish, ...) becomes one step, so its bar shows 0/1 while it
    runs and 1/1 with its time when it ends, rather than an item counter that never moves.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.single_step: set[str] = set()

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        label = PROGRESS_LABELS.get(stage, stage)
        if total is None:
            self.single_step.add(label)
            total, unit = 1, unit or "step"
        self.inner.start(label, total, unit)

    def advance(self, stage: str, n: int = 1) -> None:
        label = PROGRESS_LABELS.get(stage, stage)
        if label not in self.single_step:
            self.inner.advance(label, n)

    def finish(self, stage: str) -> None:
        label = PROGRESS_LABELS.get(stage, stage)
        if label in self.single_step:
            self.single_step.discard(label)
            self.inner.advance(label, 1)
        self.inner.finish(label)


def json_only_stdout(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """With --json, stdout carries only the JSON: whatever Ray relays from workers and the raylet
    (worker prints, "(raylet) A worker died ...") goes to stderr meanwhile."""
    return contextlib.redirect_stdout(sys.stderr) if enabled else contextlib.nullcontext()


def _outcome(result: Any) -> str:
    if result.cache_hit:
        where = "" if not result.found_in or result.found_in == result.store_url else f" in read-from store {result.found_in}"
        return f"cache hit{where} (no preprocessing, no inference)"
    if not result.published:
        return "computed (read-only store: not published)"
    return "computed and published" + (" (batch reused from the store)" if result.batch_reused else "")


def _table(result: Any) -> str:
    rows = [
        ("result", _outcome(result)),
        ("tensors calibrated", str(result.num_tensors)),
        ("samples", str(result.num_samples)),
        ("methods", ", ".join(result.algorithms)),
        ("runner", result.runner),
        ("cache key", result.key),
        ("stored in", f"{result.found_in} ({result.entry_url})" if result.found_in else result.entry_url),
        ("artifacts", str(result.output_dir) if result.output_dir else "(store only; use --output DIR)"),
        ("files", ", ".join(result.artifacts)),
    ]
    stages = result.stage_seconds
    width = max(len(k) for k, _ in rows)
    where = f"artifacts in {result.output_dir}" if result.output_dir else f"stored as {result.key}"
    lines = [f"calibrated {result.num_tensors} tensors; {where}"]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    if stages:
        stage_width = max(len(k) for k in stages)
        lines.append("time per stage")
        lines += [f"  {name.ljust(stage_width)}  {seconds:8.2f} s" for name, seconds in stages.items()]
    if result.smoothing:
        lines.append(smoothing_line(result.smoothing, result.output_dir))
    if result.verdict:
        from trtcal.export.auto_calibration import verdict_lines

        lines += [line for line in verdict_lines(result.verdict) if not line.startswith("warning: ")]
    for w in result.warnings:
        lines.append(f"{'warning'.ljust(width)}  {w}")
    return "\n".join(lines)


def smoothing_line(smoothing: Any, output_dir: Any) -> str:
    """The one line that says which model the cache belongs to (a smoothed run)."""
    where = f"{output_dir}/{smoothing.get('model')}" if output_dir else f"{smoothing.get('model')} in the store entry"
    sites = smoothing.get("sites") or {}
    return (
        f"smoothed: calibration.cache and model.qdq.onnx belong to {where} (sha256 {str(smoothing.get('model_sha256'))[:12]}…; "
        f"{len(sites)} normalisation outputs smoothed, alpha {smoothing.get('alpha')}): build engines from it, not from MODEL"
    )


def run(args: argparse.Namespace) -> int:
    from trtcal.cli.progress import stage_progress
    from trtcal.orchestrator.job import calibrate_dataset

    bars = stage_progress(quiet=bool(getattr(args, "quiet", False)) or (args.json and sys.stderr.isatty()))
    try:
        config = job_config_from_args(args)
        with json_only_stdout(args.json):
            result = calibrate_dataset(args.model, args.data, config=config, progress=LabelledProgress(bars))
    except Exception as exc:
        if args.json:  # machines get the error on stdout too; the paragraph still goes to stderr
            from trtcal.cli import scrubber_for

            scrub = scrubber_for(args)  # the same masking as the paragraph on stderr
            error: dict[str, Any] = {"type": type(exc).__name__, "message": scrub(exc)}
            if not isinstance(exc, TrtcalError):  # a bug in trtcal: one line, like the paragraph
                error.update(message=scrub(" ".join(str(exc).split())), internal=True)
            json.dump({"error": error}, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
        raise
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    elif not getattr(args, "quiet", False):
        print(_table(result))
    return 0


def register(subparsers: Any) -> None:
    from trtcal.cli import add_common_flags

    parser = subparsers.add_parser(
        "calibrate",
        help="calibrate an ONNX model on a dataset or a batch; TensorRT caches, ranges and a Q/DQ model",
        description="Look the calibration up in the store; on a miss, preprocess the dataset on Ray workers "
        "into one Arrow batch, run the FP32 model over it in a calibration actor (two streaming passes), "
        "compute every requested method from the same histograms, publish the result to the store and copy "
        "the artifacts into --output.",
    )
    parser.add_argument("model", metavar="MODEL", help="ONNX model (path or fsspec URL)")
    parser.add_argument(
        "--data", required=True, metavar="URL",
        help="dataset: image folder/prefix (local or s3://), list file, Parquet, .npy/.npz; or a trtcal .arrow batch",
    )
    add_calibration_arguments(parser)
    add_job_arguments(parser)
    parser.add_argument("--output", "-o", default=None, metavar="DIR",
                        help="directory that receives the artifacts (only trtcal's own files there are replaced)")
    parser.add_argument("--force", action="store_true", default=None,
                        help="write into a non-empty --output that holds no earlier trtcal output")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_common_flags(parser)
    _show_defaults(parser)
    parser.set_defaults(func=run)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    import inspect

    from trtcal.cli._options import show_config_defaults
    from trtcal.config import BatchConfig, CalibrationConfig, ClusterConfig, StoreSettings, default_store_url
    from trtcal.core.scales import amax_percentile

    percentile = inspect.signature(amax_percentile).parameters["percentile"].default
    show_config_defaults(
        parser, ClusterConfig(), StoreSettings(), BatchConfig(), CalibrationConfig(),  # first one holding a name wins
        extra={"url": default_store_url(), "percentile": percentile, "input_name": None},
    )
