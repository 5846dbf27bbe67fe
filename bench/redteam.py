"""Red team for issue 15: every trap a user or an attacker hit, tried for real and classified.

Each case runs real `trtcal` processes (or the real library where a CLI run would need Ray) on
real files, and lands in exactly one outcome:

    ok            the right result, or a clear trtcal error (exit 2, or the documented exit 1)
    silent-wrong  exit 0 (or no error) with a wrong result: the worst class
    files-lost    a user's file in the output folder is gone afterwards
    hung          no answer within the case's timeout (the process is killed by PID)
    leaked        temporary files or staging data left behind after the case (and `gc`)
    crashed       any other exception / exit code (an internal error, a traceback)

Imported by bench/stress.py (phase "redteam"); runnable alone:
    .venv/bin/python bench/redteam.py [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

OUTCOMES = ("ok", "silent-wrong", "files-lost", "hung", "leaked", "crashed")
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


class Outcome(Exception):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def trtcal(*argv: str, timeout: float = 60.0, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m trtcal ARGV` in its own session; a run past `timeout` is killed by PID and counts as hung."""
    child = subprocess.Popen([sys.executable, "-m", "trtcal", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=_env(), cwd=cwd, start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise Outcome("hung", f"trtcal {' '.join(argv)[:80]}: no answer in {timeout:.0f}s") from None
    if child.returncode not in (0, 1, 2):
        raise Outcome("crashed", f"exit {child.returncode}: {err.strip()[-200:]}")
    if "internal error" in err or ("Traceback" in err and "-vv" not in argv):  # -vv prints the traceback of a clear error too
        raise Outcome("crashed", err.strip()[-200:])
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def expect_error(done: subprocess.CompletedProcess[str], *words: str, code: int = 2) -> None:
    if done.returncode == 0:
        raise Outcome("silent-wrong", f"exit 0: {done.stderr.strip()[-160:]}")
    if done.returncode != code:
        raise Outcome("crashed", f"exit {done.returncode}, not {code}: {done.stderr.strip()[-160:]}")
    missing = [w for w in words if w not in done.stderr]
    if missing:  # a clear error all the same, in other words
        raise Outcome("ok", f"(message without {missing}: {done.stderr.strip()[-120:]})")


# --- the cases ----------------------------------------------------------------------------------


def _two_method_store(work: Path) -> tuple[str, str, dict[str, float], dict[str, float]]:
    from trtcal.core import write_trt_cache
    from trtcal.storage import CacheStore, compute_cache_key

    entropy2, minmax = {"input": 2.0, "c1": 5.5}, {"input": 2.5, "c1": 9.25}
    inputs = {"model_sha256": "ab" * 32, "algorithm": "entropy2+minmax", "batch_fingerprint": "b"}
    key = compute_cache_key(inputs)
    store = str(work / "store-two-methods")
    e2 = write_trt_cache(entropy2, trt_version="10.3.0", algorithm="entropy2")
    files = {"calibration.cache": e2, "calibration.entropy2.cache": e2,
             "calibration.minmax.cache": write_trt_cache(minmax, trt_version="10.3.0", algorithm="minmax")}
    CacheStore(store).publish(key, files, key_inputs=inputs)
    return store, key, entropy2, minmax


def case_export_method(work: Path) -> None:
    """item 2: `cache export --method minmax` of an entropy2+minmax entry."""
    from trtcal.core import read_trt_cache, write_trt_cache

    store, key, _e2, minmax = _two_method_store(work)
    out = work / "minmax.cache"
    done = trtcal("cache", "export", store, "--key", key, "--method", "minmax", "--trt-version", "10.16.1", "-o", str(out))
    if done.returncode != 0:
        raise Outcome("crashed", done.stderr[-200:])
    want = read_trt_cache(write_trt_cache(minmax, trt_version="10.3.0", algorithm="minmax")).scale
    if read_trt_cache(out.read_bytes()).scale != want:
        raise Outcome("silent-wrong", "--method minmax exported other scales under a MinMax header")


def case_export_missing_method(work: Path) -> None:
    """item 2: `--method percentile` of an entry without percentile scales."""
    store, key, _e2, _mm = _two_method_store(work)
    out = work / "p.cache"
    expect_error(trtcal("cache", "export", store, "--key", key, "--method", "percentile", "--trt-version", "10.16.1",
                        "-o", str(out)), "no percentile scales", "entropy2, minmax")
    if out.exists():
        raise Outcome("silent-wrong", "a file was written anyway")


def _tiny_model(work: Path) -> Path:
    from tests.reliability.tiny_cnn import write_tiny_cnn

    path = work / "tiny.onnx"
    if not path.exists():
        write_tiny_cnn(path)
    return path


def case_denormal_scale(work: Path) -> None:
    """item 4: a cache whose scale for a model tensor is a denormal -> Q/DQ export."""
    cache = work / "denormal.cache"
    cache.write_bytes(b"TRT-8601-EntropyCalibration2\ninput: 3c010a14\nc1: 00000001\nr1: 3c810a14\nr2: 3c810a14\n")
    expect_error(trtcal("export", "qdq", str(_tiny_model(work)), "--from-cache", str(cache), "-o", str(work / "q.onnx")),
                 "denormal", "'c1'")


def case_cache_of_another_model(work: Path) -> None:
    """item 4: a cache that names none of the model's tensors -> Q/DQ export."""
    from trtcal.core import write_trt_cache

    cache = work / "other.cache"
    cache.write_bytes(write_trt_cache({"input.1": 2.0, "conv_0": 3.0, "relu_0": 4.0}, trt_version="10.3.0", algorithm="entropy2"))
    out = work / "q-other.onnx"
    expect_error(trtcal("export", "qdq", str(_tiny_model(work)), "--from-cache", str(cache), "-o", str(out)),
                 "0 of them in this model")
    if out.exists():
        raise Outcome("silent-wrong", "a Q/DQ model was written anyway")


def case_manual_range_unknown_tensor(work: Path) -> None:
    """item 4: a manual range for a tensor the model does not have (library calibrate, no Ray)."""
    from tests.reliability.tiny_cnn import tiny_batch
    from trtcal import calibrate
    from trtcal.errors import TrtcalError

    try:
        calibrate(str(_tiny_model(work)), tiny_batch(8), algorithms=["minmax"], manual_ranges={"no_such_tensor": 3.0})
    except TrtcalError as exc:
        if "no_such_tensor" not in str(exc):
            raise Outcome("crashed", f"error does not name the tensor: {exc}") from None
        return
    raise Outcome("silent-wrong", "a manual range for a tensor the model lacks was accepted")


def case_put_existing_key(work: Path) -> None:
    """item 4: `cache put` onto a key that exists."""
    store, _key, _e2, _mm = _two_method_store(work)
    (work / "inputs.json").write_text(json.dumps({"model_sha256": "ab" * 32, "algorithm": "entropy2+minmax", "batch_fingerprint": "b"}))
    (work / "calibration.cache").write_bytes(b"TRT-100300-MinMaxCalibration\ninput: 3c010a14\n")
    done = trtcal("cache", "put", store, "--key-inputs", str(work / "inputs.json"), str(work / "calibration.cache"))
    if done.returncode == 0 or "published" in done.stderr:
        raise Outcome("silent-wrong", f"exit {done.returncode}: {done.stderr.strip()[-160:]}")
    expect_error(done, "already exists", "nothing was stored", code=1)


def _store_path_case(kind: str) -> Callable[[Path], None]:
    def case(work: Path) -> None:
        for command in ("ls", "verify"):
            if kind == "missing":
                path, words = work / "typo-store", ("does not exist",)
            elif kind == "file":
                path, words = work / "a-file", ("not a directory",)
                path.write_text("x")
            else:
                path, words = work / "photos", ("not a trtcal store",)
                path.mkdir(exist_ok=True)
                (path / "cat.jpg").write_bytes(b"x")
            expect_error(trtcal("cache", command, str(path)), *words)

    case.__doc__ = f"item 5: `cache ls` and `cache verify` on a {kind} path"
    return case


def case_symlinked_manifest(work: Path) -> None:
    """item 5: a manifest replaced by a symlink to a copy of itself -> `cache verify`."""
    store, key, _e2, _mm = _two_method_store(work)
    manifest = next(Path(store).rglob(f"{key}.json"))
    copy = work / "manifest-copy.json"
    copy.write_bytes(manifest.read_bytes())
    manifest.unlink()
    manifest.symlink_to(copy)
    expect_error(trtcal("cache", "verify", store), code=1)


def _put_non_regular(kind: str) -> Callable[[Path], None]:
    def case(work: Path) -> None:
        (work / "inputs.json").write_text(json.dumps({"model_sha256": "cd" * 32, "algorithm": "minmax"}))
        if kind == "fifo":
            source = work / "pipe"
            if not source.exists():
                os.mkfifo(source)
        else:
            source = Path("/dev/zero")
        store = work / f"store-{kind}"
        expect_error(trtcal("cache", "put", str(store), "--key-inputs", str(work / "inputs.json"), f"x={source}", timeout=30),
                     "regular file")
        left = [p for p in store.rglob("*") if p.is_file()] if store.exists() else []
        if left:
            raise Outcome("leaked", f"{len(left)} file(s) left in the store")

    case.__doc__ = f"item 9: `cache put x={'a FIFO nobody writes' if kind == 'fifo' else '/dev/zero'}`"
    return case


def case_url_credentials(work: Path) -> None:
    """item 9: `s3://KEY:SECRET@bucket` as a store URL (with -vv)."""
    done = trtcal("-vv", "cache", "ls", f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/calib", timeout=60)
    if SECRET in done.stdout + done.stderr:
        raise Outcome("silent-wrong", "the secret was printed")
    expect_error(done, "credentials in the URL")


def case_report_mode(work: Path) -> None:
    """item 9: an exported file's mode under umask 022 (was 0600)."""
    from trtcal.export.qdq import write_bytes_atomic

    old = os.umask(0o022)
    try:
        path = write_bytes_atomic(work / "report.html", b"<html></html>")
    finally:
        os.umask(old)
    mode = os.stat(path).st_mode & 0o777
    if mode != 0o644:
        raise Outcome("silent-wrong", f"written {oct(mode)}")


def case_npz_bomb(work: Path) -> None:
    """item 9: a ~2 MB .npz that inflates to 2 GiB (one 2 GiB row), 8 samples asked, in a 1.5 GiB address-space child."""
    bomb = work / "bomb.npz"
    if not bomb.exists():
        _write_zero_npz(bomb, rows=1, row_bytes=2 << 30)
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30));"
        f"sys.path.insert(0, {str(REPO_ROOT)!r});"
        "from trtcal.workers.sources import open_dataset, plan_shards, list_shard, read_container_rows;"
        f"d = open_dataset({str(bomb)!r}); ls = [list_shard(d, s) for s in plan_shards(d).shards];"
        "print('REFUSED' if not ls[0].paths and ls[0].refused else 'LISTED');"
        f"rows = list(read_container_rows(d.filesystem(), {str(bomb)!r}, 'npz', list(range(1)), 'input'))"
    )
    pattern = os.path.join(tempfile.gettempdir(), "*trtcal*")
    before = set(glob.glob(pattern))
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    except subprocess.TimeoutExpired:
        raise Outcome("hung", "the bomb took over 120 s") from None
    leaked = set(glob.glob(pattern)) - before
    if not done.stdout.startswith("REFUSED"):
        raise Outcome("silent-wrong" if done.returncode == 0 else "crashed", (done.stdout + done.stderr)[-200:])
    if "InputRejected" not in done.stderr or "MemoryError" in done.stderr:
        raise Outcome("crashed", done.stderr[-200:])
    if leaked:
        raise Outcome("leaked", f"{sorted(leaked)[:3]}")


