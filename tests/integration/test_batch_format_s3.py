"""The calibration batch on a real S3 server (SeaweedFS on 127.0.0.1, tests/fixtures/s3.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trtcal.batch import BatchWriter, open_batch, write_batch
from trtcal.errors import DataError

pytestmark = pytest.mark.integration


def test_write_and_open_through_s3(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    options = s3_server.storage_options()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 3, 8, 8)).astype(np.float32)
    ids = [f"train/n{i:04d}.JPEG" for i in range(12)]
    perm = rng.permutation(12)
    url = f"s3://{s3_bucket}/calib/batch.arrow"

    info = write_batch(url, {"input": x[perm]}, [ids[i] for i in perm], spec={"preset": "test"}, **options)
    local = write_batch(tmp_path / "local.arrow", {"input": x}, ids, spec={"preset": "test"})
    assert info.fingerprint == local.fingerprint and info.nbytes == local.nbytes

    batch = open_batch(url, **options)
    assert batch.sample_ids == ids and batch.spec == {"preset": "test"}
    np.testing.assert_array_equal(batch.array("input"), x)
    np.testing.assert_array_equal(np.concatenate([m["input"] for m in batch.iter_micro_batches(5)]), x)

    streamed = f"s3://{s3_bucket}/calib/streamed.arrow"
    with BatchWriter(streamed, spec={"preset": "test"}, **options) as writer:
        for part in np.array_split(perm, 3):
            writer.write({"input": x[part]}, [ids[i] for i in part])
    import fsspec

    fs = fsspec.filesystem("s3", **options)
    assert fs.cat_file(streamed) == fs.cat_file(url) == (tmp_path / "local.arrow").read_bytes()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/calib", refresh=True)) == [
        "batch.arrow", "streamed.arrow",
    ]  # no temporary objects left behind

    with pytest.raises(DataError, match="does not exist"):
        open_batch(f"s3://{s3_bucket}/calib/missing.arrow", **options)


def test_planned_writer_publishes_to_s3_with_the_bytes_of_write_batch(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    """PlannedBatchWriter builds the file in the local temp dir and uploads it once, whole."""
    import fsspec

    from trtcal.batch import InputInfo, PlannedBatchWriter

    options = s3_server.storage_options()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 3, 8, 8)).astype(np.float32)
    ids = [f"train/n{i:04d}.JPEG" for i in range(20)]
    write_batch(tmp_path / "ref.arrow", {"input": x}, ids, spec={"preset": "test"})
    url = f"s3://{s3_bucket}/planned/batch.arrow"
    with PlannedBatchWriter(url, sample_ids=ids, inputs=[InputInfo("input", (3, 8, 8), "float32")],
                            spec={"preset": "test"}, **options) as writer:
        for part in np.array_split(rng.permutation(20), 4):
            writer.write({"input": x[part]}, [ids[i] for i in part])
    fs = fsspec.filesystem("s3", **options)
    assert fs.cat_file(url) == (tmp_path / "ref.arrow").read_bytes()
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/planned", refresh=True)] == ["batch.arrow"]
    assert open_batch(url, **options).fingerprint == writer.info.fingerprint
