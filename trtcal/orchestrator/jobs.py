"""Ray Jobs adapter: run a `trtcal` command on a Ray cluster and follow it.

    submit_job(address, ["calibrate", "model.onnx", "--data", "s3://…"], log_sink=print) -> JobResult
    job_status(address, job_id) -> JobInfo      job_logs(address, job_id) -> str
    stop_job(address, job_id) -> bool            list_jobs(address) -> list[JobInfo]

Everything goes through Ray's `JobSubmissionClient` (HTTP to the head's dashboard, port 8265), imported
lazily. Clusters with Ray token authentication (on by default for new Ray clusters since 2.52) get an
`Authorization: Bearer <token>` header built from, in order: the `token` argument, `token_file`,
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. The token is never logged, printed or put in an
error message.

The job runs `<launcher> <args…>` on the head, `python -m trtcal` by default: on a cluster the interpreter
and trtcal come from the image or the runtime env. A job that is stopped midway publishes nothing half
written, because the calibration publishes its store entry with one create-only commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtcal._secrets import credential_options, credential_words, is_credential_name
from trtcal.errors import BackendUnavailableError, ConfigError, TrtcalError

__all__ = [
    "DEFAULT_LAUNCHER",
    "EXIT_CODES",
    "JobInfo",
    "JobResult",
    "build_entrypoint",
    "exit_code_for",
    "job_logs",
    "job_status",
    "list_jobs",
    "load_runtime_env",
    "resolve_address",
    "resolve_token",
    "stop_job",
    "submit_job",
]

log = logging.getLogger(__name__)

DEFAULT_LAUNCHER: tuple[str, ...] = ("python", "-m", "trtcal")
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Exit code of `trtcal submit` / `trtcal jobs` for each job status (PENDING/RUNNING: the query worked).
EXIT_CODES: Mapping[str, int] = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3, "PENDING": 0, "RUNNING": 0}

_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_ENV_LOCK = threading.Lock()

LogSink = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class JobInfo:
    """What the cluster knows about one job."""

    job_id: str
    status: str
    entrypoint: str = ""
    message: str = ""
    driver_exit_code: int | None = None
    start_time_ms: int | None = None
    end_time_ms: int | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status,
            "entrypoint": self.entrypoint,
            "message": self.message,
            "driver_exit_code": self.driver_exit_code,
            "start_time_ms": self.start_time_ms,
            "end_time_ms": self.end_time_ms,
        }


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """Outcome of `submit_job`: the final status when followed, else the status right after submission."""

    job_id: str
    address: str
    entrypoint: str
    status: str
    message: str = ""
    driver_exit_code: int | None = None
    followed: bool = True
    interrupted: bool = False  # Ctrl-C while following: the job was asked to stop

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.status)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "address": self.address,
            "entrypoint": self.entrypoint,
            "status": self.status,
            "message": self.message,
            "driver_exit_code": self.driver_exit_code,
            "followed": self.followed,
            "interrupted": self.interrupted,
            "exit_code": self.exit_code,
        }


def exit_code_for(status: str) -> int:
    """CLI exit code for a job status: 0 SUCCEEDED (or not finished), 1 FAILED, 3 STOPPED."""
    return EXIT_CODES.get(status, 1)


# --------------------------------------------------------------------------- pure helpers


def build_entrypoint(entrypoint_args: Sequence[str], launcher: Sequence[str] | str = DEFAULT_LAUNCHER) -> str:
    """The shell command the job runs: `launcher` then the trtcal arguments, each quoted for the shell.

    `entrypoint_args` is a trtcal command line without the program name (`["calibrate", "m.onnx", …]`);
    a leading `--` or `trtcal` is dropped. `launcher` is how the head starts trtcal: a sequence of words,
    or one string split like a shell would (`"/opt/venv/bin/python -m trtcal"`, `"trtcal"`).
    """
    args = list(entrypoint_args)
    if args and args[0] == "--":
        args = args[1:]
    if args and args[0] == "trtcal":
        args = args[1:]
    if not args:
        raise ConfigError(
            "entrypoint_args: give the trtcal command to run on the cluster, e.g. `-- calibrate MODEL --data URL`"
        )
    if args[0].startswith("-"):
        raise ConfigError(
            f"entrypoint_args: must start with a trtcal subcommand such as `calibrate`, got {args[0]!r}"
        )
    words = shlex.split(launcher) if isinstance(launcher, str) else list(launcher)
    if not words or any(not w for w in words):
        raise ConfigError(
            f"launcher: must name a command (e.g. 'python -m trtcal' or 'trtcal'), got {launcher!r}"
        )
    return shlex.join([*words, *args])


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The dashboard URL to talk to: `address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS when they hold a URL."""
    env = os.environ if environ is None else environ
    if not address:
        for name in _ADDRESS_ENV:
            value = env.get(name, "")
            if value.startswith(("http://", "https://")):
                address = value
                break
    if not address:
        raise ConfigError(
            "address: no Ray cluster given; pass --address http://HEAD:8265 (the head's dashboard) "
            "or set RAY_API_SERVER_ADDRESS"
        )
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ConfigError(
            f"address: {address!r} is not a Ray dashboard URL; Ray Jobs needs the head's dashboard, "
            "e.g. http://HEAD:8265 (not ray:// or the GCS port 6379)"
        )
    return address.rstrip("/")