def _write_zero_npz(path: Path, *, rows: int, row_bytes: int) -> None:
    """A real deflated .npz member of zeros, streamed (never 2 GiB in memory)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (rows, row_bytes)})
    chunk = bytes(64 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        with archive.open(zipfile.ZipInfo("input.npy"), "w", force_zip64=True) as member:
            member.write(header.getvalue())
            left = rows * row_bytes
            while left:
                member.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))


def case_forged_jpeg(work: Path) -> None:
    """item 9: a JPEG whose header claims 9000x9000 over ~24 KB of data."""
    from PIL import Image

    from trtcal.workers.preprocess import InputRejected, decode_image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 9000, 9000)
    try:
        decode_image(bytes(data))
    except InputRejected:
        return
    raise Outcome("silent-wrong", "decoded to a (mostly grey) 9000x9000 sample")


def case_output_folder_user_files(work: Path) -> None:
    """item 3: calibrate again into an earlier output folder the user added notes.txt and `trtcal eval`'s
    evaluation.json to (library calibrate: no Ray); and into a foreign non-empty folder."""
    from tests.reliability.tiny_cnn import tiny_batch
    from trtcal import calibrate
    from trtcal.errors import TrtcalError

    out = work / "calib-out"
    calibrate(str(_tiny_model(work)), tiny_batch(8), algorithms=["minmax"], output_dir=str(out))
    (out / "notes.txt").write_text("mine")
    (out / "evaluation.json").write_text("{}")
    calibrate(str(_tiny_model(work)), tiny_batch(8, seed=1), algorithms=["minmax"], output_dir=str(out))
    lost = [n for n in ("notes.txt", "evaluation.json") if not (out / n).exists()]
    foreign = work / "photos"
    foreign.mkdir(exist_ok=True)
    (foreign / "cat.jpg").write_bytes(b"x")
    try:
        calibrate(str(_tiny_model(work)), tiny_batch(8), algorithms=["minmax"], output_dir=str(foreign))
    except TrtcalError:
        pass  # refused: right
    if not (foreign / "cat.jpg").exists():
        lost.append("cat.jpg")
    if lost:
        raise Outcome("files-lost", f"{lost} deleted")


def case_sigkill_put_then_gc(work: Path) -> None:
    """leaks: `cache put` of 512 MiB SIGKILLed mid-upload, then `cache gc --orphan-grace 0s`."""
    big = work / "big.bin"
    with open(big, "wb") as f:
        f.truncate(512 << 20)
    (work / "inputs-big.json").write_text(json.dumps({"model_sha256": "ef" * 32, "algorithm": "minmax"}))
    store = work / "store-kill"
    child = subprocess.Popen([sys.executable, "-m", "trtcal", "cache", "put", str(store), "--key-inputs",
                              str(work / "inputs-big.json"), str(big)], env=_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.is_file() for p in store.rglob("*")):
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    if not store.exists():
        raise Outcome("crashed", "the put never started writing")
    done = trtcal("cache", "gc", str(store), "--orphan-grace", "0s")
    if done.returncode != 0:
        raise Outcome("crashed", done.stderr[-200:])
    left = [p for p in store.rglob("*") if p.is_file()]
    if left:
        raise Outcome("leaked", f"{len(left)} file(s), {sum(p.stat().st_size for p in left)} bytes left after gc")
    big.unlink()


def case_batch_key_relative_path(work: Path) -> None:
    """item 1: two projects both run `--data ./images/` (different photos): the second must not get the first's batch."""
    from tests.reliability.tiny_cnn import write_tiny_cnn
    from trtcal.config import JobConfig
    from trtcal.orchestrator.job import Job

    model = write_tiny_cnn(work / "m.onnx")
    keys = []
    cwd = os.getcwd()
    try:
        for project in ("a", "b"):
            (work / project / "images" / "cls").mkdir(parents=True, exist_ok=True)
            (work / project / "images" / "cls" / "0.jpg").write_bytes(project.encode())
            os.chdir(work / project)
            keys.append(Job.open(model, "./images/", JobConfig().with_options(store=str(work / "store"))).batch_key)
    finally:
        os.chdir(cwd)
    if keys[0] == keys[1]:
        raise Outcome("silent-wrong", "both projects map to one batch key")


