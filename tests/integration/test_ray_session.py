"""`ray_session` starting its own embedded Ray, in a fresh process (the test process's Ray is `ray_local`).

Checks: every listening port of the embedded Ray is on 127.0.0.1; no idle worker is started before
any work; token auth is on by Ray's default
when RAY_AUTH_MODE is unset (the token lands in $HOME/.ray, a temp dir here); the environment is
restored; after the block no process of that Ray is left and its temp dir is gone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROBE = r"""
import json, os, socket, struct, time
from trtcal.workers.ray_runtime import ray_session


def descendants(root):
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def listening_ips(pids):
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    ips = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state == "0A" and inode in inodes:
                    raw = bytes.fromhex(local.split(":")[0])
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    ips.add(socket.inet_ntop(family, words))
    return sorted(ips)


def idle_workers(root):
    found = []
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::IDLE"):
                    found.append(pid)
        except OSError:
            continue
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


env_before = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
with ray_session(num_cpus=1) as session:
    import ray

    # Ray's prestart would have a worker per CPU up within a second or two of the driver connecting.
    deadline = time.monotonic() + 5
    idle_before_work = idle_workers(os.getpid())
    while not idle_before_work and time.monotonic() < deadline:
        time.sleep(0.2)
        idle_before_work = idle_workers(os.getpid())

    @ray.remote
    def pid():
        return os.getpid()

    worker = ray.get(pid.remote())
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    pids = descendants(os.getpid())
    listening = listening_ips([os.getpid(), *pids])
    info = {"started": session.started, "temp_dir": session.temp_dir, "num_cpus": session.num_cpus}
deadline = time.monotonic() + 30
left = pids
while left and time.monotonic() < deadline:
    left = [p for p in pids if alive(p)]
    time.sleep(0.2)
print(json.dumps({
    **info, "worker_in_children": worker in pids, "listening": listening, "alive_after": left,
    "auth_mode_inside": auth_mode, "env_before": env_before, "idle_before_work": idle_before_work,
    "env_after": {k: os.environ.get(k) for k in env_before},
    "temp_dir_exists_after": os.path.exists(info["temp_dir"]),
}))
"""

def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def test_embedded_session_is_loopback_only_and_cleans_up(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # Ray's default token auth writes ~/.ray/auth_token: keep it here
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["started"] is True and result["num_cpus"] == 1 and result["worker_in_children"]
    assert result["idle_before_work"] == []  # no worker is started ahead of work (embedded_system_config)
    assert result["listening"] and all(_loopback(ip) for ip in result["listening"]), result["listening"]
    assert result["auth_mode_inside"] == "token"  # Ray 2.60's default, kept
    assert (tmp_path / ".ray" / "auth_token").is_file()
    assert result["env_after"] == result["env_before"] == {"RAY_AUTH_MODE": None, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": None}
    assert result["alive_after"] == []
    assert result["temp_dir_exists_after"] is False
