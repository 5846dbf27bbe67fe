"""The parts of `trtcal.orchestrator` (job, actor) that need no Ray: the actor's work as a plain function,
where the actor reads the batch, how its progress is relayed, and the CLI's rendering of a result.
(End to end on real Ray and S3: tests/e2e/test_calibrate_dataset.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.unit.runners.tiny_models import mlp, small_int_inputs
from trtcal.cli.cmd_calibrate import LabelledProgress, _table
from trtcal.config import CalibrationConfig, JobConfig
from trtcal.errors import ConfigError
from trtcal.orchestrator.actor import (
    ActorRequest,
    BatchSource,
    ProgressLog,
    _ProgressForwarder,
    run_calibration,
)
from trtcal.orchestrator.job import DatasetResult
from trtcal.progress import RecordingProgress

CAL = CalibrationConfig(algorithms=("entropy2", "minmax"), micro_batch=4)


def _run(model: bytes, url: str, options: dict[str, Any], cal: CalibrationConfig, export_qdq: bool, *,
         backend: str = "onnxruntime", **kwargs: Any) -> Any:
    request = ActorRequest(model_bytes=model, batch_url=url, calibration=cal, storage_options=options,
                           export_qdq=export_qdq, backend=backend)
    return run_calibration(request, **kwargs)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[bytes, Path]:
    model = mlp().SerializeToString()
    batch = tmp_path / "batch.npy"
    np.save(batch, small_int_inputs(10, (4,)))
    return model, batch


def test_run_calibration_reports_every_actor_stage_in_order(tiny: tuple[bytes, Path]) -> None:
    model, batch = tiny
    log = ProgressLog()
    out = _run(model, str(batch), {}, CAL, True, progress=log)
    events = log.drain()
    assert [e[:2] for e in events if e[0] != "advance"] == [
        ("start", "statistics"), ("finish", "statistics"), ("start", "histograms"), ("finish", "histograms"),
        ("start", "search"), ("finish", "search"), ("start", "verdict"), ("finish", "verdict"),
        ("start", "export"), ("finish", "export"),
    ]  # fmt: skip
    # Consecutive advances are merged: one poll carries a count, however many micro-batches ran.
    assert [e for e in events if e[0] == "advance"] == [("advance", "statistics", 10), ("advance", "histograms", 10)]
    assert log.drain() == []
    assert {"calibration.cache", "ranges.json", "model.qdq.onnx", "run.json"} <= set(out.files)
    assert out.num_samples == 10 and set(out.timings) >= {"statistics", "histograms", "scales", "export_qdq"}


def test_minmax_only_searches_right_after_pass_1(tiny: tuple[bytes, Path]) -> None:
    model, batch = tiny
    log = ProgressLog()
    _run(model, str(batch), {}, CalibrationConfig(algorithms=("minmax",)), False, progress=log)
    assert [e[1] for e in log.drain() if e[0] == "start"] == ["statistics", "search", "verdict"]


def test_a_batch_sent_as_bytes_gives_the_same_artifacts(tiny: tuple[bytes, Path], tmp_path: Path) -> None:
    model, batch = tiny
    from_path = _run(model, str(batch), {}, CAL, True)
    elsewhere = str(tmp_path / "on-another-node" / "batch.npy")  # does not exist here
    from_bytes = _run(model, elsewhere, {}, CAL, True, batch_bytes=batch.read_bytes())
    for name in ("calibration.cache", "calibration.minmax.cache", "ranges.json", "histograms.npy", "model.qdq.onnx"):
        assert from_path.files[name] == from_bytes.files[name], name


def test_batch_source_prefers_the_local_file_on_the_drivers_node() -> None:
    local = BatchSource.at("relative/batch.arrow")
    assert local.local_path is not None and Path(local.local_path).is_absolute() and local.shared_url is None
    assert local.for_actor(same_node=True) == (local.local_path, False)
    assert local.for_actor(same_node=False) == (local.local_path, True)  # sent through the object store
    remote = BatchSource.at("s3://bucket/store/batch.arrow")
    assert remote == BatchSource(shared_url="s3://bucket/store/batch.arrow")
    assert remote.for_actor(same_node=True) == remote.for_actor(same_node=False) == ("s3://bucket/store/batch.arrow", False)
    both = BatchSource(local_path="/tmp/job/batch.arrow", shared_url="s3://b/batch.arrow")
    assert both.for_actor(same_node=True) == ("/tmp/job/batch.arrow", False)
    assert both.for_actor(same_node=False) == ("s3://b/batch.arrow", False)
    assert BatchSource.at("file:///data/b.arrow").local_path == "/data/b.arrow"


def test_relayed_progress_survives_an_actor_restart() -> None:
    seen = RecordingProgress()
    relay = _ProgressForwarder(seen)
    relay.pid = 100
    relay.replay(100, [("start", "statistics", 12, "sample"), ("advance", "statistics", 4)])
    # The actor died; its successor (another pid) starts over.
    relay.replay(200, [("start", "statistics", 12, "sample"), ("advance", "statistics", 12), ("finish", "statistics")])
    relay.replay(200, [("start", "histograms", 12, "sample"), ("advance", "histograms", 5)])
    relay.close()
    assert relay.restarts == 1
    assert seen.events == [
        ("start", "statistics", 12), ("advance", "statistics", 4), ("finish", "statistics", None),
        ("start", "statistics", 12), ("advance", "statistics", 12), ("finish", "statistics", None),
        ("start", "histograms", 12), ("advance", "histograms", 5), ("finish", "histograms", None),
    ]  # fmt: skip


def test_a_stage_started_twice_by_one_actor_gets_a_fresh_bar() -> None:
    seen = RecordingProgress()
    relay = _ProgressForwarder(seen)
    relay.replay(7, [("start", "statistics", 3, ""), ("advance", "statistics", 1), ("start", "statistics", 3, "")])
    relay.replay(7, [("advance", "statistics", 3), ("finish", "statistics"), ("finish", "statistics")])
    assert seen.events == [
        ("start", "statistics", 3), ("advance", "statistics", 1), ("finish", "statistics", None),
        ("start", "statistics", 3), ("advance", "statistics", 3), ("finish", "statistics", None),
    ]  # fmt: skip


def test_stages_without_a_total_render_as_one_step_under_their_labels() -> None:
    seen = RecordingProgress()
    bars = LabelledProgress(seen)
    bars.start("preprocess", 12, "img")
    bars.advance("preprocess", 12)
    bars.finish("preprocess")
    bars.start("search")
    bars.advance("search")  # ignored: the step is taken when the stage ends
    bars.finish("search")
    assert seen.events == [
        ("start", "preprocessing", 12), ("advance", "preprocessing", 12), ("finish", "preprocessing", None),
        ("start", "scale search", 1), ("advance", "scale search", 1), ("finish", "scale search", None),
    ]  # fmt: skip


def _result(**overrides: Any) -> DatasetResult:
    values: dict[str, Any] = dict(
        key="ab" * 32, batch_key="cd" * 32, store_url="/home/me/.cache/trtcal/store",
        entry_url="s3://team/store/v1/default/entries/ab/x.json", cache_hit=True, batch_reused=True,
        output_dir=Path("/work/out"), artifacts=("calibration.cache", "ranges.json"), num_tensors=95,
        num_samples=500, algorithms=("entropy2", "minmax"), runner="onnxruntime-cpu 1.32.0",
        timings={"start_ray": 3.0, "preprocess": 10.0, "calibrate": 5.0, "calibrate.statistics": 2.0,
                 "calibrate.histograms": 2.5, "calibrate.scales": 0.25, "publish": 0.5, "total": 19.0},
        found_in="s3://team/store",
    )  # fmt: skip
    values.update(overrides)
    return DatasetResult(**values)


def test_the_final_table_names_what_was_done_where_and_how_long_each_stage_took() -> None:
    table = _table(_result())
    assert "cache hit in read-from store s3://team/store (no preprocessing, no inference)" in table
    assert "tensors calibrated  95" in table and "methods             entropy2, minmax" in table
    assert "ab" * 32 in table and "s3://team/store (s3://team/store/v1/" in table
    stages = [line.split()[0:2] for line in table.splitlines()[table.splitlines().index("time per stage") + 1 :]]
    assert [s[0] for s in stages] == ["start", "preprocess", "pass", "pass", "scale", "publish", "total"]
    computed = _table(_result(cache_hit=False, published=False, found_in="", entry_url="(not published: read-only store)"))
    assert "computed (read-only store: not published)" in computed


def test_json_has_the_stage_times_under_their_names() -> None:
    data = json.loads(json.dumps(_result().to_dict()))
    assert list(data["stages_s"]) == [
        "start Ray", "preprocess", "pass 1 (max |x|)", "pass 2 (histograms)", "scale search", "publish", "total",
    ]
    assert data["found_in"] == "s3://team/store" and data["timings_s"]["calibrate.statistics"] == 2.0


def test_job_config_names_the_bad_field() -> None:
    with pytest.raises(ConfigError, match="workers"):
        JobConfig.from_options(workers=0)
    with pytest.raises(ConfigError, match="device"):
        JobConfig.from_options(device="tpu")


class _Cluster:
    """Stands in for the `ray` module's cluster_resources(): a GPU cluster cannot be had on this machine."""

    def __init__(self, gpus: float) -> None:
        self.gpus = gpus

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 2.0, "GPU": self.gpus} if self.gpus else {"CPU": 2.0}


def test_device_resolution() -> None:
    from trtcal.errors import BackendUnavailableError
    from trtcal.orchestrator.actor import cuda_runner_available, resolve_device

    assert resolve_device(_Cluster(0), "auto") == "cpu" and resolve_device(_Cluster(0), "cpu") == "cpu"
    assert resolve_device(_Cluster(1), "cpu") == "cpu" and resolve_device(_Cluster(1), "gpu") == "gpu"
    # auto takes the GPU only when this onnxruntime can use it (else the actor would fail on it).
    assert resolve_device(_Cluster(1), "auto") == ("gpu" if cuda_runner_available() else "cpu")
    with pytest.raises(BackendUnavailableError, match="--device gpu .* no GPU"):
        resolve_device(_Cluster(0), "gpu")