def case_batch_key_changed_images(work: Path) -> None:
    """item 1: images changed in place under the same URL must not hit the old batch."""
    from tests.reliability.tiny_cnn import write_tiny_cnn
    from trtcal.config import JobConfig
    from trtcal.orchestrator.job import Job

    model = write_tiny_cnn(work / "m.onnx")
    photo = work / "images" / "cls" / "0.jpg"
    photo.parent.mkdir(parents=True, exist_ok=True)
    photo.write_bytes(b"before")
    cfg = JobConfig().with_options(store=str(work / "store"))
    before = Job.open(model, str(work / "images"), cfg).batch_key
    photo.write_bytes(b"after!")
    os.utime(photo, ns=(time.time_ns(), time.time_ns() + 10**6))
    if Job.open(model, str(work / "images"), cfg).batch_key == before:
        raise Outcome("silent-wrong", "changed images keep the old batch key")


def case_unwritable_store_before_work(work: Path) -> None:
    """item 7: a store that cannot be written fails in seconds, before Ray and any preprocessing."""
    from tests.reliability.tiny_cnn import write_tiny_cnn

    model = write_tiny_cnn(work / "m.onnx")
    (work / "images" / "cls").mkdir(parents=True, exist_ok=True)
    (work / "images" / "cls" / "0.jpg").write_bytes(b"x")
    (work / "a-file").write_text("x")
    started = time.perf_counter()
    done = trtcal("calibrate", str(model), "--data", str(work / "images"), "--store", str(work / "a-file" / "store"), timeout=120)
    expect_error(done, "cannot publish to store")
    if "starting Ray" in done.stderr or time.perf_counter() - started > 30:
        raise Outcome("silent-wrong", f"found only after {time.perf_counter() - started:.0f} s")


