"""`trtcal submit --address http://HEAD:8265 [options] -- calibrate MODEL --data URL …`

Runs a trtcal command on a Ray cluster as a Ray job, streams its logs and exits with its status:
0 SUCCEEDED, 1 FAILED, 3 STOPPED (2: trtcal could not submit, e.g. bad address or auth token).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

EPILOG = """\
examples:
  trtcal submit --address http://head:8265 -- calibrate s3://models/resnet50.onnx \\
      --data s3://datasets/imagenet/train/ --store s3://calib-cache/ --address auto
  trtcal submit --address http://head:8265 --runtime-env env.yaml --no-follow -- calibrate …

authentication: clusters with Ray token auth need their token: --token-file FILE, or RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token. It is sent as an Authorization header and never printed.

Ctrl-C while following stops the job. Nothing half-published remains: a calibration publishes its
store entry with one atomic create-only commit, so a stopped job leaves either nothing or a complete
entry. Use --no-follow to leave the job running, and `trtcal jobs logs JOB --follow` to watch it.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="run a trtcal command on a Ray cluster (Ray Jobs)",
        description="Run a trtcal command on a Ray cluster as a Ray job, stream its logs, exit with its status.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_args(parser)
    parser.add_argument(
        "--working-dir", default=None, metavar="DIR", help="local directory uploaded as the job's working dir"
    )
    parser.add_argument(
        "--runtime-env",
        default=None,
        metavar="FILE",
        help="Ray runtime env (YAML or JSON): pip, env_vars, working_dir, …",
    )
    parser.add_argument(
        "--launcher",
        default=None,
        metavar="CMD",
        help="how the head starts trtcal (default: 'python -m trtcal'; e.g. 'trtcal' or '/opt/venv/bin/python -m trtcal')",
    )
    parser.add_argument(
        "--submission-id", default=None, metavar="ID", help="job id to use (default: Ray picks one)"
    )
    parser.add_argument(
        "--no-follow", action="store_true", default=None, help="submit, print the job id and return"
    )
    parser.add_argument(
        "--json", action="store_true", default=None, help="print the result as JSON (logs go to stderr)"
    )
    parser.add_argument(
        "job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND …", help="the trtcal command to run"
    )
    parser.set_defaults(func=run)


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        metavar="URL",
        help="the head's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS if a URL)",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="file holding the cluster's Ray auth token (see below)",
    )


def quiet_ray_client(args: argparse.Namespace) -> None:
    """Ray's job client logs at INFO on its own handler ("WebSocket closed …"); show that only with -v."""
    if getattr(args, "verbose", 0):
        return
    try:  # the module sets its logger to INFO when imported: import it first, then lower it
        import ray.dashboard.modules.job.sdk as sdk
    except ImportError:
        return
    sdk.logger.setLevel(logging.WARNING)


def stream_to(stream: Any) -> Any:
    def sink(chunk: str) -> None:
        stream.write(chunk)
        stream.flush()

    return sink


def run(args: argparse.Namespace) -> int:
    from trtcal.orchestrator import jobs

    quiet_ray_client(args)
    command = list(args.job_command or [])
    if command and command[0] == "--":
        command = command[1:]
    runtime_env = jobs.load_runtime_env(args.runtime_env) if args.runtime_env else None
    as_json = bool(args.json)
    follow = not args.no_follow
    entrypoint_kwargs: dict[str, Any] = {}
    if args.launcher:
        entrypoint_kwargs["launcher"] = args.launcher
    parsed = job_storage_options(command)
    if parsed:
        entrypoint_kwargs["parsed_options"] = parsed
    result = jobs.submit_job(
        args.address,
        command,
        working_dir=args.working_dir,
        runtime_env=runtime_env,
        submission_id=args.submission_id,
        token_file=args.token_file,
        follow=follow,
        log_sink=stream_to(sys.stderr if as_json else sys.stdout),
        **entrypoint_kwargs,
    )
    if as_json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    elif not follow:
        print(result.job_id)
        print(
            f"trtcal: submitted job {result.job_id} to {result.address} ({result.status}); "
            f"follow it with: trtcal jobs logs {result.job_id} --follow --address {result.address}",
            file=sys.stderr,
        )
    else:
        print(describe_result(result), file=sys.stderr)
    return result.exit_code


def job_storage_options(command: Sequence[str]) -> dict[str, Any] | None:
    """The storage options of the job command as trtcal's own parser reads it (abbreviated flags such as
    `--storage-opt` resolved, JSON values decoded), so credentials are found however they were spelled.
    None when the command does not parse here (the head's trtcal may differ; the word scan of
    `jobs.refuse_credentials` still applies)."""
    from trtcal.cli import build_parser
    from trtcal.cli._options import parse_storage_options
    from trtcal.errors import ConfigError

    words = list(command)
    if words[:1] == ["trtcal"]:
        words = words[1:]
    try:  # argparse prints its usage errors and exits: keep both to ourselves (they may echo a value)
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            parsed = build_parser().parse_args(words)
    except SystemExit:
        return None
    options: dict[str, Any] = {}
    for dest in ("storage_option", "storage_options"):
        items = getattr(parsed, dest, None)
        if isinstance(items, list):
            try:
                options.update(parse_storage_options(items))
            except ConfigError:
                return None
    return options


def describe_result(result: Any) -> str:
    if result.interrupted:
        if result.status == "STOPPED":
            return (
                f"trtcal: interrupted: stopped job {result.job_id} on {result.address}. Nothing half-published "
                "remains: a calibration publishes its store entry with one atomic create-only commit. Run the "
                "same command again to finish it (finished work is reused from the store)."
            )
        return (
            f"trtcal: interrupted: asked job {result.job_id} to stop; it is {result.status} "
            f"({result.message}). Check it with: trtcal jobs status {result.job_id} --address {result.address}"
        )
    code = f", driver exit code {result.driver_exit_code}" if result.driver_exit_code not in (None, 0) else ""
    return f"trtcal: job {result.job_id} {result.status}{code}: {result.message}"
