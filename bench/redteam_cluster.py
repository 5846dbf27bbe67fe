"""bench/redteam.py's cases for issue 15 items 9 (`trtcal submit` credentials) and 10 (multi-node Ray).

The multi-node cases run a real cluster on this host (`ray.cluster_utils.Cluster` raylets started by
a child process: a head without CPUs and worker nodes of 2 CPUs, helpers of
tests/integration/test_multinode.py), a real SeaweedFS S3 server and real `trtcal calibrate` drivers.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.redteam import SECRET, Outcome, trtcal


def _closed_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _submit_case(words: list[str]) -> Callable[[Path], None]:
    def case(work: Path) -> None:
        """item 9: the credential must be refused before trtcal ever connects; reaching the (closed) address
        means it would have been sent as the job's entrypoint."""
        done = trtcal("submit", "--address", _closed_address(), "--no-follow", "--", "calibrate", "m.onnx",
                      "--data", "s3://b/x/", *words, timeout=60)
        if SECRET in done.stdout + done.stderr:
            raise Outcome("silent-wrong", "the secret was printed")
        if done.returncode == 2 and "credentials" in done.stderr:
            return
        raise Outcome("silent-wrong", f"not refused (it tried to submit): {done.stderr.strip()[-160:]}")

    return case


SUBMIT_CASES = [
    ("9  submit -- … --storage secret=… (abbreviated flag)", _submit_case(["--storage", f"secret={SECRET}"])),
    ("9  submit -- … --storage-opt=secret=…", _submit_case([f"--storage-opt=secret={SECRET}"])),
    ("9  submit -- … JSON client_kwargs with a secret",
     _submit_case(["--storage-option", "client_kwargs=" + json.dumps({"aws_secret_access_key": SECRET})])),
]


@contextlib.contextmanager
def _s3_and_photos(work: Path):  # type: ignore[no-untyped-def]
    from tests.fixtures.s3 import running_server
    from tests.integration import test_multinode as mn

    with running_server(work / "s3", graceful=False) as s3:
        yield s3, mn._photos_on_s3(work, s3)


def case_credentials_reach_other_node(work: Path) -> None:
    """item 10: AWS_* in the driver only; tasks and actor on a node without them; the secret nowhere else."""
    from tests.integration import test_multinode as mn

    with _s3_and_photos(work) as (s3, bucket), mn._two_nodes() as cluster:
        done = mn._driver(cluster, s3, work, bucket, {"AWS_ACCESS_KEY_ID": s3.key, "AWS_SECRET_ACCESS_KEY": s3.secret})
        lines = mn._cmdlines([cluster.process.pid])
        logs = mn._files_holding(cluster.temp_dir, s3.secret.encode())
        stored = mn._bucket_bytes(s3, bucket) if done.returncode == 0 else {}
    where = [f"{len(logs)} Ray log file(s)"] if logs else []
    where += ["a command line"] if any(s3.secret in line for line in lines) else []
    where += ["the store"] if any(s3.secret.encode() in data for data in stored.values()) else []
    where += ["trtcal's output"] if s3.secret in done.stdout + done.stderr else []
    if where:
        raise Outcome("silent-wrong", "the secret is in " + ", ".join(where))
    if done.returncode != 0:
        raise Outcome("crashed", f"the job failed: {done.stderr.strip()[-200:]}")
    if not (work / "out" / "calibration.cache").is_file():
        raise Outcome("crashed", "no calibration.cache")


def case_workers_without_credentials(work: Path) -> None:
    """item 10: credentials the driver cannot hand over (a credentials file of its node): one clear error."""
    from tests.integration import test_multinode as mn

    creds = work / "aws-credentials"
    with _s3_and_photos(work) as (s3, bucket), mn._two_nodes() as cluster:
        creds.write_text(f"[default]\naws_access_key_id = {s3.key}\naws_secret_access_key = {s3.secret}\n")
        done = mn._driver(cluster, s3, work, bucket, {"AWS_SHARED_CREDENTIALS_FILE": str(creds)})
    if done.returncode == 0:
        raise Outcome("silent-wrong", "exit 0")
    error = done.stderr.rpartition("trtcal: error: ")[2]
    if done.returncode != 2 or not error.startswith(f"Ray workers cannot read s3://{bucket}/photos/"):
        raise Outcome("crashed", f"exit {done.returncode}: {error[:200]}")


def case_node_killed_mid_build(work: Path) -> None:
    """item 10: a worker node SIGKILLed while build tasks run on it: identical bytes or a clean failure."""
    from tests.integration import test_multinode as mn
    from tests.reliability.tiny_cnn import tiny_cnn
    from trtcal.demo.demo import write_photo_dataset

    (work / "tiny224.onnx").write_bytes(tiny_cnn(side=224).SerializeToString())
    write_photo_dataset(work / "photos", ("astronaut", "coffee"), 16, 0)
    env = mn._plain_env()
    with mn._two_nodes(workers=2) as cluster:
        ref = subprocess.run(mn._calibrate_argv(cluster, work, "ref"), env=env, capture_output=True, text=True,
                             timeout=420, cwd=mn.REPO_ROOT)
        if ref.returncode != 0:
            raise Outcome("crashed", f"undisturbed run: {ref.stderr.strip()[-200:]}")
        driver = subprocess.Popen(mn._calibrate_argv(cluster, work, "kill"), env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=mn.REPO_ROOT)
        victim, deadline = None, time.monotonic() + 120
        while victim is None and driver.poll() is None and time.monotonic() < deadline:
            victim = mn._running_task(cluster.worker_raylets, "_process_task")
            time.sleep(0.05)
        if victim is not None:
            mn._kill_node(victim)
        try:
            _, err = driver.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            driver.send_signal(signal.SIGKILL)
            driver.communicate()
            raise Outcome("hung", "the driver did not finish after the node was killed") from None
    if victim is None:
        raise Outcome("crashed", "no build task seen on a worker node (nothing was killed)")
    if driver.returncode == 0:
        differ = mn._same_bytes(work)
        if differ:
            raise Outcome("silent-wrong", f"{differ} differ from the undisturbed run")
        raise Outcome("ok", "Ray reran the lost tasks: identical bytes")
    if driver.returncode != 2 or (work / "out-kill" / "calibration.cache").exists():
        raise Outcome("crashed", f"exit {driver.returncode}: {err.strip()[-200:]}")
    raise Outcome("ok", f"clean failure: {err.strip().splitlines()[-1][:160]}")


CLUSTER_CASES = [
    ("10 driver's AWS_* reach tasks+actor on another node; secret in no log/cmdline/object", case_credentials_reach_other_node),
    ("10 workers cannot get the credentials: one clear error", case_workers_without_credentials),
    ("10 worker node SIGKILLed mid-build", case_node_killed_mid_build),
]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("run bench/redteam.py")
