"""Ray Jobs through `trtcal submit` / `trtcal jobs` against a real `ray start --head` child process.

The head runs on 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, every port chosen free) with Ray
token authentication ON, as a product cluster would have it: RAY_AUTH_MODE=token and a fresh token in
its environment, HOME pointing at an empty temp dir so no ~/.ray/auth_token of this machine is read or
written. Clients get the token only through --token-file. The head is ended by PID (SIGTERM to the
`ray start` process, never `ray stop`), and the teardown checks that no process of its session is left.

The first tests need no cluster: they check the pure parts of trtcal.orchestrator.jobs.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from trtcal.errors import ConfigError
from trtcal.orchestrator import jobs
from trtcal.orchestrator.calibrate import calibrate

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAD_START_TIMEOUT_S = 90.0
CLI_TIMEOUT_S = 240.0
# The head's `python` is whatever its PATH says; the job must use this interpreter (and this trtcal).
LAUNCHER = f"{shlex.quote(sys.executable)} -m trtcal"


# --------------------------------------------------------------------------- pure helpers (no cluster)


def test_entrypoint_quotes_every_argument_for_the_shell() -> None:
    entrypoint = jobs.build_entrypoint(
        ["--", "calibrate", "my model.onnx", "--data", "s3://b/it's here/", "--namespace", "$HOME;rm -rf /"],
        "/opt/venv 1/bin/python -m trtcal",
    )
    assert shlex.split(entrypoint) == [
        "/opt/venv",
        "1/bin/python",
        "-m",
        "trtcal",
        "calibrate",
        "my model.onnx",
        "--data",
        "s3://b/it's here/",
        "--namespace",
        "$HOME;rm -rf /",
    ]
    assert jobs.build_entrypoint(["trtcal", "calibrate", "m.onnx"]) == "python -m trtcal calibrate m.onnx"
    assert jobs.build_entrypoint(["calibrate"], ["trtcal"]) == "trtcal calibrate"


@pytest.mark.parametrize("args", [[], ["--"], ["--data", "x"], ["trtcal"]])
def test_entrypoint_needs_a_subcommand(args: list[str]) -> None:
    with pytest.raises(ConfigError, match="entrypoint_args"):
        jobs.build_entrypoint(args)


def test_token_sources_in_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    named = tmp_path / "named"
    named.write_text("  from-file \n")
    by_path = tmp_path / "by-path"
    by_path.write_text("from-path")
    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(by_path)}
    assert jobs.resolve_token("explicit", named, environ=env, home=home) == "explicit"
    assert jobs.resolve_token(None, named, environ=env, home=home) == "from-file"
    assert jobs.resolve_token(None, None, environ=env, home=home) == "from-env"
    assert (
        jobs.resolve_token(None, None, environ={"RAY_AUTH_TOKEN_PATH": str(by_path)}, home=home)
        == "from-path"
    )
    assert jobs.resolve_token(None, None, environ={}, home=home) == "from-home"
    assert jobs.resolve_token(None, None, environ={}, home=tmp_path / "nobody") is None


def test_token_file_with_a_tilde_is_in_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cluster_token").write_text("tilde\n")
    assert jobs.resolve_token(None, "~/cluster_token", environ={}, home=tmp_path / "elsewhere") == "tilde"


def test_unreadable_token_file_is_a_clear_error_without_the_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="token_file: cannot read .*missing"):
        jobs.resolve_token(None, tmp_path / "missing", environ={}, home=tmp_path)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        jobs.resolve_token(None, empty, environ={}, home=tmp_path)


def test_address_resolution() -> None:
    assert jobs.resolve_address("http://head:8265/", environ={}) == "http://head:8265"
    assert jobs.resolve_address("head:8265", environ={}) == "http://head:8265"
    assert jobs.resolve_address(None, environ={"RAY_ADDRESS": "http://h:1"}) == "http://h:1"
    # A GCS address in RAY_ADDRESS (as inside a Ray job) is not a dashboard URL: not used silently.
    with pytest.raises(ConfigError, match="--address"):
        jobs.resolve_address(None, environ={"RAY_ADDRESS": "10.0.0.1:6379"})
    with pytest.raises(ConfigError, match="dashboard"):
        jobs.resolve_address("ray://head:10001", environ={})


def test_runtime_env_files(tmp_path: Path) -> None:
    (tmp_path / "env.yaml").write_text("env_vars:\n  A: '1'\npip: [s3fs]\n")
    (tmp_path / "env.json").write_text('{"env_vars": {"A": "1"}, "pip": ["s3fs"]}')
    assert jobs.load_runtime_env(tmp_path / "env.yaml") == jobs.load_runtime_env(tmp_path / "env.json")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        jobs.load_runtime_env(tmp_path / "list.yaml")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        jobs.load_runtime_env(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="working_dir: .* is not a directory"):
        jobs.merged_runtime_env({}, tmp_path / "absent")
    with pytest.raises(ConfigError, match="keep one"):
        jobs.merged_runtime_env({"working_dir": "s3://b/wd.zip"}, tmp_path)
    assert jobs.merged_runtime_env({"env_vars": {"A": "1"}}, tmp_path) == {
        "env_vars": {"A": "1"},
        "working_dir": str(tmp_path),
    }
    assert jobs.merged_runtime_env(None, None) is None


def test_exit_codes() -> None:
    assert [jobs.exit_code_for(s) for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING")] == [0, 1, 3, 0]


# --------------------------------------------------------------------------- a real head


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _session_pids(sid: int) -> set[int]:
    """Live processes whose session is `sid`: the head and everything it started (workers included)."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields[0] is the state, fields[3] the session id; zombies are already dead.
        if int(fields[3]) == sid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


