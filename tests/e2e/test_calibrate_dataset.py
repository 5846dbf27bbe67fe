"""`trtcal calibrate MODEL --data URL`, end to end: real photos as JPEG files, the real EfficientNet-Lite0,
real Ray (the embedded one the command starts, or the session's `ray_local`), a real S3 server.

Most runs are the command itself in a child process (`python -m trtcal calibrate …`), as a user or a
Ray Job runs it: its own embedded Ray, its own environment (which is how a preprocessing function
learns where its kill marker is). Runs that need to watch the job from inside (the actor's progress,
killing the actor at a known stage) call `calibrate_dataset` in this process on `ray_local`.

Every computed run is compared, as bytes, with the same baseline (`--workers 2`, local dataset,
local store): the artifacts depend on the photos, the model, the preprocessing result, the methods
and the micro-batch, not on where the data or the store live, how many workers ran, or what died.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from trtcal.config import BatchConfig, CalibrationConfig, JobConfig, StoreSettings
from trtcal.demo.demo import write_photo_dataset
from trtcal.orchestrator.job import calibrate_dataset
from trtcal.progress import RecordingProgress
from trtcal.storage import CacheStore

REPO_ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
VIEWS = 3  # 12 JPEGs
METHODS = ("entropy2", "minmax")
MICRO_BATCH = 4  # several micro-batches per pass: progress moves, and a kill lands mid-pass
JOB_ARGS = [
    "--preprocess", "efficientnet-lite", "--num-samples", "12", "--micro-batch", str(MICRO_BATCH),
    "-a", METHODS[0], "-a", METHODS[1],
]  # fmt: skip
# Byte-identical for the same inputs. manifest.json and entry.json also record timings and dates.
DETERMINISTIC = (
    "calibration.cache", "calibration.entropy2.cache", "calibration.minmax.cache", "ranges.json",
    "histograms.npy", "model.qdq.onnx",
)  # fmt: skip
CLI_TIMEOUT_S = 240

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# --------------------------------------------------------------------------- helpers


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        assert self.rc == 0, f"trtcal failed ({self.rc}):\n{self.stderr}"
        return dict(json.loads(self.stdout))


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",) and not k.startswith("AWS_")}
    env["TRTCAL_CACHE_DIR"] = str(tmp / "cache")
    env["PYTHONPATH"] = str(REPO_ROOT)  # Ray workers import tests.e2e.killer
    env.update(extra)
    return env


def _command(*args: str, check_no_ray: bool = False) -> list[str]:
    if not check_no_ray:
        return [sys.executable, "-m", "trtcal", *args]
    # The CLI in a fresh interpreter that reports afterwards whether Ray was ever imported.
    code = (
        "import sys\nfrom trtcal.cli import main\nrc = main(sys.argv[1:])\n"
        "sys.stderr.write('\\nRAY_IMPORTED=%s\\n' % ('ray' in sys.modules))\nsys.exit(rc)\n"
    )
    return [sys.executable, "-c", code, *args]


def trtcal(*args: str, env: dict[str, str], check_no_ray: bool = False) -> Run:
    done = subprocess.run(
        _command(*args, check_no_ray=check_no_ray), capture_output=True, text=True, env=env, cwd=REPO_ROOT,
        timeout=CLI_TIMEOUT_S, check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def artifacts(directory: Path | str) -> dict[str, bytes]:
    directory = Path(directory)
    return {name: (directory / name).read_bytes() for name in DETERMINISTIC}


def assert_same_artifacts(directory: Path | str, expected: dict[str, bytes]) -> None:
    got = artifacts(directory)
    different = [name for name in DETERMINISTIC if got[name] != expected[name]]
    assert not different, f"artifacts differ from the baseline: {different}"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    cmdline: str


def _processes() -> list[Proc]:
    """Every process on this machine, from /proc (Ray's process titles show in cmdline)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found.append(Proc(int(entry.name), int(fields[1]), fields[0], cmdline))
    return found


def alive(pid: int) -> bool:
    return any(p.pid == pid and p.state != "Z" for p in _processes())


def descendant(pid: int, text: str, process: subprocess.Popen[Any] | None = None, timeout: float = 120.0) -> int:
    """The pid of the first live process below `pid` whose command line (Ray's process title) contains `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = _processes()
        below, frontier = set(), {pid}
        while frontier:
            frontier = {p.pid for p in procs if p.ppid in frontier} - below
            below |= frontier
        for proc in procs:
            if proc.pid in below and proc.state != "Z" and text in proc.cmdline:
                return proc.pid
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the command ended ({process.returncode}) before a {text!r} process appeared: {process.stderr.read() if process.stderr else ''}")
        time.sleep(0.02)
    raise AssertionError(f"no {text!r} process below pid {pid} after {timeout}s")


def kill_and_wait(pid: int, timeout: float = 30.0) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} survived SIGKILL"
        time.sleep(0.02)


def processes_mentioning(text: str) -> list[str]:
    return [f"{p.pid}: {p.cmdline[:200]}" for p in _processes() if p.state != "Z" and text in p.cmdline]


def gone(text: str, timeout: float = 30.0) -> list[str]:
    """Processes still mentioning `text` once they have had `timeout` seconds to exit (expected: none)."""
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir (Ray's Unix sockets live below the embedded Ray's temp dir: ~107 bytes max)."""
    path = Path(tempfile.mkdtemp(prefix="trtcal-e2e-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photo_dataset(tmp_path_factory.mktemp("photos") / "images", PHOTOS, VIEWS, 0)


@dataclass(frozen=True)
class Baseline:
    result: dict[str, Any]
    store: Path
    output: Path
    artifacts: dict[str, bytes]


@pytest.fixture(scope="module")
def baseline(efficientnet_path: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    tmp = tmp_path_factory.mktemp("baseline")
    store, output = tmp / "store", tmp / "out"
    run = trtcal(
        "calibrate", str(efficientnet_path), "--data", str(photos), *JOB_ARGS, "--workers", "2", "--store", str(store),
        "--output", str(output), "--json", env=_env(tmp),
    )
    result = run.result
    assert not result["cache_hit"] and result["published"] and not result["batch_reused"]
    assert result["samples"] == 12 and result["tensors"] > 0 and result["algorithms"] == list(METHODS)
    return Baseline(result, store, output, artifacts(output))


# --------------------------------------------------------------------------- S3: compute, then a pure hit


def test_s3_store_first_run_computes_second_run_is_a_hit_without_ray_or_data(
    efficientnet_path: Path, s3_server: Any, photos: Path, baseline: Baseline, tmp_path: Path
) -> None:
    import s3fs

    bucket = s3_server.create_bucket()
    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    for path in sorted(photos.rglob("*.jpg")):
        fs.put_file(str(path), f"{bucket}/photos/{path.relative_to(photos).as_posix()}")
    data, store = f"s3://{bucket}/photos/", f"s3://{bucket}/store"
    credentials = [
        "--storage-option", f"endpoint_url={s3_server.endpoint_url}",
        "--storage-option", f"key={s3_server.key}", "--storage-option", f"secret={s3_server.secret}",
    ]  # fmt: skip

    first_run = trtcal(
        "calibrate", str(efficientnet_path), "--data", data, *JOB_ARGS, "--workers", "2", "--store", store, *credentials,
        "--output", str(tmp_path / "out1"), "--json", env=_env(tmp_path),
    )
    first = first_run.result
    # stderr is not a terminal: one line per stage with its time, and no Ray auth warning (issue 15 item 6).
    for stage in ("listing dataset", "starting Ray", "preprocessing", "pass 1: max |x|", "publishing"):
        assert re.search(rf"^trtcal: {re.escape(stage)} \d+\.\d\d s", first_run.stderr, re.MULTILINE), (stage, first_run.stderr)
    assert "RAY_AUTH_MODE" not in first_run.stderr and "opt out" not in first_run.stderr
    assert not first["cache_hit"] and first["published"] and first["store"] == store
    assert first["entry"].startswith(f"s3://{bucket}/store/")
    assert "preprocess" in first["timings_s"] and "calibrate" in first["timings_s"]
    # Same photos, model, preprocessing and methods: the same key and bytes as from the local folder.
    assert first["key"] == baseline.result["key"]
    assert_same_artifacts(tmp_path / "out1", baseline.artifacts)

    # Unchanged photos: a hit that lists the dataset (its digest is half the batch key; issue 15 item 1)
    # and preprocesses nothing, without Ray.
    second_run = trtcal(
        "calibrate", str(efficientnet_path), "--data", data, *JOB_ARGS, "--store", store, "--output", str(tmp_path / "out2"),
        "--json", check_no_ray=True,
        env=_env(tmp_path, AWS_ACCESS_KEY_ID=s3_server.key, AWS_SECRET_ACCESS_KEY=s3_server.secret,
                 AWS_ENDPOINT_URL=s3_server.endpoint_url),
    )
    second = second_run.result
    assert second["cache_hit"] and second["key"] == first["key"] and second["found_in"] == store
    assert set(second["timings_s"]) == {"list_dataset", "total"}, second["timings_s"]  # no preprocess, calibrate, publish
    assert "RAY_IMPORTED=False" in second_run.stderr  # no Ray session: Ray was not even imported
    assert artifacts(tmp_path / "out2") == artifacts(tmp_path / "out1")
    assert json.loads((tmp_path / "out2" / "entry.json").read_text())["key"] == first["key"]

    # Credentials reach no artifact, no stored manifest, no output.
    secret = s3_server.secret.encode()
    for directory in (tmp_path / "out1", tmp_path / "out2"):
        for path in directory.iterdir():
            assert secret not in path.read_bytes(), path
    for path in fs.find(f"{bucket}/store"):
        assert secret not in fs.cat_file(path), path
    assert s3_server.secret not in second_run.stdout + second_run.stderr


# --------------------------------------------------------------------------- parallelism and faults


def test_one_and_two_workers_publish_the_same_key_and_bytes(efficientnet_path: Path, photos: Path, baseline: Baseline, tmp_path: Path) -> None:
    store = tmp_path / "store"
    one = trtcal(
        "calibrate", str(efficientnet_path), "--data", str(photos), *JOB_ARGS, "--workers", "1", "--store", str(store),
        "--output", str(tmp_path / "out"), "--json", env=_env(tmp_path),
    ).result
    assert not one["cache_hit"] and one["published"]
    assert (one["key"], one["batch_key"]) == (baseline.result["key"], baseline.result["batch_key"])
    assert_same_artifacts(tmp_path / "out", baseline.artifacts)
    # The stored entries hold the same bytes too: the batch, and every deterministic artifact.
    mine, theirs = CacheStore(str(store)), CacheStore(str(baseline.store))
    assert mine.get(one["batch_key"]).read("batch.arrow") == theirs.get(one["batch_key"]).read("batch.arrow")
    for name in DETERMINISTIC:
        assert mine.get(one["key"]).read(name) == theirs.get(one["key"]).read(name), name


def test_a_preprocessing_worker_killed_mid_run_changes_nothing(efficientnet_path: Path, photos: Path, baseline: Baseline, tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    run = trtcal(
        "calibrate", str(efficientnet_path), "--data", str(photos), *JOB_ARGS, "--preprocess", "tests.e2e.killer:preprocess",
        "--workers", "2", "--store", str(tmp_path / "store"), "--output", str(tmp_path / "out"), "--json",
        env=_env(tmp_path, TRTCAL_TEST_KILL_MARKER=str(marker)),
    )
    result = run.result
    killed_pid = int(marker.read_text())  # a worker really died: it wrote its pid, then SIGKILLed itself
    assert not alive(killed_pid)
    # The only warning is the quality verdict's (entropy2, written first, is judged on 12 photos).
    assert result["samples"] == 12 and all(w.startswith("the written default") for w in result["warnings"])
    # Ray retried the dead worker's chunk: the batch holds the same rows, so the same artifacts.
    assert_same_artifacts(tmp_path / "out", baseline.artifacts)


class KillActorOnce:
    """Progress callback that SIGKILLs the calibration actor's process when pass 1 first advances."""

    def __init__(self) -> None:
        self.recording = RecordingProgress()
        self.killed: int | None = None

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        self.recording.start(stage, total, unit)

    def advance(self, stage: str, n: int = 1) -> None:
        self.recording.advance(stage, n)
        if stage == "statistics" and self.killed is None:
            actor = descendant(os.getpid(), "CalibrationActor", timeout=10)
            kill_and_wait(actor)
            self.killed = actor

    def finish(self, stage: str) -> None:
        self.recording.finish(stage)


def test_the_calibration_actor_killed_mid_run_is_restarted_and_changes_nothing(
    efficientnet_path: Path, ray_local: Any, photos: Path, baseline: Baseline, tmp_path: Path
) -> None:
    progress = KillActorOnce()
    config = JobConfig(
        batch=BatchConfig(num_samples=12, preprocess="efficientnet-lite"), store=StoreSettings(url=str(tmp_path / "store")),
        output=str(tmp_path / "out"),
        calibration=CalibrationConfig(algorithms=METHODS, micro_batch=MICRO_BATCH),
    )
    result = calibrate_dataset(str(efficientnet_path), str(photos), config=config, progress=progress)
    assert progress.killed is not None
    events = progress.recording.events
    # The driver saw the actor's passes (relayed from its process), and pass 1 begin again after the kill.
    assert [e for e in events if e[0] == "start" and e[1] == "statistics"] == [("start", "statistics", 12)] * 2
    started = [e[1] for e in events if e[0] == "start"]
    assert started[-6:] == ["statistics", "histograms", "search", "verdict", "export", "publish"]
    advanced = sum(e[2] for e in events if e[0] == "advance" and e[1] == "histograms")
    assert advanced == 12  # pass 2 ran once, after the restart, over every sample
    assert not result.cache_hit and result.published and result.key == baseline.result["key"]
    assert_same_artifacts(tmp_path / "out", baseline.artifacts)


# --------------------------------------------------------------------------- errors


def test_device_gpu_on_a_gpu_less_cluster_fails_at_once_with_exit_2(efficientnet_path: Path, photos: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run = trtcal(
        "calibrate", str(efficientnet_path), "--data", str(photos), *JOB_ARGS, "--device", "gpu", "--store", str(store),
        "--output", str(tmp_path / "out"), "--json",
        env=_env(tmp_path, CUDA_VISIBLE_DEVICES=""),  # GPU-less even on a machine that has one
    )
    assert run.rc == 2, run.stderr
    error = json.loads(run.stdout)["error"]
    assert error["type"] == "BackendUnavailableError"
    assert "--device gpu" in error["message"] and "no GPU" in error["message"]
    assert f"trtcal: error: {error['message']}" in run.stderr and "Traceback" not in run.stderr
    # It failed before any work: nothing preprocessed, nothing stored, no output.
    assert not (tmp_path / "out").exists()
    assert CacheStore(str(store)).ls() == []


def _error_paragraph(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.startswith("trtcal: error: "))
    return "\n".join(lines[start:])


def test_an_error_inside_ray_workers_is_one_paragraph_not_a_ray_traceback(efficientnet_path: Path, photos: Path, tmp_path: Path) -> None:
    run = trtcal(
        "calibrate", str(efficientnet_path), "--data", str(photos), *JOB_ARGS, "--preprocess", "no_such_module_4f2a:preprocess",
        "--store", str(tmp_path / "store"), "--output", str(tmp_path / "out"), env=_env(tmp_path),
    )
    assert run.rc == 2, run.stderr
    paragraph = _error_paragraph(run.stderr)
    assert "no_such_module_4f2a" in paragraph and "importable" in paragraph
    for noise in ("Traceback", "RayTaskError", "ray::", "File \""):
        assert noise not in run.stderr, f"{noise!r} in stderr:\n{run.stderr}"
    assert not (tmp_path / "out").exists()


def test_an_error_in_the_calibration_actor_is_one_paragraph_and_v_shows_the_traceback(
    efficientnet_path: Path, baseline: Baseline, photos: Path, tmp_path: Path
) -> None:
    # The baseline store holds this dataset's batch: the job goes straight to the actor, which fails.
    args = [
        "calibrate", str(efficientnet_path), "--data", str(photos), *JOB_ARGS, "--tensors", "no_such_tensor",
        "--store", str(baseline.store), "--read-only", "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    quiet = trtcal(*args, env=_env(tmp_path))
    assert quiet.rc == 2, quiet.stderr
    paragraph = _error_paragraph(quiet.stderr)
    assert "no_such_tensor" in paragraph, quiet.stderr
    for noise in ("Traceback", "RayTaskError", "ray::", "File \""):
        assert noise not in quiet.stderr, f"{noise!r} in stderr:\n{quiet.stderr}"

    verbose = trtcal(*args, "-v", env=_env(tmp_path))
    assert verbose.rc == 2
    assert "Traceback" in verbose.stderr and "no_such_tensor" in verbose.stderr
    assert "run_calibration" in verbose.stderr  # the frames inside the actor, not only the driver's
    assert _error_paragraph(verbose.stderr).startswith(paragraph.splitlines()[0])
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- stores


def test_read_from_another_store_is_a_hit_that_writes_nothing_locally(
    efficientnet_path: Path, baseline: Baseline, photos: Path, tmp_path: Path
) -> None:
    local = tmp_path / "team-store"
    run = trtcal(
        "calibrate", str(efficientnet_path), "--data", str(photos), *JOB_ARGS, "--store", str(local),
        "--read-from", str(baseline.store), "--output", str(tmp_path / "out"), env=_env(tmp_path),
    )
    assert run.rc == 0, run.stderr
    assert "cache hit in read-from store" in run.stdout and str(baseline.store) in run.stdout
    assert baseline.result["key"] in run.stdout
    assert_same_artifacts(tmp_path / "out", baseline.artifacts)
    assert not local.exists() or not [p for p in local.rglob("*") if p.is_file()]


def test_a_read_only_store_computes_without_publishing(
    efficientnet_path: Path, ray_local: Any, baseline: Baseline, photos: Path, tmp_path: Path
) -> None:
    store = tmp_path / "readonly-store"
    progress = RecordingProgress()
    config = JobConfig(
        batch=BatchConfig(num_samples=12, preprocess="efficientnet-lite"), store=StoreSettings(url=str(store), read_only=True),
        output=str(tmp_path / "out"), calibration=CalibrationConfig(algorithms=METHODS, micro_batch=MICRO_BATCH),
    )
    result = calibrate_dataset(str(efficientnet_path), str(photos), config=config, progress=progress)
    assert not result.cache_hit and not result.published and result.key == baseline.result["key"]
    assert any("read-only" in w for w in result.warnings)
    assert_same_artifacts(tmp_path / "out", baseline.artifacts)
    assert not store.exists() or not [p for p in store.rglob("*") if p.is_file()]
    # Every stage of a computed run reached this process, in order, each one closed.
    started = [e[1] for e in progress.events if e[0] == "start"]
    assert started == [
        "list dataset", "start Ray", "list", "preprocess", "write", "statistics", "histograms", "search", "verdict", "export", "publish",
    ]
    assert [e[1] for e in progress.events if e[0] == "finish"] == started
    assert sum(e[2] for e in progress.events if e[0] == "advance" and e[1] == "preprocess") == 12
    assert sum(e[2] for e in progress.events if e[0] == "advance" and e[1] == "statistics") == 12


# --------------------------------------------------------------------------- --output is never half-written


def test_interrupted_run_leaves_output_and_store_whole_and_the_retry_reuses_the_batch(
    efficientnet_path: Path, baseline: Baseline, photos: Path, tmp_path: Path, short_tmp: Path
) -> None:
    store, output = tmp_path / "store", tmp_path / "out"
    shutil.copytree(baseline.output, output)  # a complete earlier result that must survive
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    args = [
        "calibrate", str(efficientnet_path), "--data", str(photos), *JOB_ARGS, "--store", str(store), "--output", str(output),
        "--json",
    ]  # fmt: skip
    env = _env(tmp_path, TMPDIR=str(short_tmp))
    process = subprocess.Popen(
        _command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT
    )
    try:
        # Ctrl-C once the job is in the calibration stage (the batch is built and stored by then).
        descendant(process.pid, "CalibrationActor", process)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert sorted(p.name for p in output.parent.iterdir() if p.name.startswith(".out")) == []
    entries = CacheStore(str(store))
    assert entries.get(baseline.result["key"]) is None  # nothing half-published
    assert entries.get(baseline.result["batch_key"]) is not None  # the finished stage was kept
    assert gone(str(short_tmp)) == []  # the embedded Ray went with the command

    retry = trtcal(*args, env=env).result
    assert retry["batch_reused"] and not retry["cache_hit"] and "preprocess" not in retry["timings_s"]
    assert retry["key"] == baseline.result["key"]
    assert_same_artifacts(output, baseline.artifacts)
