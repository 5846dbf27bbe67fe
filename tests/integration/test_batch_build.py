"""build_batch on a real local Ray (the `ray_local` fixture) and a real S3 server (SeaweedFS, `s3_server`).

Real photos from skimage.data, written as JPEG/PNG into temp folders; real corrupt files; a worker
really SIGKILLed. The batches are compared as bytes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.integration.batch_helpers import MARKER_ENV
from tests.unit.workers.images import bomb_png, encode, photo, write_photo_folder
from trtcal.batch import open_batch
from trtcal.errors import ConfigError, DataError
from trtcal.progress import RecordingProgress
from trtcal.workers.build import build_batch
from trtcal.workers.preprocess import PRESETS

pytestmark = pytest.mark.integration

CLASSES = {
    "n01440764": ("astronaut", "chelsea", "coffee", "rocket"),
    "n01443537": ("camera", "moon", "coins", "cat"),
    "n01484850": ("astronaut", "coffee", "cat"),
}
NUM_SAMPLES = 14
SEED = 7


@pytest.fixture(scope="module")
def photo_dataset(tmp_path_factory) -> Path:
    """ImageNet-like train/<wnid>/*.{JPEG,png} of real photos, plus a small synthetic JPEG per class."""
    root = tmp_path_factory.mktemp("photos") / "train"
    write_photo_folder(root, classes=CLASSES)
    rng = np.random.default_rng(0)
    for wnid in CLASSES:
        pixels = rng.integers(0, 255, (rng.integers(300, 500), rng.integers(300, 500), 3), dtype=np.uint8)
        (root / wnid / "synthetic.JPEG").write_bytes(encode(pixels, "JPEG", quality=85))
    return root


def _build(data, out, **kwargs):
    params = {"num_samples": NUM_SAMPLES, "seed": SEED, "preprocess": "imagenet"}
    params.update(kwargs)
    return build_batch(str(data), str(out), **params)


def _no_leftovers(directory: Path, keep: set[str]) -> None:
    assert sorted(p.name for p in directory.iterdir()) == sorted(keep)


def test_same_bytes_for_1_2_and_4_workers(ray_local, photo_dataset, tmp_path):
    outputs = {}
    progress = RecordingProgress()
    for workers in (1, 2, 4):
        out = tmp_path / f"w{workers}.arrow"
        report = _build(photo_dataset, out, workers=workers, progress=progress)
        assert report.num_rows == NUM_SAMPLES and report.workers == workers and report.skipped == ()
        assert report.worker_seconds["write"] > 0  # same node: the tasks wrote their rows into the file
        outputs[workers] = out.read_bytes()
    assert outputs[1] == outputs[2] == outputs[4]
    _no_leftovers(tmp_path, {"w1.arrow", "w2.arrow", "w4.arrow"})
    with open_batch(tmp_path / "w2.arrow") as batch:
        assert batch.num_rows == NUM_SAMPLES
        assert batch.sample_ids == sorted(batch.sample_ids)
        assert batch.spec["preprocess"] == PRESETS["imagenet"].to_dict() and batch.spec["skipped_inputs"] == 0
        assert batch.inputs["input"].shape == (3, 224, 224)
        first = batch.sample_ids[0]
        wnid, name = first.split("/")
        from trtcal.workers.preprocess import preprocess_image_bytes

        expected = preprocess_image_bytes((photo_dataset / wnid / name).read_bytes(), PRESETS["imagenet"])["input"]
        assert np.array_equal(batch.array("input")[0], expected)
    advanced = sum(n for kind, stage, n in progress.events if kind == "advance" and stage == "preprocess")
    assert advanced == 3 * NUM_SAMPLES


def test_shuffled_listing_gives_the_same_batch(ray_local, photo_dataset, tmp_path):
    reference = _build(photo_dataset, tmp_path / "folder.arrow", workers=2)
    # The same files, named by a list file in shuffled order (ids are relative to the list's folder).
    files = sorted(str(p.relative_to(photo_dataset)) for p in photo_dataset.rglob("*") if p.is_file())
    random.Random(1).shuffle(files)
    (photo_dataset.parent / "shuffled.txt").write_text("\n".join(files) + "\n")
    try:
        # A list file's root is its folder: point it at train/ through a copy of the list there.
        listed = photo_dataset / "shuffled.txt"
        shutil.move(photo_dataset.parent / "shuffled.txt", listed)
        from_list = _build(listed, tmp_path / "list.arrow", workers=2)
    finally:
        listed.unlink()
    assert from_list.fingerprint == reference.fingerprint
    assert (tmp_path / "list.arrow").read_bytes() == (tmp_path / "folder.arrow").read_bytes()
    # And the same folder copied in another creation order (tmpfs lists in reverse creation order).
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    copy = Path(os.path.join(base, f"trtcal-shuffled-{os.getpid()}"))
    try:
        for rel in reversed(sorted(files)):
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(photo_dataset / rel, copy / rel)
        _build(copy, tmp_path / "copy.arrow", workers=2)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    assert (tmp_path / "copy.arrow").read_bytes() == (tmp_path / "folder.arrow").read_bytes()


def test_local_and_s3_sources_give_the_same_batch(ray_local, s3_server, photo_dataset, tmp_path):
    import fsspec

    bucket = s3_server.create_bucket()
    options = s3_server.storage_options()
    fs = fsspec.filesystem("s3", **options)
    fs.put(str(photo_dataset), f"{bucket}/datasets/train", recursive=True)
    local = _build(photo_dataset, tmp_path / "local.arrow", workers=2)
    from_s3 = _build(f"s3://{bucket}/datasets/train/", tmp_path / "s3.arrow", workers=2, storage_options=options)
    assert from_s3.fingerprint == local.fingerprint
    assert (tmp_path / "s3.arrow").read_bytes() == (tmp_path / "local.arrow").read_bytes()
    # Published to S3 as well: same bytes, nothing else left in the bucket's output prefix.
    _build(f"s3://{bucket}/datasets/train", f"s3://{bucket}/batches/calib.arrow", workers=2, storage_options=options)
    fs.invalidate_cache()
    assert fs.cat_file(f"{bucket}/batches/calib.arrow") == (tmp_path / "local.arrow").read_bytes()
    assert fs.ls(f"{bucket}/batches", detail=False) == [f"{bucket}/batches/calib.arrow"]
    with open_batch(f"s3://{bucket}/batches/calib.arrow", **options) as batch:
        assert batch.fingerprint == local.fingerprint


@pytest.fixture()
def corrupt_dataset(tmp_path, photo_dataset) -> tuple[Path, dict[str, str]]:
    """The photo dataset plus real bad files; returns (root, sample id -> expected reason)."""
    root = tmp_path / "bad"
    shutil.copytree(photo_dataset, root)
    jpeg = (root / "n01440764" / "coffee.JPEG").read_bytes()
    bad = {
        "n01440764/truncated.JPEG": (jpeg[: len(jpeg) // 3], "truncated"),
        "n01443537/empty.JPEG": (b"", "zero-byte"),
        "n01443537/notes.jpg": (b"this is a text file with a .jpg name\n", "non-image"),
        "n01484850/bomb.png": (bomb_png(), "bomb"),
    }
    for rel, (content, _reason) in bad.items():
        (root / rel).write_bytes(content)
    return root, {rel: reason for rel, (_content, reason) in bad.items()}


def test_bad_inputs_fail_by_default_with_the_list(ray_local, corrupt_dataset, tmp_path):
    root, expected = corrupt_dataset
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(DataError) as info:
        _build(root, out_dir / "calib.arrow", num_samples="all", workers=2)
    message = str(info.value)
    for rel, reason in expected.items():
        assert f"{root / rel}: {reason}" in message
    assert "4 bad input(s)" in message and "--on-bad-input skip" in message
    _no_leftovers(out_dir, set())  # nothing published, no temp or spool file left


def test_bad_inputs_skipped_are_reported_and_counted(ray_local, corrupt_dataset, photo_dataset, tmp_path):
    root, expected = corrupt_dataset
    report = _build(root, tmp_path / "skip.arrow", num_samples="all", workers=2, on_bad_input="skip")
    assert {b.sample_id: b.reason for b in report.skipped} == expected
    assert all(b.detail for b in report.skipped)
    clean = _build(photo_dataset, tmp_path / "clean.arrow", num_samples="all", workers=2)
    assert report.num_rows == clean.num_rows == report.num_selected - len(expected)
    assert any("skipped" in w for w in report.warnings)
    with open_batch(tmp_path / "skip.arrow") as skipped, open_batch(tmp_path / "clean.arrow") as reference:
        assert skipped.spec["skipped_inputs"] == len(expected)
        assert skipped.sample_ids == reference.sample_ids
        assert np.array_equal(skipped.array("input"), reference.array("input"))
        assert skipped.fingerprint == reference.fingerprint  # the data is the same; only the spec differs


def test_no_valid_samples_and_too_few(ray_local, tmp_path):
    root = tmp_path / "allbad"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "b.png").write_bytes(b"text")
    with pytest.raises(DataError, match="no valid samples remain"):
        _build(root, tmp_path / "x.arrow", num_samples="all", on_bad_input="skip", workers=2)
    good = tmp_path / "good"
    write_photo_folder(good, classes={"c": ("coffee", "rocket")})
    with pytest.raises(DataError, match="holds only 4"):
        _build(good, tmp_path / "y.arrow", num_samples=10)
    report = _build(good, tmp_path / "y.arrow", num_samples=10, on_bad_input="skip")
    assert report.num_rows == 4 and "holds only 4" in report.warnings[0]
    assert not (tmp_path / "x.arrow").exists()


def test_symlink_outside_root_is_refused(ray_local, photo_dataset, tmp_path):
    root = tmp_path / "linked"
    shutil.copytree(photo_dataset, root)
    secret = tmp_path / "secret.png"
    secret.write_bytes(encode(photo("rocket"), "PNG"))
    (root / "n01440764" / "leak.png").symlink_to(secret)
    with pytest.raises(DataError, match="outside-root"):
        _build(root, tmp_path / "x.arrow", workers=2)
    report = _build(root, tmp_path / "x.arrow", workers=2, num_samples="all", on_bad_input="skip")
    assert [b.sample_id for b in report.refused] == ["n01440764/leak.png"]
    with open_batch(tmp_path / "x.arrow") as batch:
        assert "n01440764/leak.png" not in batch.sample_ids and batch.spec["refused_entries"] == 1


def test_worker_killed_mid_run_is_retried_and_the_batch_is_identical(ray_local, photo_dataset, tmp_path):
    spec = "tests.integration.batch_helpers:kill_once_then_imagenet"
    marker = tmp_path / "kill-marker"
    env = {"env_vars": {MARKER_ENV: str(marker), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}}
    reference = _build(photo_dataset, tmp_path / "ref.arrow", preprocess=spec, workers=2, runtime_env=env)
    assert not (tmp_path / "kill-marker.pid").exists()
    marker.write_text("kill one worker")
    killed = _build(photo_dataset, tmp_path / "killed.arrow", preprocess=spec, workers=2, runtime_env=env)
    assert not marker.exists()
    pid = int((tmp_path / "kill-marker.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # that worker is really gone
    assert killed.fingerprint == reference.fingerprint and killed.num_rows == NUM_SAMPLES
    assert (tmp_path / "killed.arrow").read_bytes() == (tmp_path / "ref.arrow").read_bytes()


def test_stratified_draw(ray_local, photo_dataset, tmp_path):
    report = _build(photo_dataset, tmp_path / "s.arrow", num_samples=9, stratify=True, workers=2)
    with open_batch(tmp_path / "s.arrow") as batch:
        per_class = {}
        for sample_id in batch.sample_ids:
            per_class[sample_id.split("/")[0]] = per_class.get(sample_id.split("/")[0], 0) + 1
    assert per_class == dict.fromkeys(CLASSES, 3) and report.num_rows == 9


def test_parquet_and_tensor_sources(ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["coffee", "rocket", "chelsea", "astronaut"]
    pq.write_table(pa.table({"image": [encode(photo(n), "PNG") for n in names]}), tmp_path / "photos.parquet", row_group_size=3)
    report = _build(tmp_path / "photos.parquet", tmp_path / "pq.arrow", num_samples="all", workers=2)
    assert report.num_rows == 4
    from trtcal.workers.preprocess import preprocess_image_bytes

    with open_batch(tmp_path / "pq.arrow") as batch:
        assert batch.sample_ids == [f"photos.parquet#{i:09d}" for i in range(4)]
        for i, name in enumerate(names):
            expected = preprocess_image_bytes(encode(photo(name), "PNG"), PRESETS["imagenet"])["input"]
            assert np.array_equal(batch.array("input")[i], expected)
    tensors = tmp_path / "tensors"
    tensors.mkdir()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30000, (6, 16), dtype=np.int64)
    np.savez(tensors / "part0.npz", input_ids=ids[:4], attention_mask=np.ones((4, 16), np.int64))
    np.savez(tensors / "part1.npz", input_ids=ids[4:], attention_mask=np.ones((2, 16), np.int64))
    with pytest.raises(ConfigError, match="raw"):
        _build(tensors, tmp_path / "t.arrow", num_samples="all")
    report = _build(tensors, tmp_path / "t.arrow", num_samples=5, preprocess="raw", workers=2)
    with open_batch(tmp_path / "t.arrow") as batch:
        assert batch.input_names == ("attention_mask", "input_ids") and batch.num_rows == 5
        assert batch.inputs["input_ids"].dtype == "int64"
        for k, sample_id in enumerate(batch.sample_ids):
            part, row = sample_id.split("#")
            offset = 0 if part == "part0.npz" else 4
            assert np.array_equal(batch.array("input_ids")[k], ids[offset + int(row)])


def test_raw_images_of_another_size_are_a_shape_mismatch(ray_local, tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    for i in range(3):
        (root / f"a{i}.png").write_bytes(encode(np.full((8, 8, 3), i, np.uint8), "PNG"))
    (root / "b.png").write_bytes(encode(np.zeros((9, 8, 3), np.uint8), "PNG"))
    report = _build(root, tmp_path / "raw.arrow", num_samples="all", preprocess="raw", on_bad_input="skip", workers=2)
    assert [(b.sample_id, b.reason) for b in report.skipped] == [("b.png", "shape-mismatch")]
    with open_batch(tmp_path / "raw.arrow") as batch:
        assert batch.inputs["input"].shape == (3, 8, 8) and batch.num_rows == 3


def test_cli_build_and_show(ray_local, photo_dataset, tmp_path, capsys):
    from trtcal.cli import main

    out = tmp_path / "cli.arrow"
    report_json = tmp_path / "report.json"
    rc = main([
        "batch", "build", "--data", str(photo_dataset), "-o", str(out), "--num-samples", str(NUM_SAMPLES),
        "--seed", str(SEED), "--preprocess", "imagenet", "--workers", "2", "--no-progress", "--report-json", str(report_json),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    library = _build(photo_dataset, tmp_path / "lib.arrow", workers=2)
    assert out.read_bytes() == (tmp_path / "lib.arrow").read_bytes()
    assert library.fingerprint in printed and f"{NUM_SAMPLES} rows" in printed
    assert json.loads(report_json.read_text())["fingerprint"] == library.fingerprint
    assert main(["batch", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert library.fingerprint in shown and "(verified)" in shown and "skipped:      0" in shown
    assert "input: arrow.fixed_shape_tensor<float32> [3, 224, 224]" in shown and f"rows:         {NUM_SAMPLES}" in shown
    assert main(["batch", "show", str(out), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["spec"]["preprocess"]["interpolation"] == "bilinear" and described["rows"] == NUM_SAMPLES


def test_ray_session_reuses_the_running_ray(ray_local):
    import ray

    from trtcal.workers.ray_runtime import ray_session

    address = ray.get_runtime_context().gcs_address
    with ray_session() as session:
        assert session.started is False and session.connected is False and session.num_cpus == 2
        assert session.address == address
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == address


def test_cli_in_its_own_process_joins_a_cluster_by_address(ray_local, photo_dataset, tmp_path):
    import subprocess
    import sys

    reference = _build(photo_dataset, tmp_path / "ref.arrow", workers=2)
    out = tmp_path / "cli.arrow"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))  # token auth env included
    done = subprocess.run(
        [sys.executable, "-m", "trtcal", "batch", "build", "--data", str(photo_dataset), "-o", str(out),
         "--num-samples", str(NUM_SAMPLES), "--seed", str(SEED), "--address", ray_local.address, "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert reference.fingerprint in done.stdout
    assert out.read_bytes() == (tmp_path / "ref.arrow").read_bytes()
    failed = subprocess.run(
        [sys.executable, "-m", "trtcal", "batch", "build", "--data", str(tmp_path / "nothing-here"), "-o", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert failed.returncode == 2 and "does not exist" in failed.stderr