def _ray_leftovers(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _owned_by(pid: int) -> list[str]:
    """trtcal temp dirs whose owner file names `pid`."""
    out = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "trtcal-*")):
        with contextlib.suppress(OSError):
            if Path(path, ".trtcal-owner").read_text().strip() == str(pid):
                out.append(path)
    return out


def case_sigkill_calibrate_then_next_run(work: Path) -> None:
    """leaks: `trtcal calibrate` SIGKILLed while it preprocesses, then run again; its temp dirs and Ray
    processes are counted after the next run and once more 150 s later (its Ray processes exit on their own)."""
    from tests.reliability.tiny_cnn import tiny_cnn
    from trtcal.demo.demo import write_photo_dataset

    model = work / "tiny224.onnx"
    model.write_bytes(tiny_cnn(side=224).SerializeToString())
    photos = write_photo_dataset(work / "photos", ("astronaut", "coffee", "chelsea"), 4, 0)
    argv = [sys.executable, "-m", "trtcal", "calibrate", str(model), "--data", str(photos), "--num-samples", "12",
            "--workers", "1", "--device", "cpu", "--store", str(work / "store"), "--output", str(work / "out")]
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    deadline = time.monotonic() + 180
    assert child.stderr is not None
    for line in child.stderr:
        if line.startswith("trtcal: starting Ray") or time.monotonic() > deadline:
            break
    time.sleep(1.0)
    child.kill()  # SIGKILL the driver only: Ray's processes of that run are orphaned, as after an OOM kill
    child.wait()
    killed = child.pid
    ray_dirs: list[str] = []
    try:
        done = trtcal(*argv[3:], timeout=300)
        if done.returncode != 0:
            raise Outcome("crashed", done.stderr[-200:])
        left = _owned_by(killed)
        ray_dirs = [d for d in left if "trtcal-ray-" in d]
        orphans = _ray_leftovers(ray_dirs[0]) if ray_dirs else []
        deadline = time.monotonic() + 150
        while orphans and time.monotonic() < deadline:
            time.sleep(5)
            orphans = _ray_leftovers(ray_dirs[0])
        done = trtcal(*argv[3:], timeout=300)  # a cache hit now; it sweeps what the exited orphans left
        left_after = _owned_by(killed)
    finally:
        for pid in _ray_leftovers(ray_dirs[0]) if ray_dirs else []:  # processes this case started, by PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    detail = f"after the next run: {len(left)} temp dir(s); 150 s later: {len(orphans)} Ray process(es), {len(left_after)} dir(s)"
    if left_after or orphans:
        raise Outcome("leaked", detail)
    raise Outcome("ok", detail)


