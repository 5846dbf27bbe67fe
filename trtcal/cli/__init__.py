"""The `trtcal` command line.

Each subcommand lives in its own module `trtcal/cli/cmd_<name>.py` that defines
`register(subparsers) -> None`; the parser it adds sets `func=<callable(args) -> int>`.
Options default to None so the config dataclasses stay the only source of defaults.

Exit status of `trtcal COMMAND`:

    0    success
    1    the command's own "no" (`cache verify` found corrupt entries; `submit`/`jobs`: the job FAILED)
    2    an error the user can act on (a TrtcalError: one paragraph on stderr), or a usage error (argparse)
    3    `submit`/`jobs`: the job was STOPPED
    70   internal error: any other exception, i.e. a bug in trtcal (EX_SOFTWARE of sysexits.h)
    130  interrupted (Ctrl-C)
    141  stdout was closed by its reader (`trtcal cache ls | head`); nothing is printed

Errors are one paragraph on stderr, with credentials masked; -v adds the traceback (masked too).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import traceback
from collections.abc import Callable, Sequence

from trtcal._secrets import SECRET_ENV
from trtcal._version import __version__
from trtcal.errors import TrtcalError

log = logging.getLogger("trtcal")

EXIT_ERROR = 2
EXIT_INTERNAL_ERROR = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader closed


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
    level = logging.ERROR if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    secret_filter = _SecretFilter([os.environ[k] for k in SECRET_ENV if os.environ.get(k)])
    for handler in logging.getLogger().handlers:
        handler.addFilter(secret_filter)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 3 else logging.WARNING)


def scrubber_for(args: argparse.Namespace) -> Callable[[object], str]:
    """A function masking every credential this command may know: environment, `--storage-option`,
    the Ray token; and passwords in URLs. Never raises: the error path must not hide the error."""
    env_secrets = sorted({os.environ[k] for k in SECRET_ENV if len(os.environ.get(k, "")) >= 4}, key=len, reverse=True)
    try:
        from trtcal._secrets import Scrubber

        return Scrubber(set(env_secrets) | _command_secrets(args))
    except Exception:

        def mask(text: object) -> str:
            out = str(text)
            for secret in env_secrets:
                out = out.replace(secret, "***")
            return out

        return mask


def _command_secrets(args: argparse.Namespace) -> set[str]:
    from trtcal._secrets import secret_values
    from trtcal.cli._options import storage_option_secrets

    secrets = secret_values({})  # the AWS/GCS/Azure credential variables
    for dest in ("storage_option", "storage_options"):
        value = getattr(args, dest, None)
        if isinstance(value, list):
            secrets |= storage_option_secrets(value)
    if hasattr(args, "token_file"):  # submit/jobs: the token they send
        try:
            from trtcal.orchestrator.jobs import resolve_token

            token = resolve_token(token_file=args.token_file)
        except Exception:  # best effort: an unreadable token file cannot leak either
            token = None
        if token and len(token) >= 4:
            secrets.add(token)
    return secrets


def _print_traceback(exc: BaseException, scrub: Callable[[object], str]) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    print(scrub(text).rstrip("\n"), file=sys.stderr)


def _internal_error(exc: Exception, args: argparse.Namespace, verbose: int) -> int:
    """One paragraph for a bug in trtcal (any exception that is not a TrtcalError); the traceback with -v."""
    scrub = scrubber_for(args)
    if verbose:
        _print_traceback(exc, scrub)
    message = " ".join(str(exc).split())
    what = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    hint = "report it with the traceback above" if verbose else "rerun with -v for the traceback and report it"
    print(scrub(f"trtcal: internal error: {what} (this is a bug in trtcal; {hint})"), file=sys.stderr)
    return EXIT_INTERNAL_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status is the command's own, or one of EXIT_ERROR,
    EXIT_INTERNAL_ERROR and EXIT_INTERRUPTED (see the table at the top of this module)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Subcommands may define their own -v/-q; fold them in.
    verbose = int(getattr(args, "verbose", 0) or 0)
    quiet = bool(getattr(args, "quiet", False))
    configure_logging(verbose, quiet)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe surfaces here, inside the handlers below
    except TrtcalError as exc:  # its message was written for users (and scrubbed); mask again anyway
        scrub = scrubber_for(args)
        if verbose:
            _print_traceback(exc, scrub)
        print(scrub(f"trtcal: error: {exc}"), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("trtcal: interrupted; nothing half-written was published", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`trtcal cache ls | head`): not an error. Point stdout at devnull so
        # the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        return _internal_error(exc, args, verbose)
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
