"""`ray_session`: the Ray that trtcal runs on, started only when needed and stopped only if started here.

* Ray already initialised in this process: used as it is, left running.
* `address` given (or ``RAY_ADDRESS`` set, as inside a Ray Job): connect; disconnect on exit.
* Otherwise an embedded single-node Ray: loopback only, a capped object store, its own temp dir,
  no dashboard, no idle workers started ahead of work (`embedded_system_config`); shut down (and its
  temp dir removed) on exit. A cluster trtcal connects to keeps its own settings.

Token authentication (on by default since Ray 2.60) is left as the environment says: if
``RAY_AUTH_MODE`` is unset the embedded Ray uses Ray's default (token auth on; Ray keeps the token
in ``~/.ray/auth_token``), ``RAY_AUTH_MODE=disabled`` turns it off, and ``RAY_AUTH_MODE=token`` with
``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH`` uses that token. Environment variables this module or
Ray's start-up change are restored on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trtcal.errors import BackendUnavailableError, ConfigError, WorkerError

__all__ = ["RaySessionInfo", "ray_session", "default_object_store_memory", "embedded_system_config", "cluster_cpus"]

logger = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_RESTORED_ENV = ("RAY_AUTH_MODE", LOOPBACK_ENV)
MiB = 1 << 20
# Unix socket paths under the temp dir must stay below ~107 bytes.
_MAX_TEMP_DIR_LEN = 40


@dataclass(frozen=True)
class RaySessionInfo:
    """What `ray_session` is running on.

    Attributes:
        started: True when this session started the embedded Ray (and will stop it).
        connected: True when this session called ray.init (embedded or `address`).
        address: the GCS address ("host:port").
        num_cpus: CPUs of the whole cluster.
        temp_dir: the embedded Ray's temp dir (None otherwise).
    """

    started: bool
    connected: bool
    address: str
    num_cpus: int
    temp_dir: str | None


def default_object_store_memory(num_cpus: int) -> int:
    """64 MiB per CPU, between 384 MiB and 2 GiB: results are consumed as they arrive."""
    return int(min(2048 * MiB, max(384 * MiB, 64 * MiB * num_cpus)))


def embedded_system_config() -> dict[str, Any]:
    """Ray system settings (`_system_config`) of the embedded Ray only.

    ``prestart_worker_first_driver`` (Ray's src/ray/common/ray_config_def.h, default true) starts one
    idle worker per CPU when the first driver connects. A calibration of a given or stored batch uses
    one worker (the actor), so the others only hold memory (about 45 MiB PSS each, measured: the
    OCR recogniser's whole-tree peak, BENCHMARKS.md); workers start on demand instead. A new dict on
    each call: ray.init adds its own entries to the one it is given.
    """
    return {"prestart_worker_first_driver": False}


def cluster_cpus() -> int:
    import ray

    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return int(resources.get("CPU", 0))


def _import_ray(loopback: bool) -> Any:
    """Import ray; for an embedded start the loopback switch must be set before Ray reads it."""
    if loopback and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailableError(f"Ray is not installed ({exc}); pip install 'ray[default]'") from None
    _explain_ray_auth_once()
    return ray


@contextlib.contextmanager
def _loopback_only(ray: Any) -> Iterator[None]:
    """Keep every port of an embedded Ray on 127.0.0.1.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 once, at import; if the caller imported ray
    before us, the value Ray computed is overridden for the duration of the start-up.
    """
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    previous = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if os.environ.get(LOOPBACK_ENV) == "1" or constants is None or previous is None:
        yield
        return
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = previous


def _fresh_temp_dir(root: str) -> str:
    """The embedded Ray's own temp dir, after removing those of earlier runs that were killed."""
    from trtcal._io import owned_temp_dir, sweep_stale_temp_dirs

    for stale in sweep_stale_temp_dirs(root):
        logger.info("removed %s, left by an earlier run that was killed", stale)
    return owned_temp_dir("ray", root)


def _start_embedded(ray: Any, cpus: int, store: int, temp_dir: str) -> None:
    os.environ.setdefault(LOOPBACK_ENV, "0")
    with _loopback_only(ray):
        try:
            ray.init(
                address="local",
                num_cpus=cpus,
                include_dashboard=False,
                object_store_memory=store,
                _temp_dir=temp_dir,
                _system_config=embedded_system_config(),
                logging_level=logging.WARNING,
            )
        except Exception as exc:
            raise WorkerError(f"cannot start the embedded Ray ({type(exc).__name__}: {exc})") from exc


def _temp_root() -> str:
    root = tempfile.gettempdir()
    return root if len(root) <= _MAX_TEMP_DIR_LEN else "/tmp"


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    object_store_memory: int | None = None,
    temp_dir: str | None = None,
) -> Iterator[RaySessionInfo]:
    """Run a block on Ray: reuse, connect to, or start-and-stop an embedded Ray (see the module doc).

    Args:
        address: a Ray cluster ("host:port", "ray://...", "auto"); None for the embedded one
            (or the one RAY_ADDRESS names).
        num_cpus: CPUs of the embedded Ray (default: this machine's). Ignored when connecting.
        object_store_memory: bytes for the embedded Ray's object store (default:
            `default_object_store_memory`).
        temp_dir: parent of the embedded Ray's own temp dir (default: the system temp dir).

    Raises:
        BackendUnavailableError: Ray is not installed.  WorkerError: Ray cannot be started or reached.
    """
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ConfigError(f"num_cpus must be a positive integer, got {num_cpus!r}")
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    embedded = address is None
    saved_env = {name: os.environ.get(name) for name in _RESTORED_ENV}
    ray = _import_ray(loopback=embedded)
    if ray.is_initialized():
        yield RaySessionInfo(
            started=False, connected=False, address=_gcs_address(ray), num_cpus=cluster_cpus(), temp_dir=None
        )
        return
    own_temp: str | None = None
    failed = False
    try:
        if embedded:
            cpus = num_cpus or os.cpu_count() or 1
            store = object_store_memory or default_object_store_memory(cpus)
            own_temp = _fresh_temp_dir(temp_dir or _temp_root())
            _start_embedded(ray, cpus, store, own_temp)
            logger.info("started embedded Ray: %d CPUs, %d MiB object store, temp dir %s", cpus, store // MiB, own_temp)
        else:
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except Exception as exc:
                raise WorkerError(
                    f"cannot connect to Ray at {address!r} ({type(exc).__name__}: {exc}); check the address and, "
                    "with token auth, RAY_AUTH_TOKEN"
                ) from exc
        yield RaySessionInfo(
            started=embedded, connected=True, address=_gcs_address(ray), num_cpus=cluster_cpus(), temp_dir=own_temp
        )
    except WorkerError:
        failed = True
        raise
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if own_temp is not None:
            if failed:
                logger.warning("the embedded Ray's logs are kept in %s", own_temp)
            else:
                shutil.rmtree(own_temp, ignore_errors=True)


_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class _RayAuthNotice(logging.Filter):
    """Ray warns "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to
    opt out" (or "... is disabled ...") on every ray.init. The setting is the user's (see the module
    doc); trtcal says what it means once per process, at INFO (-v), instead of a warning every run."""

    explained = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Token authentication is"):
            return True
        if not _RayAuthNotice.explained:
            _RayAuthNotice.explained = True
            state = "on" if "is enabled" in message else "off"
            logger.info(
                "Ray token authentication is %s (Ray's default unless RAY_AUTH_MODE is set; trtcal's embedded Ray "
                "listens on 127.0.0.1 only). Set RAY_AUTH_MODE=token or =disabled to choose; Ray's own note: %s",
                state, message,
            )
        return False


def _explain_ray_auth_once() -> None:
    ray_logger = logging.getLogger(_RAY_AUTH_LOGGER)
    if not any(isinstance(f, _RayAuthNotice) for f in ray_logger.filters):
        ray_logger.addFilter(_RayAuthNotice())


def _gcs_address(ray: Any) -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # older Ray
        return ""
