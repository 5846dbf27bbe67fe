"""The TensorRT adapter against a REAL TensorRT 10 and a real GPU.

These are the only trtcal tests allowed to skip: TensorRT cannot be installed on the CI machines
(its wheels download from NVIDIA's index), so every test here skips cleanly where `tensorrt` or a
CUDA device is missing. `test_device_buffers_*` need only cuda-python and a GPU (no TensorRT).

Run where TensorRT exists:  pytest -m "tensorrt or gpu" tests/tensorrt -v -s
(-s shows the scale comparisons the tests print).

The thresholds below were chosen from the documented behaviour (docs/algorithms.md: "Public cache
lines", "MinMax", "What can and cannot be bit-exact"), NOT from a run: no real TensorRT run has
been made for this project yet. Where a threshold fails, read the printed comparison before
loosening anything.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from trtcal.core import read_trt_cache, write_trt_cache
from trtcal.runners import tensorrt as adapter

MICRO_BATCH = 8


def _cuda_runtime():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            pytest.skip("cuda-python is not installed")
    err, count = runtime.cudaGetDeviceCount()
    if int(getattr(err, "value", err)) != 0 or count == 0:
        pytest.skip("no CUDA device")
    return runtime


@pytest.fixture(scope="module")
def trt():
    module = pytest.importorskip("tensorrt", reason="TensorRT is not installed (NVIDIA's index)")
    major = int(str(module.__version__).split(".")[0])
    if major != 10:
        pytest.skip(f"TensorRT {module.__version__}: implicit calibration needs 10.x")
    _cuda_runtime()
    return module


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """32 real photo views preprocessed as the model expects (tests/fixtures/data.py)."""
    import skimage.data
    from PIL import Image

    names = [
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "colorwheel",
    ]
    samples = []
    for name in names:
        image = Image.fromarray(getattr(skimage.data, name)()[..., :3])
        for scale, flip in ((256, False), (256, True), (320, False), (288, True)):
            w, h = image.size
            factor = scale / min(w, h)
            resized = image.resize((round(w * factor), round(h * factor)), Image.BICUBIC)
            if flip:
                resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
            left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
            crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32)
            samples.append(((crop - 127.0) / 128.0).transpose(2, 0, 1))
    return {"input": np.stack(samples).astype(np.float32)}


def _onnx_minmax_amax(efficientnet_path: Path, batch: dict[str, np.ndarray]) -> dict[str, float]:
    """max|x| of every float activation, by ONNX Runtime on CPU (independent of TensorRT)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(efficientnet_path))
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    known = {o.name for o in graph.output}
    names = [
        out
        for node in graph.node
        if node.op_type != "Constant"
        for out in node.output
        if out not in initializers
    ]
    for name in names:
        if name not in known:
            graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fetch = [o.name for o in session.get_outputs()]
    amax = {"input": float(np.abs(batch["input"]).max())}
    for start in range(0, batch["input"].shape[0], MICRO_BATCH):
        values = session.run(fetch, {"input": batch["input"][start : start + MICRO_BATCH]})
        for name, value in zip(fetch, values):
            if value.dtype == np.float32 and value.size:
                amax[name] = max(amax.get(name, 0.0), float(np.abs(value).max()))
    return {k: v for k, v in amax.items() if v > 0}


def _relative_scale_differences(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, float]:
    return {n: abs(theirs[n] - ours[n]) / ours[n] for n in ours if n in theirs}


@pytest.mark.gpu
def test_device_buffers_round_trip_through_real_cuda():
    _cuda_runtime()
    memory = adapter.load_device_memory()
    buffers = adapter.DeviceBatchBuffers(memory)
    rng = np.random.default_rng(0)
    data = {
        "a": rng.standard_normal((6, 5)).astype(np.float32),
        "b": rng.integers(0, 99, (6, 3)).astype(np.int64),
    }
    try:
        for start in range(0, 6, 2):
            batch = {k: v[start : start + 2] for k, v in data.items()}
            pointers = buffers.load(batch, ["b", "a"])
            assert pointers == [buffers.pointers["b"], buffers.pointers["a"]]
            back_b, back_a = np.zeros((2, 3), np.int64), np.zeros((2, 5), np.float32)
            memory.copy_to_host(back_b, pointers[0])
            memory.copy_to_host(back_a, pointers[1])
            np.testing.assert_array_equal(back_b, batch["b"])
            np.testing.assert_array_equal(back_a, batch["a"])
        assert buffers.allocations == 2
    finally:
        pointers = dict(buffers.pointers)
        buffers.close()
    with pytest.raises(adapter.BackendUnavailableError, match="cudaFree"):
        memory.free(pointers["a"])  # already freed: the real runtime reports it


