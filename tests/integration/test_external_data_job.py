"""Issue 15 item 7: a model with external data is calibrated end to end by the job (only the .onnx
file used to reach the calibration actor, which then failed on the missing weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest

from tests.reliability.tiny_cnn import tiny_cnn
from trtcal.config import JobConfig
from trtcal.demo.demo import write_photo_dataset
from trtcal.orchestrator.job import calibrate_dataset

pytestmark = [pytest.mark.integration]


def test_external_data_model_gives_the_caches_of_the_same_model_embedded(ray_local: Any, tmp_path: Path) -> None:
    photos = write_photo_dataset(tmp_path / "photos", ("astronaut", "coffee"), 2, 0)
    model = tiny_cnn(side=224)
    onnx.save(model, tmp_path / "embedded.onnx")
    (tmp_path / "ext").mkdir()
    onnx.save(model, tmp_path / "ext" / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert (tmp_path / "ext" / "weights.bin").stat().st_size > 1000
    results = {}
    for name, path in (("ext", tmp_path / "ext" / "model.onnx"), ("embedded", tmp_path / "embedded.onnx")):
        cfg = JobConfig().with_options(store=str(tmp_path / "store"), output=str(tmp_path / f"out-{name}"), num_samples=4,
                                       preprocess="imagenet", device="cpu", workers=1)
        results[name] = calibrate_dataset(str(path), str(photos), config=cfg)
    for artifact in ("calibration.cache", "ranges.json", "model.qdq.onnx"):
        assert (tmp_path / "out-ext" / artifact).read_bytes() == (tmp_path / "out-embedded" / artifact).read_bytes(), artifact
    # Keyed by the model file AND its external data (trtcal.model.load_model's hash), not the .onnx alone.
    assert results["ext"].key != results["embedded"].key
    (tmp_path / "ext" / "weights.bin").write_bytes(b"\0" * (tmp_path / "ext" / "weights.bin").stat().st_size)
    cfg = JobConfig().with_options(store=str(tmp_path / "store"), num_samples=4, preprocess="imagenet", device="cpu", workers=1)
    changed = calibrate_dataset(str(tmp_path / "ext" / "model.onnx"), str(photos), config=cfg)
    assert changed.key != results["ext"].key and not changed.cache_hit
