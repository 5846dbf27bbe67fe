"""Issue 15 item 1: the batch key is content-addressed (absolute URL + listing digest + model input).

`Job.open` computes the key without Ray, so these run the real code path of `trtcal calibrate`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import onnx
import pytest
from onnx import helper

from tests.reliability.tiny_cnn import tiny_cnn
from trtcal.config import JobConfig
from trtcal.errors import ConfigError, ModelError
from trtcal.orchestrator.job import Job


def _images(root: Path) -> Path:
    (root / "cls").mkdir(parents=True)
    for i in range(3):
        (root / "cls" / f"{i}.jpg").write_bytes(f"jpeg-{i}".encode())
    return root


def _model(path: Path, input_name: str = "input") -> Path:
    model = tiny_cnn(0)
    if input_name != "input":
        old = model.graph.input[0].name
        model.graph.input[0].name = input_name
        for node in model.graph.node:
            node.input[:] = [input_name if n == old else n for n in node.input]
    onnx.save(model, path)
    return path


def _key(model: Path, data: str, tmp_path: Path, **options: object) -> str:
    cfg = JobConfig().with_options(store=str(tmp_path / "store"), **options)
    return Job.open(model, data, cfg).batch_key


def test_two_projects_with_the_same_relative_data_path_get_different_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path / "m.onnx")
    keys = []
    for project in ("a", "b"):
        _images(tmp_path / project / "images")
        monkeypatch.chdir(tmp_path / project)
        keys.append(_key(model, "./images/", tmp_path))
    assert keys[0] != keys[1]


def test_changed_added_or_removed_images_never_hit_the_old_batch(tmp_path: Path) -> None:
    model = _model(tmp_path / "m.onnx")
    data = str(_images(tmp_path / "images"))
    first = _key(model, data, tmp_path)
    assert _key(model, data, tmp_path) == first  # nothing changed: the same batch
    (tmp_path / "images" / "cls" / "0.jpg").write_bytes(b"jpeg-X")
    os.utime(tmp_path / "images" / "cls" / "0.jpg", ns=(time.time_ns(), time.time_ns() + 10**6))
    changed = _key(model, data, tmp_path)
    (tmp_path / "images" / "cls" / "9.jpg").write_bytes(b"new")
    added = _key(model, data, tmp_path)
    assert len({first, changed, added}) == 3


def test_a_model_with_another_input_name_gets_its_own_batch(tmp_path: Path) -> None:
    data = str(_images(tmp_path / "images"))
    a = _key(_model(tmp_path / "a.onnx", "input"), data, tmp_path)
    b = _key(_model(tmp_path / "b.onnx", "pixel_values"), data, tmp_path)
    assert a != b
    assert _key(_model(tmp_path / "c.onnx", "pixel_values"), data, tmp_path, input_name="pixel_values") == b
    with pytest.raises(ConfigError, match=r"--input-name 'nope': model .* has no such input; its inputs are \['pixel_values'\]"):
        _key(tmp_path / "c.onnx", data, tmp_path, input_name="nope")


def test_a_model_with_two_inputs_needs_input_name(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 3]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "two.onnx")
    data = str(_images(tmp_path / "images"))
    with pytest.raises(ConfigError, match="has 2 inputs .* --input-name"):
        _key(tmp_path / "two.onnx", data, tmp_path)
    assert _key(tmp_path / "two.onnx", data, tmp_path, input_name="b")


def test_a_file_that_is_not_onnx_is_a_model_error_naming_the_users_path_before_ray(tmp_path: Path) -> None:
    bad = tmp_path / "my-model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="my-model.onnx"):
        _key(bad, str(_images(tmp_path / "images")), tmp_path)
