"""Issue 15 item 10: a real multi-node Ray on one host (`ray.cluster_utils.Cluster`: a head and two
worker nodes, each its own raylet process with its own resources). The head has no CPU, so the
preprocessing tasks and the calibration actor run on other nodes than the driver; the batch reaches
the actor through the object store. The result must be byte-identical to a single-node run.

Each cluster runs in a child process of its own (this session's `ray_local` stays untouched).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.s3 import S3Server
from tests.reliability.rayhead import session_pids
from tests.reliability.tiny_cnn import tiny_cnn
from trtcal.demo.demo import write_photo_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

_CHILD = r'''
import json, logging, sys
from pathlib import Path
work, mode = Path(sys.argv[1]), sys.argv[2]
import ray
from trtcal.config import JobConfig
from trtcal.orchestrator.job import calibrate_dataset
said = []
class Keep(logging.Handler):
    def emit(self, record): said.append(record.getMessage())
logging.getLogger("trtcal.orchestrator.actor").setLevel(logging.INFO)
logging.getLogger("trtcal.orchestrator.actor").addHandler(Keep())
cluster = None
if mode == "multi":
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 150 << 20})
    for name in ("a", "b"):
        cluster.add_node(num_cpus=1, resources={"node_" + name: 1}, object_store_memory=150 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
try:
    cfg = JobConfig().with_options(store=str(work / ("store-" + mode)), output=str(work / ("out-" + mode)), num_samples=8,
                                   preprocess="imagenet", device="cpu", workers=2, export_qdq=False)
    result = calibrate_dataset(str(work / "tiny224.onnx"), str(work / "photos"), config=cfg)
    nodes = len([n for n in ray.nodes() if n["Alive"]]) if ray.is_initialized() else 1
    print(json.dumps({"key": result.key, "batch_key": result.batch_key, "nodes": nodes, "actor": said}))
finally:
    if ray.is_initialized():
        ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
'''


def _run(work: Path, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO_ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(work), mode], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_three_node_cluster_gives_the_bytes_of_one_node(tmp_path: Path) -> None:
    (tmp_path / "tiny224.onnx").write_bytes(tiny_cnn(side=224).SerializeToString())
    write_photo_dataset(tmp_path / "photos", ("astronaut", "coffee"), 4, 0)
    multi = _run(tmp_path, "multi")
    single = _run(tmp_path, "single")
    assert multi["nodes"] == 3
    # The actor is not on the driver's node (the head has no CPU): the batch went through the object store.
    assert any("sent through the object store" in line for line in multi["actor"]), multi["actor"]
    assert multi["key"] == single["key"]
    for name in ("calibration.cache", "ranges.json", "histograms.npy"):
        assert (tmp_path / "out-multi" / name).read_bytes() == (tmp_path / "out-single" / name).read_bytes(), name


# --- a head and a worker node as `ray start` children; the driver is a `trtcal calibrate` process ------------

_DRIVER_TIMEOUT_S = 420


# `ray start --address` refuses to join with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps Ray on
# loopback), so the nodes are `ray.cluster_utils.Cluster` raylets started by a child process whose
# environment has no AWS_* variables: their workers inherit it.
_CLUSTER = r"""
import json, sys
from ray.cluster_utils import Cluster
temp_dir, resources, count = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 150 << 20,
                                                        "temp_dir": temp_dir})
nodes = [cluster.add_node(num_cpus=2, resources=resources, object_store_memory=200 << 20) for _ in range(count)]
cluster.wait_for_nodes()
raylets = [node.all_processes["raylet"][0].process.pid for node in nodes]
print(json.dumps({"address": cluster.address, "worker_raylets": raylets}), flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""


@dataclass
class _Cluster:
    address: str
    temp_dir: Path
    process: subprocess.Popen[str]
    worker_raylets: list[int]  # the raylets of the nodes that have the CPUs


def _plain_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(REPO_ROOT))
    return env


@contextlib.contextmanager
def _two_nodes(resources: str = '{"far": 2}', workers: int = 1) -> Iterator[_Cluster]:
    """A head without CPUs (the driver's node: Ray attaches a driver to the head of its host) and
    `workers` nodes of 2 CPUs each: every build task and the calibration actor runs on a worker node,
    in processes its raylet started from an environment without credentials."""
    temp_dir = Path(tempfile.mkdtemp(prefix="trtcal-mn-", dir="/tmp"))  # unix socket paths must stay short
    process = subprocess.Popen([sys.executable, "-c", _CLUSTER, str(temp_dir), resources, str(workers)], env=_plain_env(),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
                               cwd=REPO_ROOT)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, "the cluster did not start"
        info = json.loads(line)
        yield _Cluster(info["address"], temp_dir, process, [int(pid) for pid in info["worker_raylets"]])
    finally:
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        _end_session(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _end_session(process: subprocess.Popen[Any]) -> None:
    """SIGTERM the process we started, then SIGKILL what is left of its session (by PID)."""
    sid = process.pid
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    deadline = time.monotonic() + 15
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.3)
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cmdlines(sids: list[int]) -> list[str]:
    """The command lines of every live process of these sessions (the Ray nodes we started and their workers)."""
    lines = []
    for sid in sids:
        for pid in [sid, *session_pids(sid)]:
            with contextlib.suppress(OSError):
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return lines


