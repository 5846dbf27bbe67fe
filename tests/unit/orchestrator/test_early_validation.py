"""Issue 15 item 7: mistakes found before Ray starts, errors that name the user's files, and hints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.reliability.tiny_cnn import tiny_cnn
from trtcal.cli import main
from trtcal.config import JobConfig
from trtcal.errors import DataError, ModelError, ReadOnlyStoreError
from trtcal.orchestrator.actor import _user_paths_in_errors
from trtcal.orchestrator.calibrate import calibrate
from trtcal.orchestrator.job import Job


def _images(root: Path) -> str:
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "0.jpg").write_bytes(b"x")
    return str(root)


def test_an_unwritable_store_fails_before_any_work(tmp_path: Path) -> None:
    onnx.save(tiny_cnn(0), tmp_path / "m.onnx")
    (tmp_path / "a-file").write_text("x")
    cfg = JobConfig().with_options(store=str(tmp_path / "a-file" / "store"))
    with pytest.raises(ReadOnlyStoreError, match="cannot publish to store .*--read-only"):
        Job.open(tmp_path / "m.onnx", _images(tmp_path / "images"), cfg)
    # --read-only computes without publishing: no probe (nothing is created in the store).
    Job.open(tmp_path / "m.onnx", str(tmp_path / "images"), cfg.with_options(store=str(tmp_path / "new"), read_only=True))
    assert not (tmp_path / "new").exists()
    Job.open(tmp_path / "m.onnx", str(tmp_path / "images"), cfg.with_options(store=str(tmp_path / "new")))
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []  # the probe is gone


def test_the_cli_reports_an_unwritable_store_and_a_bad_model_with_the_users_paths(tmp_path: Path, capsys) -> None:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "model.onnx").write_bytes(b"garbage")
    data = _images(tmp_path / "images")
    rc = main(["calibrate", str(tmp_path / "model.onnx"), "--data", data, "--store", str(tmp_path / "a-file" / "s")])
    assert rc == 2 and "cannot publish to store" in capsys.readouterr().err
    rc = main(["calibrate", str(tmp_path / "model.onnx"), "--data", data, "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "model.onnx") in err and "/tmp/trtcal-actor-" not in err


def test_actor_errors_name_the_users_model_not_the_temp_copy(tmp_path: Path) -> None:
    work = tmp_path / "trtcal-actor-xyz"
    with pytest.raises(ModelError) as info, _user_paths_in_errors(str(work), "s3://team/models/resnet.onnx"):
        raise ModelError(f"ONNX Runtime cannot load model {str(work / 'model.onnx')!r}: bad graph")
    assert "s3://team/models/resnet.onnx" in str(info.value) and str(work) not in str(info.value)


def _batch_of_one_inside() -> onnx.ModelProto:
    """Input [N, 4] (dynamic) but a Reshape to [1, 4] inside: only a micro-batch of 1 runs."""
    shape = helper.make_tensor("shape", onnx.TensorProto.INT64, [2], [1, 4])
    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 2], np.ones(8, np.float32).tolist())
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])]
    graph = helper.make_graph(nodes, "b1", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])], [shape, w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_batch_of_one_fixed_inside_gets_the_micro_batch_hint(tmp_path: Path) -> None:
    onnx.save(_batch_of_one_inside(), tmp_path / "b1.onnx")
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    with pytest.raises(DataError, match="--micro-batch 1"):
        calibrate(tmp_path / "b1.onnx", {"x": x}, algorithms=["minmax"])
    assert calibrate(tmp_path / "b1.onnx", {"x": x}, algorithms=["minmax"], micro_batch=1).amax["minmax"]


def _state_on_axis_1() -> onnx.ModelProto:
    """x [N, 4] and a recurrent-style state [2, N, 3] whose batch is on axis 1 (as silero-vad's)."""
    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 2], np.ones(8, np.float32).tolist())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["state"], ["state_out"])]
    graph = helper.make_graph(
        nodes, "axis1",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("state", onnx.TensorProto.FLOAT, [2, "N", 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("state_out", onnx.TensorProto.FLOAT, [2, "N", 3])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_batch_axis_mistake_is_refused_before_ray_starts(tmp_path: Path, capsys, monkeypatch) -> None:
    """A given .npz whose state input needs --inputs: the CLI exits 2 with the exact spec, and Ray never starts
    (its start-up is made to fail the test); with the spec, or a wrong dtype, the check runs there too."""
    import trtcal.workers.ray_runtime as ray_runtime

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started before the batch was checked against the model")

    monkeypatch.setattr(ray_runtime, "ray_session", no_ray)
    onnx.save(_state_on_axis_1(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "b.npz", x=rng.standard_normal((6, 4)).astype(np.float32),
             state=rng.standard_normal((6, 2, 3)).astype(np.float32))
    args = ["calibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "b.npz"), "--store", str(tmp_path / "s")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "inputs disagree on the batch axis" in err and """--inputs '{"state": {"batch_axis": 1}}'""" in err, err
    # Declared, the same batch passes the check (Job.open: no Ray) ...
    cfg = JobConfig().with_options(store=str(tmp_path / "s"), inputs={"state": {"batch_axis": 1}})
    Job.open(tmp_path / "m.onnx", str(tmp_path / "b.npz"), cfg)
    # ... and a dtype the model does not take is refused there, naming the input.
    np.savez(tmp_path / "f64.npz", x=rng.standard_normal((6, 4)), state=rng.standard_normal((6, 2, 3)).astype(np.float32))
    with pytest.raises(DataError, match="input 'x': the model expects float32, the batch holds float64"):
        Job.open(tmp_path / "m.onnx", str(tmp_path / "f64.npz"), cfg)
