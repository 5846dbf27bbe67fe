"""`ray start --head --block` on 127.0.0.1 as a child process, ended by PID (never `ray stop`).

Its temp dir (and so every Ray log of the runs it served) stays until the context exits, for the
credential search; bench/stress.py runs its concurrent jobs on one. Token auth is on.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RayHead", "ray_head", "session_pids", "client_env"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def session_pids(sid: int) -> list[int]:
    """PIDs (other than `sid`) whose session id is `sid`: what a `start_new_session` child left behind."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and int(entry) != sid:
                pids.append(int(entry))
    return pids


@dataclass
class RayHead:
    address: str
    token: str
    temp_dir: Path
    process: subprocess.Popen[bytes]


def client_env(head: RayHead, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for a `trtcal … --address head.address` process."""
    env = {k: v for k, v in (base if base is not None else os.environ).items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0")
    return env


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, env: Mapping[str, str] | None = None, token: str | None = None) -> Iterator[RayHead]:
    temp_dir = Path(tempfile.mkdtemp(prefix="trtcal-rh-", dir="/tmp"))  # unix socket paths must stay short
    port = _free_port()
    token = token or secrets.token_hex(32)
    argv = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
            "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--num-cpus={num_cpus}",
            "--object-store-memory=400000000", f"--ray-client-server-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
            f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    head_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    head_env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                    RAY_USAGE_STATS_ENABLED="0", HOME=str(temp_dir), **(env or {}))
    log = open(temp_dir / "head.out", "wb")  # noqa: SIM115
    process = subprocess.Popen(argv, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(address=f"127.0.0.1:{port}", token=token, temp_dir=temp_dir, process=process)
    try:
        deadline = time.monotonic() + 90
        while not list(temp_dir.glob("session_*/logs/raylet.out")):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not start: {(temp_dir / 'head.out').read_text()[-3000:]}")
            time.sleep(0.3)
        time.sleep(2)
        yield head
    finally:
        sid = process.pid
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the head alone: it drains and ends its children
            try:
                process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        deadline = time.monotonic() + 15
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.3)
        for pid in session_pids(sid):  # only processes of the session this head started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