@pytest.mark.gpu
def test_impossible_allocation_is_a_clear_error():
    _cuda_runtime()
    memory = adapter.load_device_memory()
    with pytest.raises(adapter.BackendUnavailableError, match="cudaMalloc"):
        memory.malloc(1 << 60)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_live_entropy2_calibration_gives_a_cache_tensorrt_then_accepts(efficientnet_path: Path, trt, photos, tmp_path):
    from trtcal.batch import batch_from_arrays

    batch = batch_from_arrays(photos)
    cache = adapter.calibrate_with_tensorrt(efficientnet_path, batch, algorithm="entropy2", micro_batch=MICRO_BATCH)
    parsed = read_trt_cache(cache)
    assert parsed.header == f"TRT-{adapter._trt_version_int(trt)}-EntropyCalibration2"
    assert "input" in parsed.scale and len(parsed.scale) > 50

    # The same cache through the replay path: TensorRT must accept it without asking for data.
    engine = adapter.build_engine(efficientnet_path, cache=cache, input_shapes={"input": (MICRO_BATCH, 3, 224, 224)})
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    assert runtime.deserialize_cuda_engine(engine) is not None

    # Compare with trtcal's own entropy2 on the input tensor (same data, no GPU arithmetic involved).
    from trtcal.core import compute_amax, histogram_of

    hist = histogram_of(np.abs(photos["input"]))
    ours = compute_amax(hist.counts, hist.hist_amax, "entropy2")
    theirs = parsed.amax["input"]
    print(
        f"\ninput amax: TensorRT entropy2 {theirs:.6f}, trtcal entropy2 {ours:.6f}, max|x| {hist.hist_amax:.6f}"
    )
    assert 0 < theirs <= float(np.abs(photos["input"]).max()) * (1 + 1 / 2048) + 1e-6


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_live_minmax_scales_match_onnxruntime_max(efficientnet_path: Path, trt, photos):
    cache = adapter.calibrate_with_tensorrt(efficientnet_path, photos, algorithm="minmax", micro_batch=MICRO_BATCH)
    theirs = read_trt_cache(cache).amax
    ours = _onnx_minmax_amax(efficientnet_path, photos)
    diffs = _relative_scale_differences(ours, theirs)
    print(
        f"\nMinMax: {len(diffs)} shared tensors of {len(ours)} (ORT) / {len(theirs)} (TensorRT); "
        f"relative amax difference median {np.median(list(diffs.values())):.2e}, max {max(diffs.values()):.2e}"
    )
    assert diffs["input"] < 1e-6  # identical data, so identical max
    assert len(diffs) >= 0.5 * len(ours)
    assert np.median(list(diffs.values())) < 1e-2  # TF32 convolutions may move activations slightly


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_from_a_trtcal_cache_with_a_foreign_header(efficientnet_path: Path, trt, photos):
    amax = _onnx_minmax_amax(efficientnet_path, photos)
    cache = write_trt_cache(
        amax, trt_version="8.6.1", algorithm="minmax"
    )  # TensorRT 10 would ignore this header
    engine = adapter.build_engine(
        efficientnet_path, cache=cache, input_shapes={"input": (1, 3, 224, 224)}, replay_algorithm="minmax"
    )
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    assert runtime.deserialize_cuda_engine(engine) is not None
    # The scales TensorRT was given are trtcal's, bit for bit.
    served = adapter.rewrite_cache_header(cache, trt_version=trt.__version__, algorithm="minmax")
    assert {k: struct.pack(">f", v) for k, v in read_trt_cache(served).scale.items()} == {
        k: struct.pack(">f", v) for k, v in read_trt_cache(cache).scale.items()
    }


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_error_inside_get_batch_fails_the_real_build(efficientnet_path: Path, trt, photos):
    def source():
        yield {"input": photos["input"][:MICRO_BATCH]}
        raise RuntimeError("decoder failed on sample 8")

    with adapter.make_calibrator("entropy2", source(), micro_batch=MICRO_BATCH) as calibrator:
        with pytest.raises(RuntimeError, match="decoder failed"):
            adapter.build_engine(efficientnet_path, calibrator=calibrator)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_manual_dynamic_ranges_build(efficientnet_path: Path, trt, photos):
    amax = _onnx_minmax_amax(efficientnet_path, photos)
    engine = adapter.build_engine(efficientnet_path, dynamic_ranges=amax, input_shapes={"input": (1, 3, 224, 224)})
    assert len(engine) > 0
