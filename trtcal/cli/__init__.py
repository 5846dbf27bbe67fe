"""The `trtcal` command line.

Each subcommand lives in its own module `trtcal/cli/cmd_<name>.py` that defines
`register(subparsers) -> None`; the parser it adds sets `func=<callable(args) -> int>`.
Options default to None so the config dataclasses stay the only source of defaults.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from trtcal._version import __version__
from trtcal.errors import TrtcalError

log = logging.getLogger("trtcal")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trtcal",
        description="Deterministic, cluster-scale INT8 calibration for TensorRT.",
    )
    parser.add_argument("--version", action="version", version=f"trtcal {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging; -v shows tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import trtcal.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            module = importlib.import_module(f"trtcal.cli.{info.name}")
            module.register(sub)
    return parser


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """-v/-q/--json on a subcommand too (`trtcal calibrate … -v`); SUPPRESS keeps the global value."""
    parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging; -v shows tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors")


# Third-party loggers that print request headers (botocore: the access key id) at DEBUG.
_NOISY_LOGGERS = ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "aiohttp", "asyncio", "ray")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")


class _SecretFilter(logging.Filter):
    """Masks credential values from the environment in every log line (defence in depth)."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(s in message for s in self.secrets):
                for s in self.secrets:
                    message = message.replace(s, "***")
                record.msg, record.args = message, None
        return True


def configure_logging(verbose: int, quiet: bool) -> None:
    import os

    level = logging.ERROR if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    secret_filter = _SecretFilter([os.environ[k] for k in _SECRET_ENV if os.environ.get(k)])
    for handler in logging.getLogger().handlers:
        handler.addFilter(secret_filter)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 3 else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Subcommands may define their own -v/-q; fold them in.
    verbose = int(getattr(args, "verbose", 0) or 0)
    quiet = bool(getattr(args, "quiet", False))
    configure_logging(verbose, quiet)
    try:
        rc = args.func(args)
    except TrtcalError as exc:
        if verbose:
            log.exception("failed")
        print(f"trtcal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trtcal: interrupted; nothing half-written was published", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