CASES: list[tuple[str, Callable[[Path], None]]] = [
    ("2  cache export --method M exports M's scales", case_export_method),
    ("2  cache export of a method the entry lacks", case_export_missing_method),
    ("4  cache with a denormal scale -> Q/DQ", case_denormal_scale),
    ("4  cache of another model -> Q/DQ", case_cache_of_another_model),
    ("4  manual range for an unknown tensor", case_manual_range_unknown_tensor),
    ("4  cache put onto an existing key", case_put_existing_key),
    ("5  ls/verify on a missing path", _store_path_case("missing")),
    ("5  ls/verify on a file", _store_path_case("file")),
    ("5  ls/verify on a foreign folder", _store_path_case("foreign")),
    ("5  manifest replaced by a symlink", case_symlinked_manifest),
    ("9  cache put x=/dev/zero", _put_non_regular("zero")),
    ("9  cache put x=FIFO (no writer)", _put_non_regular("fifo")),
    ("9  credentials inside the store URL", case_url_credentials),
    ("9  exported file mode (umask 022)", case_report_mode),
    ("9  .npz zip bomb (2 GiB row), 1 sample asked", case_npz_bomb),
    ("9  JPEG claiming 9000x9000 over 24 KB", case_forged_jpeg),
    ("3  calibrate into a folder with user files", case_output_folder_user_files),
    ("1  two projects, same --data ./images/", case_batch_key_relative_path),
    ("1  images changed in place, same URL", case_batch_key_changed_images),
    ("7  unwritable store: found before any work", case_unwritable_store_before_work),
    ("-  SIGKILL mid put + gc: files left", case_sigkill_put_then_gc),
    ("-  SIGKILL mid calibrate + next run: temp dirs, Ray processes", case_sigkill_calibrate_then_next_run),
]