@dataclass
class RayHead:
    url: str
    token: str
    token_file: Path
    home: Path
    process: subprocess.Popen[bytes]
    log_path: Path


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    root = tmp_path_factory.mktemp("ray-head")
    home = root / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    dashboard_port = _free_port()
    # Ray's unix sockets live under --temp-dir and must fit in 107 bytes: pytest's tmp paths are too long.
    ray_temp = Path(tempfile.mkdtemp(prefix="trtcal-ray-", dir="/tmp"))
    argv = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        f"--port={_free_port()}",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        "--num-cpus=2",
        "--object-store-memory=500000000",
        f"--temp-dir={ray_temp}",
        "--disable-usage-stats",
    ]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k in ("RAY_USAGE_STATS_ENABLED",)
    }
    env.update(
        HOME=str(home),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keeps every Ray port on 127.0.0.1
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
    )
    log_path = root / "head.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(
        url=f"http://127.0.0.1:{dashboard_port}",
        token=token,
        token_file=token_file,
        home=home,
        process=process,
        log_path=log_path,
    )
    try:
        _wait_for_dashboard(head)
        yield head
    finally:
        try:
            _stop_head(head)
        finally:
            shutil.rmtree(ray_temp, ignore_errors=True)


def _wait_for_dashboard(head: RayHead) -> None:
    import requests

    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(
                f"ray head exited with {head.process.returncode}:\n{head.log_path.read_text()[-4000:]}"
            )
        try:
            response = requests.get(
                f"{head.url}/api/jobs/", headers={"Authorization": f"Bearer {head.token}"}, timeout=2
            )
            if response.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(
        f"ray head's Jobs API did not answer in {HEAD_START_TIMEOUT_S} s:\n{head.log_path.read_text()[-4000:]}"
    )


def _stop_head(head: RayHead) -> None:
    """SIGTERM to the head process alone: it drains and ends its children (about 2 s). SIGTERM to the
    whole group at once makes the drain wait for children already gone, for its full 30 s."""
    sid = head.process.pid  # start_new_session: the head leads its own session
    started = _session_pids(sid)
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)
        try:
            head.process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            head.process.kill()
            head.process.wait(timeout=10)
    # Workers run in process groups of their own but stay in the head's session; give them a moment.
    deadline = time.monotonic() + 15
    left = _session_pids(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.3)
        left = _session_pids(sid)
    for pid in left:  # only processes of the session this fixture started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, (
        f"Ray processes of this test's head outlived it (killed now): {sorted(left)} of {sorted(started)}"
    )