def _files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(str(path))
    return found


def _upload_photos(s3: S3Server, bucket: str, local: Path) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options())
    for path in sorted(local.rglob("*.jpg")):
        fs.put_file(str(path), f"{bucket}/photos/{path.relative_to(local).as_posix()}")


def _driver(cluster: _Cluster, s3: S3Server, work: Path, bucket: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`trtcal calibrate` against the cluster, dataset and store on S3; credentials only in `env`."""
    argv = [sys.executable, "-m", "trtcal", "calibrate", str(work / "tiny224.onnx"), "--data", f"s3://{bucket}/photos/",
            "--store", f"s3://{bucket}/store", "--storage-option", f"client_kwargs.endpoint_url={s3.endpoint_url}",
            "--address", cluster.address, "--output", str(work / "out"), "--num-samples", "8", "--preprocess", "imagenet",
            "--device", "cpu", "--workers", "2", "--no-qdq", "--algorithm", "minmax"]
    full_env = {**_plain_env(), "AWS_DEFAULT_REGION": "us-east-1", **env}
    return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=_DRIVER_TIMEOUT_S, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[_Cluster]:
    with _two_nodes() as cluster:
        yield cluster


def _photos_on_s3(work: Path, s3: S3Server) -> str:
    (work / "tiny224.onnx").write_bytes(tiny_cnn(side=224).SerializeToString())
    write_photo_dataset(work / "photos", ("astronaut", "coffee"), 4, 0)
    bucket = s3.create_bucket()
    _upload_photos(s3, bucket, work / "photos")
    return bucket


def test_driver_credentials_reach_workers_on_another_node_and_nowhere_else(
    tmp_path: Path, s3_server: S3Server, two_nodes: _Cluster
) -> None:
    """Issue 15 item 10: AWS_* credentials in the driver's environment only. The build tasks list and read
    the S3 dataset, and the actor reads the stored batch, on a node whose environment has none; the
    secret is then in no Ray log, no process command line, no artifact and no stored object."""
    bucket = _photos_on_s3(tmp_path, s3_server)
    creds = {"AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": s3_server.secret}
    cluster = two_nodes
    done = _driver(cluster, s3_server, tmp_path, bucket, creds)
    command_lines = _cmdlines([cluster.process.pid])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    logs = _files_holding(cluster.temp_dir, s3_server.secret.encode())
    secret = s3_server.secret
    assert len(command_lines) > 4 and any("default_worker.py" in line for line in command_lines)
    assert [line for line in command_lines if secret in line] == []
    assert logs == []
    assert secret not in done.stdout + done.stderr
    assert _files_holding(tmp_path / "out", secret.encode()) == []
    stored = _bucket_bytes(s3_server, bucket)
    assert any(name.endswith("batch.arrow") for name in stored)
    assert [name for name, data in stored.items() if secret.encode() in data] == []
    assert (tmp_path / "out" / "calibration.cache").is_file()


def _bucket_bytes(s3: S3Server, bucket: str) -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options())
    found = {}
    for path in fs.find(f"{bucket}/store"):
        with contextlib.suppress(FileNotFoundError):  # a lease released meanwhile
            found[path] = fs.cat_file(path)
    return found


def test_credentials_the_workers_do_not_get_are_one_clear_error(
    tmp_path: Path, s3_server: S3Server, two_nodes: _Cluster
) -> None:
    """The driver reads S3 with a credentials file of its own node (AWS_SHARED_CREDENTIALS_FILE): nothing
    trtcal can hand to the workers. One error naming the dataset URL and what to do (not one "unreadable"
    line per file, and never a skip that would calibrate on what the driver's node alone could read);
    nothing is published."""
    bucket = _photos_on_s3(tmp_path, s3_server)
    creds = tmp_path / "aws-credentials"
    creds.write_text(f"[default]\naws_access_key_id = {s3_server.key}\naws_secret_access_key = {s3_server.secret}\n")
    done = _driver(two_nodes, s3_server, tmp_path, bucket, {"AWS_SHARED_CREDENTIALS_FILE": str(creds)})
    assert done.returncode == 2, (done.stdout + done.stderr)[-4000:]
    error = done.stderr.split("trtcal: error: ", 1)[1]
    assert error.startswith(f"Ray workers cannot read s3://{bucket}/photos/"), error
    assert "AWS_ACCESS_KEY_ID" in error and "Nothing was published" in error
    assert error.count("NoCredentialsError") == 1 and s3_server.secret not in done.stdout + done.stderr
    import s3fs

    stored = s3fs.S3FileSystem(**s3_server.storage_options()).find(f"{bucket}/store")
    # Only the store's own folder marker (and a released lease) may be there: no batch, no entry.
    assert [name for name in stored if "lease" not in name and name != f"{bucket}/store"] == []


# --- a node killed mid-build ----------------------------------------------------------------------------------

_ARTIFACTS = ("calibration.cache", "ranges.json")  # minmax: no histograms


def _same_bytes(work: Path) -> list[str]:
    """What differs between the undisturbed run ("ref") and the disturbed one ("kill"): artifacts and batch."""
    differ = [n for n in _ARTIFACTS if (work / "out-kill" / n).read_bytes() != (work / "out-ref" / n).read_bytes()]
    batches = [sorted((work / f"store-{run}").rglob("batch.arrow")) for run in ("ref", "kill")]
    if len(batches[0]) != 1 or len(batches[1]) != 1 or batches[0][0].read_bytes() != batches[1][0].read_bytes():
        differ.append("batch.arrow")
    return differ


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc's parent links)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running_task(raylets: list[int], name: str) -> int | None:
    """The raylet one of whose workers is running the task `name` (Ray titles it `ray::name`), if any."""
    for raylet in raylets:
        for pid in _children(raylet):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"ray::{name}".encode()):
                    return raylet
    return None


def _kill_node(raylet: int) -> list[int]:
    """SIGKILL a node: its raylet, then every process it started (workers, agents), by PID."""
    victims = [raylet, *_children(raylet)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return victims


def _calibrate_argv(cluster: _Cluster, work: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "trtcal", "calibrate", str(work / "tiny224.onnx"), "--data", str(work / "photos"),
            "--store", str(work / f"store-{name}"), "--output", str(work / f"out-{name}"), "--address", cluster.address,
            "--preprocess", "tests.integration.slow_preprocess:preprocess", "--num-samples", "32", "--workers", "4",
            "--device", "cpu", "--no-qdq", "--algorithm", "minmax"]


def test_a_node_killed_mid_build_gives_the_same_bytes_or_a_clean_failure(tmp_path: Path) -> None:
    """Issue 15 item 10: three nodes (a head without CPUs, two of 2 CPUs). While the build's
    `_process_task`s run, one worker node is SIGKILLed (raylet, workers, agents). Ray reruns the lost
    tasks on the other node: the batch and the calibration must be byte-identical to an undisturbed run
    on the same cluster, or else the job fails with one clear error and publishes nothing."""
    (tmp_path / "tiny224.onnx").write_bytes(tiny_cnn(side=224).SerializeToString())
    write_photo_dataset(tmp_path / "photos", ("astronaut", "coffee"), 16, 0)
    env = _plain_env()
    with _two_nodes(workers=2) as cluster:
        undisturbed = subprocess.run(_calibrate_argv(cluster, tmp_path, "ref"), env=env, capture_output=True, text=True,
                                     timeout=_DRIVER_TIMEOUT_S, cwd=REPO_ROOT)
        assert undisturbed.returncode == 0, undisturbed.stderr[-4000:]
        driver = subprocess.Popen(_calibrate_argv(cluster, tmp_path, "kill"), env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        victim, deadline = None, time.monotonic() + 120
        while victim is None and driver.poll() is None and time.monotonic() < deadline:
            victim = _running_task(cluster.worker_raylets, "_process_task")
            time.sleep(0.05)
        assert victim is not None, "no build task seen running on a worker node"
        killed = _kill_node(victim)
        try:
            out, err = driver.communicate(timeout=_DRIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.communicate()
            raise AssertionError("the driver hung after a node was killed") from None
    assert len(killed) > 1
    assert "Traceback" not in err and driver.returncode in (0, 2), err[-4000:]
    if driver.returncode == 0:  # Ray reran the lost tasks on the node left
        assert _same_bytes(tmp_path) == []
        verify = subprocess.run([sys.executable, "-m", "trtcal", "cache", "verify", str(tmp_path / "store-kill")],
                                env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    else:  # a clean failure: one paragraph, nothing published, nothing half-written
        assert err.strip().splitlines()[-1].startswith("trtcal: error:"), err[-2000:]
        assert not (tmp_path / "out-kill" / "calibration.cache").exists()
        entries = [p for p in (tmp_path / "store-kill").rglob("*") if p.is_file() and "lease" not in p.name]
        assert entries == [], entries
    print(f"node killed mid-build: exit {driver.returncode}; {len(killed)} processes killed")
