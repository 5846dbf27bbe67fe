"""The TensorRT adapter against a REAL TensorRT (8.5, 8.6 or 10.x) and a real GPU.

These are the only trtcal tests allowed to skip: TensorRT cannot be installed on the CI machines
(its wheels download from NVIDIA's index), so every test here skips cleanly where `tensorrt` or a
CUDA device is missing. `test_device_buffers_*` need only cuda-python and a GPU (no TensorRT).

Run where TensorRT exists:  pytest -m "tensorrt or gpu" tests/tensorrt -v -s
(-s shows the scale comparisons the tests print).

TensorRT 8.5.3 ran these on an H100 (docs/tensorrt.md; `tools/trt85/device_tests.sh` sends the
payload and runs them). Where the machine lacks scikit-image, set TRTCAL_TEST_PHOTOS to a uint8 NCHW
.npy of the same 32 views (tools/trt85/make_views.py); TRTCAL_TEST_MODEL names the model. Where a
threshold fails, read the printed comparison before loosening anything.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from trtcal.core import read_trt_cache, write_trt_cache
from trtcal.errors import BackendUnavailableError
from trtcal.runners import tensorrt as adapter
from trtcal.runners.tensorrt.version import _trt_version_int

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
    try:
        adapter.check_tensorrt_version(str(module.__version__))
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    _cuda_runtime()
    return module


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """32 real photo views preprocessed as the model expects (tests/fixtures/data.py)."""
    saved = os.environ.get("TRTCAL_TEST_PHOTOS")
    if saved:  # the same views as uint8 NCHW (tools/trt85/make_views.py), for machines without skimage
        views = np.load(saved)
        return {"input": ((views.astype(np.float32) - np.float32(127.0)) / np.float32(128.0)).astype(np.float32)}
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
    with pytest.raises(BackendUnavailableError, match="cudaFree"):
        memory.free(pointers["a"])  # already freed: the real runtime reports it


@pytest.mark.gpu
def test_impossible_allocation_is_a_clear_error():
    _cuda_runtime()
    memory = adapter.load_device_memory()
    with pytest.raises(BackendUnavailableError, match="cudaMalloc"):
        memory.malloc(1 << 60)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_live_entropy2_calibration_gives_a_cache_tensorrt_then_accepts(efficientnet_path: Path, trt, photos, tmp_path):
    from trtcal.batch import batch_from_arrays

    batch = batch_from_arrays(photos)
    cache = adapter.calibrate_with_tensorrt(efficientnet_path, batch, algorithm="entropy2", micro_batch=MICRO_BATCH)
    parsed = read_trt_cache(cache)
    assert parsed.header == f"TRT-{_trt_version_int(trt)}-EntropyCalibration2"
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


def _onnx_entropy2_amax(efficientnet_path: Path, batch: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """(trtcal entropy2 amax, bin width) of every float activation, from ONNX Runtime on the CPU."""
    import onnx
    import onnxruntime as ort

    from trtcal.core import compute_amax, histogram_of

    model = onnx.shape_inference.infer_shapes(onnx.load(str(efficientnet_path)))
    graph = model.graph
    known = {o.name for o in graph.output}
    for info in graph.value_info:
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and info.name not in known:
            graph.output.append(onnx.helper.make_tensor_value_info(info.name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, {"input": batch["input"]})))
    values["input"] = batch["input"]
    out = {}
    for name, value in values.items():
        hist = histogram_of(value)
        if hist.hist_amax > 0:
            out[name] = (compute_amax(hist.counts, hist.hist_amax, "entropy2"), hist.hist_amax / hist.num_bins)
    return out


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_single_batch_entropy2_is_tensorrt_rule(efficientnet_path: Path, trt, photos):
    # One batch of 32: TensorRT's histogram range is the exact max, as in trtcal (docs/algorithms.md).
    n = photos["input"].shape[0]
    cache = adapter.calibrate_with_tensorrt(efficientnet_path, photos, algorithm="entropy2", micro_batch=n)
    theirs = read_trt_cache(cache).scale
    ours = _onnx_entropy2_amax(efficientnet_path, photos)
    scale = {name: float(np.float32(np.float32(a) / np.float32(127.0))) for name, (a, _) in ours.items()}
    shared = [name for name in theirs if name in ours]
    exact = [name for name in shared if scale[name] == theirs[name]]
    one_bin = [name for name in shared if abs(theirs[name] * 127 - ours[name][0]) <= 1.0001 * ours[name][1]]
    print(
        f"\nentropy2, one batch of {n}: {len(shared)} shared tensors, {len(exact)} bit-exact, "
        f"{len(one_bin)} within one bin (ONNX Runtime's CPU activations vs TensorRT's GPU ones)"
    )
    assert theirs["input"] == scale["input"]  # identical data: TensorRT's rule, bit for bit
    # Measured on TensorRT 8.5.3: 93 of 95 within one bin (two depthwise convolutions, the spike case).
    assert len(one_bin) >= 0.95 * len(shared)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_backend_tensorrt_through_the_actor_uses_one_batch(efficientnet_path: Path, trt, photos, tmp_path):
    # `trtcal calibrate --backend tensorrt` minus Ray: the actor's own work function, on this GPU.
    from trtcal.config import CalibrationConfig
    from trtcal.core import compute_amax, histogram_of
    from trtcal.orchestrator.actor import ActorRequest, run_calibration

    data = tmp_path / "photos.npy"
    np.save(data, photos["input"])
    n = photos["input"].shape[0]
    request = ActorRequest(
        efficientnet_path.read_bytes(), str(data), CalibrationConfig(algorithms=("entropy2",), micro_batch=8),
        backend="tensorrt", model_label=str(efficientnet_path),
    )
    result = run_calibration(request)
    assert result.runner["kind"] == "tensorrt-cuda" and result.runner["tensorrt_batch"] == n  # not --micro-batch 8
    assert result.warnings == ()
    parsed = read_trt_cache(result.files["calibration.cache"])
    assert parsed.header.endswith("-EntropyCalibration2") and len(parsed.scale) > 50
    hist = histogram_of(np.abs(photos["input"]))
    ours = float(np.float32(np.float32(compute_amax(hist.counts, hist.hist_amax, "entropy2")) / np.float32(127.0)))
    assert parsed.scale["input"] == ours  # one batch of all samples: TensorRT's rule = trtcal's, bit for bit
    assert result.files["model.qdq.onnx"][:4]  # the Q/DQ model from TensorRT's scales
    print(f"\nactor, backend tensorrt: one batch of {n}, {len(parsed.scale)} scales, {result.timings}")
