"""`trtcal jobs status|logs|stop|list [JOB] --address http://HEAD:8265`

Exit code mirrors the job: 0 SUCCEEDED (or still PENDING/RUNNING), 1 FAILED, 3 STOPPED.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from trtcal.cli.cmd_submit import add_connection_args, quiet_ray_client, stream_to


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "jobs",
        help="status, logs or stop of a Ray job (see `trtcal submit`)",
        description="Inspect or stop Ray jobs submitted with `trtcal submit`.",
    )
    common = argparse.ArgumentParser(add_help=False)
    add_connection_args(common)
    common.add_argument("--json", action="store_true", default=None, help="machine-readable output")
    actions = parser.add_subparsers(dest="jobs_action", metavar="ACTION")
    actions.required = True

    status = actions.add_parser("status", parents=[common], help="the job's status")
    status.add_argument("job_id", metavar="JOB")
    status.set_defaults(func=run_status)

    logs = actions.add_parser("logs", parents=[common], help="the job's logs (--follow: until it ends)")
    logs.add_argument("job_id", metavar="JOB")
    logs.add_argument(
        "--follow",
        action="store_true",
        default=None,
        help="keep streaming until the job ends (Ctrl-C detaches, the job keeps running)",
    )
    logs.set_defaults(func=run_logs)

    stop = actions.add_parser("stop", parents=[common], help="stop the job; nothing half-published remains")
    stop.add_argument("job_id", metavar="JOB")
    stop.add_argument(
        "--no-wait", action="store_true", default=None, help="return without waiting for it to end"
    )
    stop.set_defaults(func=run_stop)

    listing = actions.add_parser("list", parents=[common], help="every job the cluster remembers")
    listing.set_defaults(func=run_list)


def _print_info(info: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info.to_dict(), indent=2, sort_keys=True))
        return
    code = f" (driver exit code {info.driver_exit_code})" if info.driver_exit_code not in (None, 0) else ""
    print(f"{info.job_id}\t{info.status}{code}\t{info.message}")


def run_status(args: argparse.Namespace) -> int:
    from trtcal.orchestrator import jobs

    info = jobs.job_status(args.address, args.job_id, token_file=args.token_file)
    _print_info(info, bool(args.json))
    return jobs.exit_code_for(info.status)


def run_logs(args: argparse.Namespace) -> int:
    from trtcal.orchestrator import jobs

    quiet_ray_client(args)
    as_json = bool(args.json)
    chunks: list[str] = []
    sink = chunks.append if as_json else stream_to(sys.stdout)
    try:
        info = jobs.job_logs(
            args.address, args.job_id, follow=bool(args.follow), log_sink=sink, token_file=args.token_file
        )
    except KeyboardInterrupt:
        print(
            f"trtcal: stopped following; job {args.job_id} keeps running (stop it with `trtcal jobs stop {args.job_id}`)",
            file=sys.stderr,
        )
        return 130
    if as_json:
        print(json.dumps({**info.to_dict(), "logs": "".join(chunks)}, indent=2, sort_keys=True))
    return jobs.exit_code_for(info.status)


def run_stop(args: argparse.Namespace) -> int:
    from trtcal.orchestrator import jobs

    info = jobs.stop_job(args.address, args.job_id, wait=not args.no_wait, token_file=args.token_file)
    _print_info(info, bool(args.json))
    if not args.json and info.status == "STOPPED":
        print(
            "trtcal: stopped. Nothing half-published remains: store entries are published by one atomic commit.",
            file=sys.stderr,
        )
    return jobs.exit_code_for(info.status)


def run_list(args: argparse.Namespace) -> int:
    from trtcal.orchestrator import jobs

    infos = jobs.list_jobs(args.address, token_file=args.token_file)
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2, sort_keys=True))
    else:
        for info in infos:
            print(f"{info.job_id}\t{info.status}\t{info.entrypoint}")
    return 0