def trtcal(
    *args: str, head: RayHead | None = None, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess with a clean environment (no Ray token unless passed)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["HOME"] = str(head.home) if head else base.get("HOME", "/tmp")
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "trtcal", *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def connection(head: RayHead) -> list[str]:
    return ["--address", head.url, "--token-file", str(head.token_file)]


def _job_id() -> str:
    return f"trtcal-test-{uuid.uuid4().hex[:12]}"


def _calibrate_args(model: Path, data: Path, output: Path) -> list[str]:
    """`trtcal calibrate` as a cluster job runs it: joining the job's cluster when the command can."""
    args = ["calibrate", str(model), "--data", str(data), "--output", str(output), "--algorithm", "entropy2"]
    from trtcal.cli import build_parser

    calibrate_parser = build_parser()._subparsers._group_actions[0].choices["calibrate"]  # type: ignore[union-attr]
    if "--address" in calibrate_parser._option_string_actions:
        args += ["--address", "auto"]  # inside a Ray job RAY_ADDRESS names this cluster
    return args


@pytest.fixture(scope="module")
def photo_npy(tmp_path_factory: pytest.TempPathFactory, photo_arrays: tuple[object, list[str]]) -> Path:
    """Eight preprocessed real-photo views (skimage.data) as the .npy batch `trtcal calibrate --data` takes."""
    import numpy as np

    arrays, _ = photo_arrays
    path = tmp_path_factory.mktemp("job-data") / "views.npy"
    np.save(path, np.ascontiguousarray(arrays[:8]))  # type: ignore[index]
    return path


# --------------------------------------------------------------------------- against the head


@pytest.mark.integration
def test_unauthenticated_client_gets_a_clear_trtcal_error(ray_head: RayHead, tmp_path: Path) -> None:
    missing = trtcal("jobs", "list", "--address", ray_head.url, head=ray_head)
    assert missing.returncode == 2, missing.stderr
    assert "requires token authentication" in missing.stderr
    assert "--token-file" in missing.stderr and "Traceback" not in missing.stderr

    wrong = tmp_path / "wrong"
    wrong.write_text(secrets.token_hex(32))
    rejected = trtcal("jobs", "list", "--address", ray_head.url, "--token-file", str(wrong), head=ray_head)
    assert rejected.returncode == 2
    assert "rejected the auth token" in rejected.stderr
    for output in (missing.stdout, missing.stderr, rejected.stdout, rejected.stderr):
        assert ray_head.token not in output
    assert wrong.read_text() not in rejected.stderr

    # RAY_AUTH_TOKEN in the environment works as well as --token-file.
    by_env = trtcal(
        "jobs",
        "list",
        "--address",
        ray_head.url,
        "--json",
        head=ray_head,
        env={"RAY_AUTH_TOKEN": ray_head.token},
    )
    assert by_env.returncode == 0, by_env.stderr
    assert isinstance(json.loads(by_env.stdout), list)


@pytest.mark.integration
def test_unknown_job_and_unreachable_cluster(ray_head: RayHead) -> None:
    unknown = trtcal("jobs", "status", "no-such-job", *connection(ray_head), head=ray_head)
    assert unknown.returncode == 2
    assert "no job 'no-such-job'" in unknown.stderr

    dead = f"http://127.0.0.1:{_free_port()}"
    nobody = trtcal("jobs", "status", "x", "--address", dead, head=ray_head)
    assert nobody.returncode == 2
    assert "cannot reach the Ray dashboard" in nobody.stderr and "Traceback" not in nobody.stderr

    # Ray's client would silently prefer these variables over its address argument; --address wins.
    overridden = {"RAY_ADDRESS": dead, "RAY_API_SERVER_ADDRESS": dead}
    explicit = trtcal("jobs", "list", *connection(ray_head), head=ray_head, env=overridden)
    assert explicit.returncode == 0, explicit.stderr
    # Without --address, an http:// RAY_API_SERVER_ADDRESS names the cluster.
    implicit = trtcal(
        "jobs",
        "list",
        "--token-file",
        str(ray_head.token_file),
        head=ray_head,
        env={"RAY_API_SERVER_ADDRESS": ray_head.url},
    )
    assert implicit.returncode == 0, implicit.stderr


@pytest.mark.integration
def test_runtime_env_and_working_dir_reach_the_job(ray_head: RayHead, tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "marker.txt").write_text("uploaded")
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars:\n  TRTCAL_JOB_PROBE: from-runtime-env\n")
    # The launcher is configurable; here it is a probe printing what the job sees, then its argv.
    probe = "import os, sys; print('probe', os.environ['TRTCAL_JOB_PROBE'], open('marker.txt').read(), sys.argv[1:])"
    job_id = _job_id()
    result = trtcal(
        "submit",
        *connection(ray_head),
        "--working-dir",
        str(workdir),
        "--runtime-env",
        str(env_file),
        "--submission-id",
        job_id,
        "--launcher",
        f"{shlex.quote(sys.executable)} -c {shlex.quote(probe)}",
        "--",
        "calibrate",
        "a b.onnx",
        head=ray_head,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "probe from-runtime-env uploaded ['calibrate', 'a b.onnx']" in result.stdout
    assert f"job {job_id} SUCCEEDED" in result.stderr


@pytest.mark.integration
def test_ctrl_c_while_following_stops_the_job(ray_head: RayHead) -> None:
    job_id = _job_id()
    sleeper = "import sys, time; print('job started', flush=True); time.sleep(600)"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["HOME"] = str(ray_head.home)
    submit = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trtcal",
            "submit",
            *connection(ray_head),
            "--submission-id",
            job_id,
            "--launcher",
            f"{shlex.quote(sys.executable)} -c {shlex.quote(sleeper)}",
            "--",
            "calibrate",
            "m.onnx",
        ],
        env=base,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert submit.stdout is not None
        seen = ""
        deadline = time.monotonic() + 120
        while "job started" not in seen and time.monotonic() < deadline:
            line = submit.stdout.readline()
            if not line and submit.poll() is not None:
                break
            seen += line
        assert "job started" in seen, seen
        submit.send_signal(signal.SIGINT)
        out, err = submit.communicate(timeout=120)
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait()
    assert submit.returncode == 3, err
    assert f"stopped job {job_id}" in err and "Nothing half-published remains" in err
    status = trtcal("jobs", "status", job_id, *connection(ray_head), "--json", head=ray_head)
    assert status.returncode == 3
    assert json.loads(status.stdout)["status"] == "STOPPED"


@pytest.mark.integration
def test_no_follow_then_jobs_stop(ray_head: RayHead) -> None:
    job_id = _job_id()
    sleeper = "import time; time.sleep(600)"
    submitted = trtcal(
        "submit",
        *connection(ray_head),
        "--no-follow",
        "--json",
        "--submission-id",
        job_id,
        "--launcher",
        f"{shlex.quote(sys.executable)} -c {shlex.quote(sleeper)}",
        "--",
        "calibrate",
        "m.onnx",
        head=ray_head,
    )
    assert submitted.returncode == 0, submitted.stderr
    result = json.loads(submitted.stdout)
    assert result["job_id"] == job_id and result["followed"] is False
    assert result["status"] in ("PENDING", "RUNNING")
    stopped = trtcal("jobs", "stop", job_id, *connection(ray_head), head=ray_head)
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    assert "STOPPED" in stopped.stdout
    listed = trtcal("jobs", "list", *connection(ray_head), "--json", head=ray_head)
    assert {j["job_id"]: j["status"] for j in json.loads(listed.stdout)}[job_id] == "STOPPED"


@pytest.mark.integration
@pytest.mark.slow
def test_calibration_job_succeeds_with_the_same_bytes_as_a_local_run(
    efficientnet_path: Path, ray_head: RayHead, photo_npy: Path, tmp_path: Path
) -> None:
    job_id = _job_id()
    out = tmp_path / "from-job"
    submitted = trtcal(
        "submit",
        *connection(ray_head),
        "--launcher",
        LAUNCHER,
        "--submission-id",
        job_id,
        "--",
        *_calibrate_args(efficientnet_path, photo_npy, out),
        head=ray_head,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    # The job's own output streamed back: the calibration summary.
    assert f"artifacts in {out}" in submitted.stdout
    assert "calibrated " in submitted.stdout and "calibration.cache" in submitted.stdout
    assert f"job {job_id} SUCCEEDED" in submitted.stderr
    assert ray_head.token not in submitted.stdout + submitted.stderr
    assert "WebSocket closed" not in submitted.stderr  # Ray client chatter stays behind -v

    status = trtcal("jobs", "status", job_id, *connection(ray_head), "--json", head=ray_head)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["status"] == "SUCCEEDED" and info["driver_exit_code"] == 0
    assert info["entrypoint"].startswith(f"{LAUNCHER} calibrate ")

    logs = trtcal("jobs", "logs", job_id, *connection(ray_head), head=ray_head)
    assert logs.returncode == 0
    assert f"artifacts in {out}" in logs.stdout

    # The job computed exactly what a local run computes.
    local = tmp_path / "local"
    calibrate(efficientnet_path, photo_npy, output_dir=local, algorithms=("entropy2",))
    names = ["calibration.cache", "calibration.entropy2.cache", "ranges.json", "histograms.npy"]
    assert {n: (out / n).read_bytes() for n in names} == {n: (local / n).read_bytes() for n in names}


@pytest.mark.integration
def test_failing_job_exits_1_with_its_logs(ray_head: RayHead, photo_npy: Path, tmp_path: Path) -> None:
    job_id = _job_id()
    missing = tmp_path / "no-such-model.onnx"
    failed = trtcal(
        "submit",
        *connection(ray_head),
        "--launcher",
        LAUNCHER,
        "--submission-id",
        job_id,
        "--",
        *_calibrate_args(missing, photo_npy, tmp_path / "out"),
        head=ray_head,
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"trtcal: error: ONNX model '{missing}' does not exist" in failed.stdout  # the job's logs
    assert f"job {job_id} FAILED, driver exit code 2" in failed.stderr
    assert not (tmp_path / "out").exists()

    status = trtcal("jobs", "status", job_id, *connection(ray_head), head=ray_head)
    assert status.returncode == 1
    assert "FAILED" in status.stdout
    logs = trtcal("jobs", "logs", job_id, *connection(ray_head), "--json", head=ray_head)
    assert logs.returncode == 1
    assert "does not exist" in json.loads(logs.stdout)["logs"]


@pytest.mark.integration
def test_abbreviated_or_json_credentials_never_reach_the_cluster(ray_head: RayHead) -> None:
    """Issue 15 item 9: `--storage secret=…` (argparse takes the prefix), `--storage-opt=…` and JSON
    `client_kwargs` are refused before submitting: no job, so no entrypoint holding them on the cluster."""
    secret = secrets.token_urlsafe(24)
    spellings = [
        ["--storage", f"secret={secret}"],
        [f"--storage-opt=secret={secret}"],
        ["--storage-option", "client_kwargs=" + json.dumps({"aws_secret_access_key": secret})],
    ]
    for words in spellings:
        done = trtcal(
            "submit", *connection(ray_head), "--no-follow", "--", "calibrate", "m.onnx", "--data", "s3://b/x/",
            *words, head=ray_head,
        )
        assert done.returncode == 2, (words, done.stdout, done.stderr)
        assert "credentials" in done.stderr and secret not in done.stdout + done.stderr
    listed = trtcal("jobs", "list", "--json", *connection(ray_head), head=ray_head)
    assert listed.returncode == 0, listed.stderr
    assert secret not in listed.stdout