def all_cases(only: str | None = None) -> list[tuple[str, Callable[[Path], None]]]:
    """Every case (the submit and multi-node ones live in bench/redteam_cluster.py); `only` filters by name."""
    from bench.redteam_cluster import CLUSTER_CASES, SUBMIT_CASES

    cases = CASES + SUBMIT_CASES + CLUSTER_CASES
    return [c for c in cases if only is None or only in c[0]]


def run_redteam(work: Path, only: str | None = None) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for name, case in all_cases(only):
        case_dir = work / hashlib.sha256(name.encode()).hexdigest()[:10]
        case_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            case(case_dir)
            kind, detail = "ok", ""
        except Outcome as outcome:
            kind, detail = outcome.kind, outcome.detail
        except Exception as exc:  # the case itself failed: a crash of what it drove
            kind, detail = "crashed", f"{type(exc).__name__}: {str(exc)[:200]}"
        seconds = round(time.perf_counter() - started, 1)
        rows.append({"case": name, "outcome": kind, "detail": detail, "seconds": seconds})
        print(f"  {kind:<12} {seconds:6.1f}s  {name}{'  -- ' + detail if detail else ''}", flush=True)
    counts = {k: sum(1 for r in rows if r["outcome"] == k) for k in OUTCOMES}
    print("  red team: " + ", ".join(f"{counts[k]} {k}" for k in OUTCOMES), flush=True)
    return {"cases": rows, "counts": counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", default=None, help="run the cases whose name holds this text")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trtcal-redteam-") as tmp:
        report = run_redteam(Path(tmp), args.only)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    bad = sum(v for k, v in report["counts"].items() if k != "ok")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    # Run as bench.redteam, so that bench/redteam_cluster.py raises the same Outcome class.
    from bench.redteam import main as _main

    sys.exit(_main())