def resolve_token(
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    home: str | os.PathLike[str] | None = None,
) -> str | None:
    """The Ray auth token to send, or None when none is configured (the cluster may not need one).

    Order: `token`, `token_file`, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, `~/.ray/auth_token`.
    An explicitly named file that cannot be read is an error; the default file is optional.
    """
    env = os.environ if environ is None else environ
    if token:
        return token.strip()
    if token_file:
        return _read_token_file(Path(token_file), "token_file")
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    if env.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token_file(Path(env["RAY_AUTH_TOKEN_PATH"]), "RAY_AUTH_TOKEN_PATH")
    default = Path(home if home is not None else Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        return _read_token_file(default, "~/.ray/auth_token")
    return None


def _read_token_file(path: Path, source: str) -> str:
    path = path.expanduser()
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"{source}: cannot read the Ray auth token file {path}: {exc.strerror or exc}"
        ) from None
    if not text:
        raise ConfigError(f"{source}: the Ray auth token file {path} is empty")
    return text


def load_runtime_env(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A Ray runtime env from a YAML (.yaml/.yml) or JSON file; must be a mapping."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"runtime_env: cannot read {file}: {exc.strerror or exc}") from None
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: both name line and column
        raise ConfigError(
            f"runtime_env: {file} is not valid {'YAML' if file.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {exc}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"runtime_env: {file} must hold a mapping (pip, env_vars, working_dir, …), got {type(data).__name__}"
        )
    return data


def merged_runtime_env(
    runtime_env: Mapping[str, Any] | None, working_dir: str | os.PathLike[str] | None
) -> dict[str, Any] | None:
    """`runtime_env` with `working_dir` set; a local working dir must exist (Ray uploads it)."""
    env = dict(runtime_env or {})
    if working_dir is not None:
        text = os.fspath(working_dir)
        if "://" not in text and not Path(text).is_dir():
            raise ConfigError(
                f"working_dir: {text} is not a directory (Ray uploads a local directory, or give a remote URI)"
            )
        if "working_dir" in env and env["working_dir"] != text:
            raise ConfigError(
                f"working_dir: given both as {text!r} and in the runtime env as {env['working_dir']!r}; keep one"
            )
        env["working_dir"] = text
    return env or None


# --------------------------------------------------------------------------- Ray adapter


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    # JobSubmissionClient silently prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over its `address`
    # argument (inside a Ray job RAY_ADDRESS is always set); hide them while it resolves the address.
    with _ENV_LOCK:
        saved = {name: os.environ.pop(name) for name in _ADDRESS_ENV if name in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def _client(
    address: str,
    token: str | None,
    token_file: str | os.PathLike[str] | None,
    headers: Mapping[str, str] | None,
) -> Any:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # pragma: no cover - ray[default] is a dependency
        raise BackendUnavailableError(
            f"Ray Jobs needs `ray[default]`: pip install 'ray[default]' ({exc})"
        ) from None
    url = resolve_address(address)
    all_headers = dict(headers or {})
    if not any(k.lower() == "authorization" for k in all_headers):
        secret = resolve_token(token, token_file)
        if secret:
            all_headers["Authorization"] = f"Bearer {secret}"
    with _explicit_address(), _translate_errors(url, "connect"):
        return JobSubmissionClient(url, headers=all_headers or None)


@contextlib.contextmanager
def _translate_errors(address: str, action: str, job_id: str = "") -> Iterator[None]:
    """Ray/requests failures as trtcal errors that say what to do (never echoing a token)."""
    try:
        yield
    except TrtcalError:
        raise
    except Exception as exc:
        raise _as_trtcal_error(exc, address, action, job_id) from exc


def _as_trtcal_error(exc: BaseException, address: str, action: str, job_id: str) -> TrtcalError:
    name = type(exc).__name__
    text = str(exc)
    if name == "AuthenticationError":
        rejected = "invalid" in text.lower() or "Forbidden" in text
        return ConfigError(
            f"Ray cluster at {address} {'rejected the auth token' if rejected else 'requires token authentication'}. "
            "Give its token with --token-file FILE, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, or put it in "
            "~/.ray/auth_token (on the head: `ray get-auth-token`; on KubeRay: the cluster's auth Secret)."
        )
    if isinstance(exc, ConnectionError) or name in (
        "ConnectionError",
        "ConnectTimeout",
        "ReadTimeout",
        "ClientConnectorError",
    ):
        return BackendUnavailableError(
            f"cannot reach the Ray dashboard at {address} ({action}): is the head running and is the address "
            "its dashboard (port 8265 by default)?"
        )
    if job_id and "status code 404" in text:
        return ConfigError(
            f"job: no job {job_id!r} on the Ray cluster at {address} (list them with `trtcal jobs list`)"
        )
    return BackendUnavailableError(
        f"Ray Jobs request to {address} failed ({action}{' ' + job_id if job_id else ''}): {text}"
    )


def _info(details: Any) -> JobInfo:
    status = getattr(details, "status", "")
    return JobInfo(
        job_id=str(getattr(details, "submission_id", None) or getattr(details, "job_id", "")),
        status=str(getattr(status, "value", status)),
        entrypoint=str(getattr(details, "entrypoint", "") or ""),
        message=str(getattr(details, "message", "") or ""),
        driver_exit_code=getattr(details, "driver_exit_code", None),
        start_time_ms=getattr(details, "start_time", None),
        end_time_ms=getattr(details, "end_time", None),
    )


def _get_info(client: Any, address: str, job_id: str) -> JobInfo:
    with _translate_errors(address, "status", job_id):
        return _info(client.get_job_info(job_id))


def _wait_terminal(
    client: Any, address: str, job_id: str, *, timeout_s: float | None, poll_s: float
) -> JobInfo:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = _get_info(client, address, job_id)
        if info.is_terminal or (deadline is not None and time.monotonic() >= deadline):
            return info
        time.sleep(poll_s)


def _follow_logs(client: Any, address: str, job_id: str, sink: LogSink | None, poll_s: float) -> None:
    """Stream the job's logs to `sink` until it ends: the websocket tail, else polling get_job_logs."""
    sent = 0

    async def tail() -> None:
        nonlocal sent
        async for chunk in client.tail_job_logs(job_id):
            sent += len(chunk)
            if sink is not None and chunk:
                sink(chunk)

    try:
        with _translate_errors(address, "logs", job_id):
            asyncio.run(tail())
        return
    except (ConfigError, KeyboardInterrupt):
        raise
    except TrtcalError as exc:
        # A proxy that drops websockets, or a dropped connection: carry on by polling the full log.
        log.info("log stream for %s broke (%s); polling instead", job_id, exc)
    while True:
        info = _get_info(client, address, job_id)
        with _translate_errors(address, "logs", job_id):
            text = client.get_job_logs(job_id)
        if len(text) > sent and sink is not None:
            sink(text[sent:])
        sent = max(sent, len(text))
        if info.is_terminal:
            return
        time.sleep(poll_s)


# --------------------------------------------------------------------------- public API


_CREDENTIAL_ADVICE = (
    "Ray keeps a job's entrypoint and runtime env as job metadata, listed to anyone who can list jobs. "
    "Give credentials to the cluster's environment instead (AWS_* variables on the head and workers, an "
    "instance role or a Kubernetes Secret); nothing was submitted"
)


def refuse_credentials(
    entrypoint_args: Sequence[str],
    runtime_env: Mapping[str, Any] | None,
    parsed_options: Mapping[str, Any] | None = None,
) -> None:
    """Credentials must not travel as job metadata (Ray keeps entrypoints and runtime envs for anyone to list).

    Raises ConfigError naming (never showing) each credential found: in `parsed_options` (the job
    command's storage options as trtcal's parser read them, JSON values decoded: `trtcal submit` passes
    them), in any `NAME=VALUE` word of the command whatever the flag's spelling (`--stor`,
    `--storage-opt=…`, JSON `client_kwargs`), and in credential-named runtime env variables.
    """
    found = credential_options(parsed_options or {}) + credential_words(entrypoint_args)
    if found:
        names = ", ".join(dict.fromkeys(found))
        raise ConfigError(f"the job command holds credentials ({names}). {_CREDENTIAL_ADVICE}")
    env_vars = dict((runtime_env or {}).get("env_vars") or {})
    leaked = sorted(k for k in env_vars if is_credential_name(str(k)))
    if leaked:
        raise ConfigError(f"runtime env variables {leaked} look like credentials. {_CREDENTIAL_ADVICE}")


def submit_job(
    address: str | None,
    entrypoint_args: Sequence[str],
    *,
    launcher: Sequence[str] | str = DEFAULT_LAUNCHER,
    working_dir: str | os.PathLike[str] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    submission_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    headers: Mapping[str, str] | None = None,
    follow: bool = True,
    log_sink: LogSink | None = None,
    poll_interval_s: float = 1.0,
    stop_timeout_s: float = 60.0,
    parsed_options: Mapping[str, Any] | None = None,
) -> JobResult:
    """Submit `trtcal <entrypoint_args…>` as a Ray job and, when `follow`, stream its logs until it ends.

    Args:
        address: the head's dashboard URL (http://HEAD:8265); None reads RAY_API_SERVER_ADDRESS/RAY_ADDRESS.
        entrypoint_args: the trtcal command line to run, without `trtcal` (e.g. `["calibrate", …]`).
        launcher: how the head starts trtcal; see `build_entrypoint`.
        working_dir, runtime_env: Ray runtime env (working_dir is uploaded when local).
        token, token_file, headers: authentication; see `resolve_token`.
        follow: wait for the job and stream its logs to `log_sink` (chunks of text, as they come).
        stop_timeout_s: after Ctrl-C, how long to wait for the stopped job to reach a final status.
        parsed_options: the command's storage options as trtcal's parser reads them (see `refuse_credentials`).

    Returns:
        JobResult; `exit_code` is 0 SUCCEEDED, 1 FAILED, 3 STOPPED. Ctrl-C while following stops the
        job (`interrupted=True`) instead of leaving it running unwatched.

    Raises:
        ConfigError: bad arguments, an unknown job, or missing/rejected auth token.
        BackendUnavailableError: the cluster cannot be reached or refused the request.
    """
    if poll_interval_s <= 0:
        raise ConfigError(f"poll_interval_s: must be > 0, got {poll_interval_s}")
    if stop_timeout_s < 0:
        raise ConfigError(f"stop_timeout_s: must be >= 0, got {stop_timeout_s}")
    refuse_credentials(entrypoint_args, runtime_env, parsed_options)
    entrypoint = build_entrypoint(entrypoint_args, launcher)
    env = merged_runtime_env(runtime_env, working_dir)
    url = resolve_address(address)
    client = _client(url, token, token_file, headers)
    with _translate_errors(url, "submit"):
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=env,
            submission_id=submission_id,
            metadata=dict(metadata) if metadata else None,
        )
    log.info("submitted job %s to %s: %s", job_id, url, entrypoint)
    if not follow:
        info = _get_info(client, url, job_id)
        return JobResult(
            job_id=job_id,
            address=url,
            entrypoint=entrypoint,
            status=info.status,
            message=info.message,
            followed=False,
        )
    try:
        _follow_logs(client, url, job_id, log_sink, poll_interval_s)
        info = _wait_terminal(client, url, job_id, timeout_s=None, poll_s=poll_interval_s)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping job %s", job_id)
        with _translate_errors(url, "stop", job_id):
            client.stop_job(job_id)
        info = _wait_terminal(client, url, job_id, timeout_s=stop_timeout_s, poll_s=min(poll_interval_s, 0.5))
        interrupted = True
    else:
        interrupted = False
    return JobResult(
        job_id=job_id,
        address=url,
        entrypoint=entrypoint,
        status=info.status,
        message=info.message,
        driver_exit_code=info.driver_exit_code,
        interrupted=interrupted,
    )


def job_status(
    address: str | None,
    job_id: str,
    *,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JobInfo:
    """Current status of one job."""
    url = resolve_address(address)
    return _get_info(_client(url, token, token_file, headers), url, job_id)


def list_jobs(
    address: str | None,
    *,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> list[JobInfo]:
    """Every job the cluster remembers, oldest first."""
    url = resolve_address(address)
    client = _client(url, token, token_file, headers)
    with _translate_errors(url, "list"):
        jobs = [_info(d) for d in client.list_jobs()]
    return sorted(jobs, key=lambda j: (j.start_time_ms or 0, j.job_id))


def job_logs(
    address: str | None,
    job_id: str,
    *,
    follow: bool = False,
    log_sink: LogSink | None = None,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    headers: Mapping[str, str] | None = None,
    poll_interval_s: float = 1.0,
) -> JobInfo:
    """Send the job's logs to `log_sink` (all of them; with `follow`, also new ones until it ends).

    Ctrl-C while following only stops following; the job keeps running. Returns the job's status after.
    """
    url = resolve_address(address)
    client = _client(url, token, token_file, headers)
    if follow:
        _follow_logs(client, url, job_id, log_sink, poll_interval_s)
        return _wait_terminal(client, url, job_id, timeout_s=None, poll_s=poll_interval_s)
    info = _get_info(client, url, job_id)
    with _translate_errors(url, "logs", job_id):
        text = client.get_job_logs(job_id)
    if log_sink is not None and text:
        log_sink(text)
    return info


def stop_job(
    address: str | None,
    job_id: str,
    *,
    wait: bool = True,
    timeout_s: float = 60.0,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JobInfo:
    """Ask the cluster to stop a job (SIGTERM, then SIGKILL after Ray's grace period); with `wait`, until it ends."""
    url = resolve_address(address)
    client = _client(url, token, token_file, headers)
    with _translate_errors(url, "stop", job_id):
        client.stop_job(job_id)
    if wait:
        return _wait_terminal(client, url, job_id, timeout_s=timeout_s, poll_s=0.5)
    return _get_info(client, url, job_id)
