"""trtcal.runners.tensorrt and `trtcal engine build`, tested WITHOUT TensorRT.

TensorRT cannot be installed on the CI machines, so everything around the TensorRT calls runs
here against two STAND-INS, each injected into sys.modules inside a test only:

* `make_fake_tensorrt()` builds a `tensorrt` module. Its calibrator base classes copy the CLASS
  SHAPE of TensorRT 10's Python bindings (python/src/infer/pyInt8.cpp: the four calibrator names,
  `get_algorithm`, the CalibrationAlgoType values, and pybind11's rule that a subclass must call
  the base `__init__`), and nothing more. Its Builder / OnnxParser / network objects only record
  what the adapter sets and call a calibrator in the order TensorRT documents
  (read_calibration_cache; if that is not accepted, get_batch until it returns None; then
  write_calibration_cache). They compute nothing TensorRT computes, except max|input| over the
  served batches, which proves the bytes reached the device pointers in the right order.
* `FakeCudart` stands in for cuda-python's runtime module: cudaMalloc / cudaMemcpy / cudaFree
  over host memory, recording every call.

So these tests check trtcal's side of the contract. Whether TensorRT accepts the caches, what
scales it computes, and how the real bindings behave are checked by
tests/tensorrt/test_real_tensorrt.py where TensorRT and a GPU exist (docs/tensorrt.md says what
has and has not been run).
"""

from __future__ import annotations

import ctypes
import enum
import logging
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from trtcal.cli import main as cli_main
from trtcal.core import read_trt_cache, write_trt_cache
from trtcal.errors import (
    BackendUnavailableError,
    CacheFormatError,
    ConfigError,
    DataError,
    ModelError,
)
from trtcal.progress import RecordingProgress
from trtcal.runners import tensorrt as adapter
from trtcal.runners.tensorrt import feed

# --------------------------------------------------------------------------------------------
# Stand-in: cuda-python runtime over host memory
# --------------------------------------------------------------------------------------------


class FakeCudart:
    """cudaMalloc/cudaMemcpy/cudaFree with cuda-python's return conventions ((err, value) tuples)."""

    class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's name
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, *, fail_malloc: bool = False):
        self.blocks: dict[int, Any] = {}
        self.calls: list[tuple[str, int]] = []
        self.fail_malloc = fail_malloc

    def cudaMalloc(self, nbytes: int):  # noqa: N802
        self.calls.append(("malloc", nbytes))
        if self.fail_malloc:
            return (self.cudaError_t.cudaErrorMemoryAllocation, 0)
        block = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(block)] = block
        return (self.cudaError_t.cudaSuccess, ctypes.addressof(block))

    def cudaMemcpy(self, dst: int, src: int, count: int, kind):  # noqa: N802
        self.calls.append(("memcpy", count))
        device = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        if device not in self.blocks or count > len(self.blocks[device]):
            return (self.cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove(dst, src, count)
        return (self.cudaError_t.cudaSuccess,)

    def cudaFree(self, ptr: int):  # noqa: N802
        self.calls.append(("free", ptr))
        if self.blocks.pop(ptr, None) is None:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        return (self.cudaError_t.cudaSuccess,)

    def cudaGetErrorName(self, err):  # noqa: N802
        return (self.cudaError_t.cudaSuccess, err.name.encode())

    def count(self, what: str) -> int:
        return sum(1 for call in self.calls if call[0] == what)

    def read(self, ptr: int, shape, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(ctypes.string_at(ptr, nbytes), dtype=dtype).reshape(shape).copy()


# --------------------------------------------------------------------------------------------
# Stand-in: the `tensorrt` module (class shape only; see the module docstring)
# --------------------------------------------------------------------------------------------

HEADER_OF_ALGO = {
    0: "LegacyCalibration",
    1: "EntropyCalibration",
    2: "EntropyCalibration2",
    3: "MinMaxCalibration",
}


def _version_int(version: str) -> int:
    major, minor, patch = (int(p) for p in version.split(".")[:3])
    return major * 10000 + minor * 100 + patch


def make_fake_tensorrt(version: str = "10.16.1.11") -> ModuleType:
    trt = ModuleType("tensorrt")
    trt.__version__ = version
    trt.reject_cache = False  # knob: behave as if TensorRT rejected every cache
    trt.fail_build = False  # knob: build_serialized_network returns None
    trt.builders = []

    class CalibrationAlgoType(enum.IntEnum):
        LEGACY_CALIBRATION = 0
        ENTROPY_CALIBRATION = 1
        ENTROPY_CALIBRATION_2 = 2
        MINMAX_CALIBRATION = 3

    class _PybindLike(type):
        # pybind11 refuses an instance whose subclass __init__ skipped the base __init__.
        def __call__(cls, *args, **kwargs):
            obj = super().__call__(*args, **kwargs)
            if not getattr(obj, "_base_initialised", False):
                raise TypeError(f"{cls.__name__}.__init__() must be called when overriding __init__")
            return obj

    class IInt8Calibrator(metaclass=_PybindLike):
        _algo: CalibrationAlgoType | None = None

        def __init__(self):
            self._base_initialised = True

        def get_algorithm(self):
            return self._algo

    class IInt8LegacyCalibrator(IInt8Calibrator):
        _algo = CalibrationAlgoType.LEGACY_CALIBRATION

    class IInt8EntropyCalibrator(IInt8Calibrator):
        _algo = CalibrationAlgoType.ENTROPY_CALIBRATION

    class IInt8EntropyCalibrator2(IInt8Calibrator):
        _algo = CalibrationAlgoType.ENTROPY_CALIBRATION_2

    class IInt8MinMaxCalibrator(IInt8Calibrator):
        _algo = CalibrationAlgoType.MINMAX_CALIBRATION

    class ILogger:
        class Severity(enum.IntEnum):
            INTERNAL_ERROR = 0
            ERROR = 1
            WARNING = 2
            INFO = 3
            VERBOSE = 4

        def __init__(self):
            self._base_initialised = True

    class DataType(enum.IntEnum):
        FLOAT = 0
        HALF = 1
        INT8 = 2
        INT32 = 3
        BOOL = 4
        INT64 = 8

    class BuilderFlag(enum.IntEnum):
        FP16 = 0
        INT8 = 2

    class QuantizationFlag(enum.IntEnum):
        CALIBRATE_BEFORE_FUSION = 0

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class Tensor:
        def __init__(self, name, shape=(), dtype=DataType.FLOAT):
            self.name, self.shape, self.dtype = name, tuple(shape), dtype
            self.dynamic_range = None

        def set_dynamic_range(self, lo, hi):
            self.dynamic_range = (lo, hi)
            return True

    class Layer:
        def __init__(self, outputs):
            self._outputs = outputs
            self.num_outputs = len(outputs)

        def get_output(self, j):
            return self._outputs[j]

    class Network:
        def __init__(self):
            self.inputs, self.layers = [], []

        num_inputs = property(lambda self: len(self.inputs))
        num_layers = property(lambda self: len(self.layers))

        def get_input(self, i):
            return self.inputs[i]

        def get_layer(self, i):
            return self.layers[i]

    class ParserError:
        def __init__(self, text):
            self.text = text

        def __str__(self):
            return self.text

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

        def parse_from_file(self, path):
            try:
                graph = onnx.load(path, load_external_data=False).graph
            except Exception as exc:
                self.errors.append(
                    ParserError(f"ModelImporter: failed to parse {path}: {type(exc).__name__}")
                )
                return False
            initializers = {init.name for init in graph.initializer}
            for value in graph.input:
                if value.name not in initializers:
                    dims = [
                        d.dim_value if d.HasField("dim_value") else -1
                        for d in value.type.tensor_type.shape.dim
                    ]
                    self.network.inputs.append(Tensor(value.name, dims))
            for node in graph.node:
                self.network.layers.append(Layer([Tensor(name) for name in node.output]))
            return True

    class OptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class BuilderConfig:
        def __init__(self):
            self.flags, self.quantization_flags, self.pool_limits = set(), set(), {}
            self.profiles, self.calibration_profile, self.int8_calibrator = [], None, None
            self.builder_optimization_level = 3

        def set_flag(self, flag):
            self.flags.add(flag)

        def set_quantization_flag(self, flag):
            self.quantization_flags.add(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pool_limits[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile):
            self.calibration_profile = profile
            return True

        # Timing cache as in TensorRT: bytes in, a cache object whose serialize() grows per build.
        def create_timing_cache(self, data):
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.data and not cache.data.startswith(b"timing:"):
                return False
            self.timing_cache = cache
            return True

        def get_timing_cache(self):
            return getattr(self, "timing_cache", None)

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return HostMemory((self.data or b"timing:") + b"+")

    class HostMemory:
        def __init__(self, data):
            self.data = data

        def __bytes__(self):
            return self.data

    class Builder:
        platform_has_fast_int8 = True

        def __init__(self, logger):
            if not getattr(logger, "_base_initialised", False):
                raise TypeError("logger base __init__ not called")
            self.logger = logger
            self.served: dict[str, list[np.ndarray]] = {}
            trt.builders.append(self)

        def create_network(self, flags=0):
            self.network = Network()
            return self.network

        def create_builder_config(self):
            self.config = BuilderConfig()
            return self.config

        def create_optimization_profile(self):
            return OptimizationProfile()

        def _calibration_shape(self, config, tensor):
            if -1 not in tensor.shape:
                return tensor.shape
            if config.calibration_profile is None or tensor.name not in config.calibration_profile.shapes:
                return None
            return config.calibration_profile.shapes[tensor.name][1]

        def build_serialized_network(self, network, config):
            calibrator = config.int8_calibrator
            if calibrator is not None and BuilderFlag.INT8 in config.flags:
                expected = f"TRT-{_version_int(version)}-{HEADER_OF_ALGO[int(calibrator.get_algorithm())]}"
                cache = calibrator.read_calibration_cache()
                header = None if cache is None else bytes(cache).split(b"\n", 1)[0].decode()
                if header != expected or trt.reject_cache:
                    if cache is not None:
                        self.logger.log(
                            ILogger.Severity.WARNING, "Calibration table does not match calibrator"
                        )
                    names = [t.name for t in network.inputs]
                    shapes = [self._calibration_shape(config, t) for t in network.inputs]
                    if None in shapes:
                        self.logger.log(ILogger.Severity.ERROR, "calibration profile is not set")
                        return None
                    while True:
                        pointers = calibrator.get_batch(names)
                        if not pointers:
                            break
                        assert len(pointers) == len(names)
                        for name, shape, ptr in zip(names, shapes, pointers):
                            nbytes = int(np.prod(shape)) * 4
                            data = np.frombuffer(ctypes.string_at(ptr, nbytes), np.float32).reshape(shape)
                            self.served.setdefault(name, []).append(data.copy())
                    if not self.served:
                        self.logger.log(
                            ILogger.Severity.ERROR, "Calibration failure: no scaling factors detected"
                        )
                        return None
                    lines = [expected]
                    for name, batches in self.served.items():
                        scale = np.float32(np.abs(np.concatenate(batches)).max()) / np.float32(127.0)
                        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
                    calibrator.write_calibration_cache(memoryview(("\n".join(lines) + "\n").encode()))
            if trt.fail_build:
                self.logger.log(ILogger.Severity.ERROR, "Internal error: no implementation found")
                return None
            return HostMemory(b"fake-engine")

    def init_libnvinfer_plugins(logger, namespace):
        return True

    for obj in (
        CalibrationAlgoType,
        IInt8Calibrator,
        IInt8LegacyCalibrator,
        IInt8EntropyCalibrator,
        IInt8EntropyCalibrator2,
        IInt8MinMaxCalibrator,
        ILogger,
        DataType,
        BuilderFlag,
        QuantizationFlag,
        MemoryPoolType,
        OnnxParser,
        Builder,
        init_libnvinfer_plugins,
    ):
        setattr(trt, obj.__name__, obj)
    return trt


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_trt(monkeypatch):
    trt = make_fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def _install_cuda_bindings(monkeypatch, runtime) -> None:
    cuda, bindings = ModuleType("cuda"), ModuleType("cuda.bindings")
    bindings.runtime = runtime
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)


@pytest.fixture
def cudart(monkeypatch):
    fake = FakeCudart()
    _install_cuda_bindings(monkeypatch, fake)
    return fake


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    """A real ONNX model: x [N, 3, 4, 4] -> Conv -> Relu -> y, dynamic batch."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, [2, 3, 1, 1], rng.standard_normal(6).astype(np.float32)
    )
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["conv_out"]), helper.make_node("Relu", ["conv_out"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [weight],
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def _data(n: int = 12, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 3, 4, 4)).astype(np.float32)}


def _scale_hex(amax: float) -> str:
    return struct.pack(">f", np.float32(amax) / np.float32(127.0)).hex()


class DictStore:
    """The smallest BytesStore: a dict."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.puts: list[str] = []

    def get_bytes(self, key):
        return self.data.get(key)

    def put_bytes(self, key, data):
        self.puts.append(key)
        self.data[key] = bytes(data)


# --------------------------------------------------------------------------------------------
# Version detection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["10.0.1", "10.3.0.26", "10.16.1.11"])
def test_tensorrt_10_is_accepted(version):
    assert adapter.check_tensorrt_version(version)[0] == 10


@pytest.mark.parametrize("version", ["11.0.0.114", "11.4.0.106", "12.0"])
def test_tensorrt_11_and_later_explain_removed_calibration(version):
    with pytest.raises(BackendUnavailableError) as info:
        adapter.check_tensorrt_version(version)
    message = str(info.value)
    assert version in message and "removed in 11.0" in message and "trtcal export qdq" in message


@pytest.mark.parametrize("version", ["8.5.3.1", "8.6.1.6"])
def test_tensorrt_85_and_86_are_accepted(version):
    # TensorRT 8.5.3 ran tests/tensorrt for real (docs/tensorrt.md)
    assert adapter.check_tensorrt_version(version)[:2] == tuple(int(p) for p in version.split(".")[:2])


@pytest.mark.parametrize("version", ["8.4.3.1", "7.2.3", "9.3.0.1"])
def test_tensorrt_older_than_85_is_refused(version):
    with pytest.raises(BackendUnavailableError, match="needs TensorRT 8.5, 8.6 or 10.x"):
        adapter.check_tensorrt_version(version)
    with pytest.raises(BackendUnavailableError, match="cannot read the TensorRT version"):
        adapter.check_tensorrt_version("unknown")


def test_missing_tensorrt_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(BackendUnavailableError) as info:
        adapter.load_tensorrt()
    assert "pip install 'trtcal[tensorrt]'" in str(info.value) and "NVIDIA" in str(info.value)


def test_placeholder_tensorrt_without_version_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", ModuleType("tensorrt"))
    with pytest.raises(BackendUnavailableError, match="placeholder"):
        adapter.load_tensorrt()


def test_load_tensorrt_returns_a_10x_module(fake_trt):
    assert adapter.load_tensorrt() is fake_trt


def test_tensorrt_11_is_refused_before_any_cuda_call(monkeypatch, cudart):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt("11.1.0.106"))
    with pytest.raises(BackendUnavailableError, match="trtcal export qdq"):
        adapter.make_calibrator("entropy2", _data(), micro_batch=4)
    with pytest.raises(BackendUnavailableError, match="no longer exists in TensorRT 11"):
        adapter.make_replay_calibrator(
            write_trt_cache({"x": 1.0}, trt_version="10.3.0", algorithm="entropy2")
        )
    assert cudart.calls == []


# --------------------------------------------------------------------------------------------
# Micro-batches
# --------------------------------------------------------------------------------------------


def test_whole_batch_is_cut_into_views_in_order():
    data = _data(12)
    batches = list(adapter.iter_micro_batches(data, 4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 4]
    for i, batch in enumerate(batches):
        np.testing.assert_array_equal(batch["x"], data["x"][4 * i : 4 * i + 4])
        assert np.shares_memory(batch["x"], data["x"])  # slices, not copies


def test_chunks_of_any_size_are_recut_to_the_micro_batch():
    data = _data(12)["x"]
    chunks = [{"x": data[:3]}, {"x": data[3:8]}, {"x": data[8:8]}, {"x": data[8:]}]
    batches = list(adapter.iter_micro_batches(chunks, 4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 4]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), data)


def test_partial_last_micro_batch_is_an_error_by_default():
    with pytest.raises(DataError) as info:
        list(adapter.iter_micro_batches(_data(10), 4))
    assert "10 samples" in str(info.value) and "partial_batch='drop'" in str(info.value)


def test_partial_last_micro_batch_can_be_dropped(caplog):
    data = _data(10)
    with caplog.at_level(logging.WARNING):
        batches = list(adapter.iter_micro_batches(data, 4, partial_batch="drop"))
    assert [b["x"].shape[0] for b in batches] == [4, 4]
    assert "dropping the last 2 of 10" in caplog.text


def test_micro_batch_none_serves_items_as_they_are():
    items = [{"x": np.ones((2, 3))}, {"x": np.zeros((5, 3))}]
    assert [b["x"].shape for b in adapter.iter_micro_batches(items, None)] == [(2, 3), (5, 3)]


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ([{"x": np.ones((2, 3))}, {"y": np.ones((2, 3))}], "earlier items had"),
        ([{"x": np.ones((2, 3)), "y": np.ones((3, 3))}], "different numbers of samples"),
        ([np.ones((2, 3))], "expected a mapping"),
        ([{}], "holds no inputs"),
        ([{"x": np.float32(1.0)}], "scalar"),
        ([], "empty"),
        ({"x": np.ones((0, 3))}, "empty"),
    ],
)
def test_malformed_batch_sources_are_reported(source, match):
    with pytest.raises(DataError, match=match):
        list(adapter.iter_micro_batches(source, 2))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=6),
    micro_batch=st.integers(min_value=1, max_value=7),
)
def test_recutting_preserves_every_sample_in_order(sizes, micro_batch):
    total = sum(sizes)
    data = np.arange(total * 2, dtype=np.float32).reshape(total, 2)
    bounds = np.cumsum([0, *sizes])
    chunks = [{"x": data[a:b]} for a, b in zip(bounds[:-1], bounds[1:])]
    full = total // micro_batch
    if full == 0:
        with pytest.raises(DataError):
            list(adapter.iter_micro_batches(chunks, micro_batch, partial_batch="drop"))
        return
    batches = list(adapter.iter_micro_batches(chunks, micro_batch, partial_batch="drop"))
    assert all(b["x"].shape == (micro_batch, 2) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), data[: full * micro_batch])


# --------------------------------------------------------------------------------------------
# Live calibrators: classes, get_batch, buffers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "base", "algo_value"),
    [
        ("entropy2", "IInt8EntropyCalibrator2", 2),
        ("minmax", "IInt8MinMaxCalibrator", 3),
        ("entropy", "IInt8EntropyCalibrator", 1),
        ("legacy", "IInt8LegacyCalibrator", 0),
    ],
)
def test_each_algorithm_subclasses_its_tensorrt_calibrator(fake_trt, cudart, algorithm, base, algo_value):
    calibrator = adapter.make_calibrator(algorithm, _data(), micro_batch=4)
    assert isinstance(calibrator, getattr(fake_trt, base))
    assert isinstance(calibrator, adapter.ArrowBatchCalibrator)
    assert calibrator._base_initialised  # the pybind11 base __init__ was called
    assert int(calibrator.get_algorithm()) == algo_value
    assert calibrator.get_batch_size() == 1
    assert hasattr(calibrator, "get_quantile") == (algorithm == "legacy")


def test_legacy_calibrator_parameters(fake_trt, cudart):
    calibrator = adapter.make_calibrator(
        "legacy", _data(), micro_batch=4, quantile=0.999, regression_cutoff=0.5
    )
    assert calibrator.get_quantile() == 0.999
    assert calibrator.get_regression_cutoff() == 0.5
    assert calibrator.read_histogram_cache(0) is None


def test_legacy_histogram_cache_is_read_from_the_capsule_tensorrt_passes(fake_trt, cudart):
    calibrator = adapter.make_calibrator("legacy", _data(), micro_batch=4)
    payload = ctypes.create_string_buffer(b"histogram-bytes\x00\x01", 17)
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    capsule = new_capsule(ctypes.addressof(payload), None, None)  # what pybind11 makes of a void*
    calibrator.write_histogram_cache(capsule, 17)
    assert calibrator.histogram_cache == b"histogram-bytes\x00\x01"
    assert not calibrator.failed


@pytest.mark.parametrize("algorithm", ["percentile", "mse", "kl"])
def test_algorithms_tensorrt_lacks_are_config_errors(fake_trt, cudart, algorithm):
    with pytest.raises(ConfigError, match="not a TensorRT calibrator"):
        adapter.make_calibrator(algorithm, _data(), micro_batch=4)


def test_get_batch_serves_every_micro_batch_then_none_and_frees(fake_trt, cudart):
    data = _data(12)
    progress = RecordingProgress()
    calibrator = adapter.make_calibrator("entropy2", data, micro_batch=4, progress=progress)
    pointers = []
    for i in range(3):
        pointers.append(calibrator.get_batch(["x"]))
        np.testing.assert_array_equal(
            cudart.read(pointers[-1][0], (4, 3, 4, 4), np.float32), data["x"][4 * i : 4 * i + 4]
        )
    assert len({p[0] for p in pointers}) == 1  # the same buffer every time
    assert calibrator.get_batch(["x"]) is None
    assert calibrator.get_batch(["x"]) is None  # stays at the end
    assert cudart.count("malloc") == 1 and cudart.count("memcpy") == 3 and cudart.count("free") == 1
    assert cudart.blocks == {}
    assert progress.events == [("start", adapter.STAGE, 3)] + [("advance", adapter.STAGE, 1)] * 3 + [
        ("finish", adapter.STAGE, None)
    ]
    assert not calibrator.failed


def test_pointers_follow_the_order_of_names(fake_trt, cudart):
    rng = np.random.default_rng(2)
    data = {
        "a": rng.standard_normal((4, 5)).astype(np.float32),
        "b": rng.integers(0, 9, (4, 2)).astype(np.int32),
    }
    calibrator = adapter.make_calibrator("minmax", data, micro_batch=2)
    first = calibrator.get_batch(["b", "a"])
    np.testing.assert_array_equal(cudart.read(first[0], (2, 2), np.int32), data["b"][:2])
    np.testing.assert_array_equal(cudart.read(first[1], (2, 5), np.float32), data["a"][:2])
    second = calibrator.get_batch(["a", "b"])
    assert second == [first[1], first[0]]
    np.testing.assert_array_equal(cudart.read(second[0], (2, 5), np.float32), data["a"][2:])
    assert cudart.count("malloc") == 2  # one buffer per input, allocated once


def test_non_contiguous_input_is_copied_as_its_logical_values(fake_trt, cudart):
    base = _data(8)["x"]
    strided = base.transpose(0, 1, 3, 2)  # not C-contiguous
    calibrator = adapter.make_calibrator("entropy2", {"x": strided}, micro_batch=8)
    (ptr,) = calibrator.get_batch(["x"])
    np.testing.assert_array_equal(cudart.read(ptr, strided.shape, np.float32), strided)


def test_context_manager_frees_buffers_before_the_end(fake_trt, cudart):
    with adapter.make_calibrator("entropy2", _data(12), micro_batch=4) as calibrator:
        calibrator.get_batch(["x"])
        assert len(cudart.blocks) == 1
    assert cudart.blocks == {} and cudart.count("free") == 1
    calibrator.close()  # idempotent
    assert cudart.count("free") == 1
    assert calibrator.get_batch(["x"]) is None


def test_exception_in_batch_source_is_logged_kept_and_reraised(fake_trt, cudart, caplog):
    def source():
        yield _data(4)
        raise RuntimeError("decoder exploded on sample 4")

    calibrator = adapter.make_calibrator("entropy2", source(), micro_batch=4)
    with caplog.at_level(logging.ERROR):
        assert calibrator.get_batch(["x"]) is not None
        assert calibrator.get_batch(["x"]) is None  # TensorRT would just see the end of data
    assert calibrator.failed and calibrator.errors[0][0] == "get_batch"
    assert "get_batch() raised RuntimeError" in caplog.text and "batches served=1" in caplog.text
    with pytest.raises(RuntimeError, match="decoder exploded") as info:
        calibrator.raise_if_failed()
    assert any("called by TensorRT" in note for note in getattr(info.value, "__notes__", []))
    calibrator.close()


def test_missing_input_name_is_a_data_error(fake_trt, cudart):
    calibrator = adapter.make_calibrator("entropy2", _data(), micro_batch=4)
    assert calibrator.get_batch(["x", "mask"]) is None
    with pytest.raises(DataError, match=r"\['mask'\]"):
        calibrator.raise_if_failed()
    assert cudart.count("malloc") == 0


def test_batches_are_checked_against_what_tensorrt_reads(fake_trt, cudart):
    calibrator = adapter.make_calibrator("entropy2", _data(8), micro_batch=4)
    calibrator.set_input_metadata({"x": ((8, 3, 4, 4), np.float32)})
    assert calibrator.get_batch(["x"]) is None
    with pytest.raises(DataError, match=r"TensorRT calibrates it at \[8, 3, 4, 4\]"):
        calibrator.raise_if_failed()

    calibrator = adapter.make_calibrator("entropy2", {"x": _data(8)["x"].astype(np.float64)}, micro_batch=4)
    calibrator.set_input_metadata({"x": ((-1, 3, 4, 4), np.float32)})
    assert calibrator.get_batch(["x"]) is None
    with pytest.raises(DataError, match="is float64, but TensorRT reads float32"):
        calibrator.raise_if_failed()


def test_unevenly_shaped_items_are_refused_once_buffers_exist(fake_trt, cudart):
    items = [{"x": np.ones((2, 3), np.float32)}, {"x": np.ones((3, 3), np.float32)}]
    calibrator = adapter.make_calibrator("entropy2", items)
    assert calibrator.get_batch(["x"]) is not None
    assert calibrator.get_batch(["x"]) is None
    with pytest.raises(DataError, match="allocated for float32"):
        calibrator.raise_if_failed()
    assert cudart.count("malloc") == 1


def test_cuda_allocation_failure_is_reported_with_a_hint(fake_trt, monkeypatch):
    _install_cuda_bindings(monkeypatch, FakeCudart(fail_malloc=True))
    calibrator = adapter.make_calibrator("entropy2", _data(), micro_batch=4)
    assert calibrator.get_batch(["x"]) is None
    with pytest.raises(BackendUnavailableError, match="cudaErrorMemoryAllocation.*micro-batch"):
        calibrator.raise_if_failed()


def test_peek_then_serve_gives_the_first_micro_batch_once(fake_trt, cudart):
    data = _data(8)
    calibrator = adapter.make_calibrator("entropy2", iter([data]), micro_batch=4)  # a one-shot iterator
    assert calibrator.peek_shapes() == {"x": (4, 3, 4, 4)}
    assert calibrator.peek_shapes() == {"x": (4, 3, 4, 4)}
    served = []
    while (ptrs := calibrator.get_batch(["x"])) is not None:
        served.append(cudart.read(ptrs[0], (4, 3, 4, 4), np.float32))
    np.testing.assert_array_equal(np.concatenate(served), data["x"])


# --------------------------------------------------------------------------------------------
# CUDA module detection
# --------------------------------------------------------------------------------------------


def test_old_cuda_python_layout_is_used_when_bindings_are_missing(monkeypatch):
    fake = FakeCudart()
    cuda = ModuleType("cuda")
    cuda.cudart = fake
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", fake)
    memory = adapter.load_device_memory()
    assert isinstance(memory, adapter.CudaRuntimeMemory)
    ptr = memory.malloc(8)
    host = np.arange(2, dtype=np.float32)
    memory.copy_to_device(ptr, host)
    back = np.zeros(2, np.float32)
    memory.copy_to_host(back, ptr)
    memory.free(ptr)
    np.testing.assert_array_equal(back, host)
    assert [c[0] for c in fake.calls] == ["malloc", "memcpy", "memcpy", "free"]


def test_no_cuda_module_at_all_is_a_clear_error(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.cudart", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError, match="pip install cuda-python"):
        adapter.load_device_memory()


def test_double_free_is_a_cuda_error():
    memory = adapter.CudaRuntimeMemory(FakeCudart())
    ptr = memory.malloc(4)
    memory.free(ptr)
    with pytest.raises(BackendUnavailableError, match="cudaFree failed: cudaErrorInvalidValue"):
        memory.free(ptr)


# --------------------------------------------------------------------------------------------
# Cache policy
# --------------------------------------------------------------------------------------------

TRT_CACHE = b"TRT-101601-EntropyCalibration2\nx: 3c010a14\nconv_out: 3d000000\n"


def test_file_cache_miss_then_write_then_hit(fake_trt, cudart, tmp_path):
    path = tmp_path / "sub" / "calibration.cache"
    first = adapter.make_calibrator("entropy2", _data(), micro_batch=4, cache=path)
    assert first.read_calibration_cache() is None
    first.write_calibration_cache(memoryview(TRT_CACHE))
    assert path.read_bytes() == TRT_CACHE and first.calibration_cache == TRT_CACHE
    assert [p.name for p in path.parent.iterdir()] == ["calibration.cache"]  # no temporary left behind

    second = adapter.make_calibrator("entropy2", _data(), micro_batch=4, cache=path)
    assert second.read_calibration_cache() == TRT_CACHE
    assert not second.failed


def test_file_cache_with_another_header_is_an_error_not_a_silent_recalibration(fake_trt, cudart, tmp_path):
    path = tmp_path / "calibration.cache"
    path.write_bytes(TRT_CACHE.replace(b"101601", b"100300"))
    calibrator = adapter.make_calibrator("entropy2", _data(), micro_batch=4, cache=path)
    assert calibrator.read_calibration_cache() is None
    with pytest.raises(CacheFormatError) as info:
        calibrator.raise_if_failed()
    message = str(info.value)
    assert "TRT-100300-EntropyCalibration2" in message and "TRT-101601-EntropyCalibration2" in message
    assert str(path) in message and "--cache" in message
    assert path.read_bytes() == TRT_CACHE.replace(b"101601", b"100300")  # untouched


def test_minmax_calibrator_refuses_an_entropy2_cache(fake_trt, cudart, tmp_path):
    path = tmp_path / "calibration.cache"
    path.write_bytes(TRT_CACHE)
    calibrator = adapter.make_calibrator("minmax", _data(), micro_batch=4, cache=path)
    assert calibrator.read_calibration_cache() is None
    with pytest.raises(CacheFormatError, match="TRT-101601-MinMaxCalibration"):
        calibrator.raise_if_failed()


def test_malformed_and_empty_cache_files(fake_trt, cudart, tmp_path, caplog):
    path = tmp_path / "calibration.cache"
    path.write_bytes(b"TRT-101601-EntropyCalibration2\nx: nothex\n")
    calibrator = adapter.make_calibrator("entropy2", _data(), micro_batch=4, cache=path)
    assert calibrator.read_calibration_cache() is None
    with pytest.raises(CacheFormatError, match="line 2"):
        calibrator.raise_if_failed()

    path.write_bytes(b"")
    calibrator = adapter.make_calibrator("entropy2", _data(), micro_batch=4, cache=path)
    with caplog.at_level(logging.WARNING):
        assert calibrator.read_calibration_cache() is None
    assert "is empty" in caplog.text and not calibrator.failed


def test_store_cache_key_carries_version_algorithm_and_micro_batch(fake_trt, cudart):
    store = DictStore()
    calibrator = adapter.make_calibrator(
        "entropy2", _data(), micro_batch=4, cache=store, cache_key="model+batch"
    )
    assert calibrator.read_calibration_cache() is None
    calibrator.write_calibration_cache(memoryview(TRT_CACHE))
    key = adapter.tensorrt_cache_key(
        "model+batch", trt_version="10.16.1", algorithm="entropy2", micro_batch=4
    )
    assert store.puts == [key] and store.data[key] == TRT_CACHE

    again = adapter.make_calibrator("entropy2", _data(), micro_batch=4, cache=store, cache_key="model+batch")
    assert again.read_calibration_cache() == TRT_CACHE

    keys = {
        key,
        adapter.tensorrt_cache_key("model+batch", trt_version="10.3.0", algorithm="entropy2", micro_batch=4),
        adapter.tensorrt_cache_key("model+batch", trt_version="10.16.1", algorithm="minmax", micro_batch=4),
        adapter.tensorrt_cache_key("model+batch", trt_version="10.16.1", algorithm="entropy2", micro_batch=8),
        adapter.tensorrt_cache_key("other", trt_version="10.16.1", algorithm="entropy2", micro_batch=4),
        adapter.tensorrt_cache_key(
            "model+batch",
            trt_version="10.16.1",
            algorithm="legacy",
            micro_batch=4,
            quantile=0.5,
            regression_cutoff=1.0,
        ),
        adapter.tensorrt_cache_key(
            "model+batch",
            trt_version="10.16.1",
            algorithm="legacy",
            micro_batch=4,
            quantile=0.9,
            regression_cutoff=1.0,
        ),
    }
    assert len(keys) == 7 and all(len(k) == 64 for k in keys)
    assert key == adapter.tensorrt_cache_key(
        "model+batch", trt_version=101601, algorithm="EntropyCalibration2", micro_batch=4
    )


def test_store_needs_a_base_key_and_a_store_shape(fake_trt, cudart):
    with pytest.raises(ConfigError, match="cache_key"):
        adapter.make_calibrator("entropy2", _data(), micro_batch=4, cache=DictStore())
    with pytest.raises(ConfigError, match="get_bytes"):
        adapter.make_calibrator("entropy2", _data(), micro_batch=4, cache=object())


def test_store_that_raises_keyerror_is_a_miss_and_write_cache_false_writes_nothing(fake_trt, cudart):
    class RaisingStore(DictStore):
        def get_bytes(self, key):
            raise KeyError(key)

    store = RaisingStore()
    calibrator = adapter.make_calibrator(
        "entropy2", _data(), micro_batch=4, cache=store, cache_key="k", write_cache=False
    )
    assert calibrator.read_calibration_cache() is None
    calibrator.write_calibration_cache(memoryview(TRT_CACHE))
    assert store.puts == [] and calibrator.calibration_cache == TRT_CACHE and not calibrator.failed


def test_store_write_failure_is_kept_for_the_build(fake_trt, cudart):
    class ReadOnly(DictStore):
        def put_bytes(self, key, data):
            raise PermissionError("read-only store")

    calibrator = adapter.make_calibrator("entropy2", _data(), micro_batch=4, cache=ReadOnly(), cache_key="k")
    calibrator.write_calibration_cache(memoryview(TRT_CACHE))
    with pytest.raises(PermissionError):
        calibrator.raise_if_failed()


# --------------------------------------------------------------------------------------------
# Header rewriting and replay
# --------------------------------------------------------------------------------------------


def test_rewrite_changes_only_the_header_and_keeps_scale_bits():
    amax = {"input": 2.6400001, "(Unnamed Layer* 22) [Constant]_output": 0.5, "a:b": 255.0, "tiny": 1e-30}
    original = write_trt_cache(amax, trt_version="8.6.1", algorithm="minmax")
    rewritten = adapter.rewrite_cache_header(original, trt_version="10.16.1.11", algorithm="entropy2")
    header, _, body = rewritten.partition(b"\n")
    assert header == b"TRT-101601-EntropyCalibration2"
    assert body == original.partition(b"\n")[2]  # entries byte for byte
    assert read_trt_cache(rewritten).scale == read_trt_cache(original).scale


def test_rewrite_normalises_formatting_without_touching_values():
    messy = b"TRT-8601-EntropyCalibration2\r\ninput: 3c010a14\r\nsmall: 1\r\n\r\n"
    rewritten = adapter.rewrite_cache_header(messy, trt_version=100300, algorithm="minmax")
    assert rewritten == b"TRT-100300-MinMaxCalibration\ninput: 3c010a14\nsmall: 00000001\n"
    assert adapter.rewrite_cache_header(rewritten, trt_version=100300, algorithm="minmax") == rewritten


@pytest.mark.parametrize(
    ("data", "match"),
    [(b"", "empty"), (b"not a cache\n", "header"), (b"TRT-100300-MinMaxCalibration\n", "no tensors")],
)
def test_rewrite_refuses_what_is_not_a_cache(data, match):
    with pytest.raises(CacheFormatError, match=match):
        adapter.rewrite_cache_header(data, trt_version="10.3.0", algorithm="entropy2")


def test_replay_calibrator_serves_the_rewritten_cache(fake_trt):
    original = write_trt_cache({"x": 1.0, "y": 3.0}, trt_version="8.6.1", algorithm="entropy2")
    calibrator = adapter.make_replay_calibrator(original, algorithm="minmax")
    assert isinstance(calibrator, fake_trt.IInt8MinMaxCalibrator)
    served = calibrator.read_calibration_cache()
    assert served.startswith(b"TRT-101601-MinMaxCalibration\n")
    assert read_trt_cache(served).scale == read_trt_cache(original).scale
    assert calibrator.get_batch(["x"]) is None  # asked for data: TensorRT rejected it
    with pytest.raises(CacheFormatError, match="did not use the replayed calibration cache"):
        calibrator.raise_if_failed()


def test_replay_of_a_legacy_calibrator_is_refused(fake_trt):
    with pytest.raises(ConfigError, match="replay_algorithm"):
        adapter.make_replay_calibrator(TRT_CACHE, algorithm="legacy")


def test_replay_reads_a_cache_file_and_warns_for_an_unverified_header(fake_trt, tmp_path, caplog):
    path = tmp_path / "calibration.cache"
    path.write_bytes(TRT_CACHE)
    with caplog.at_level(logging.WARNING):
        calibrator = adapter.make_replay_calibrator(path, algorithm="entropy")
    assert calibrator.read_calibration_cache().startswith(b"TRT-101601-EntropyCalibration\n")
    assert "has not been seen in a real TensorRT cache" in caplog.text
    with pytest.raises(ConfigError, match="does not exist"):
        adapter.make_replay_calibrator(tmp_path / "missing.cache")


# --------------------------------------------------------------------------------------------
# Profile shapes
# --------------------------------------------------------------------------------------------


def test_profile_shapes_priority_and_validation():
    inputs = {"x": (-1, 3, 4, 4), "static": (2, 2)}
    assert adapter.resolve_profile_shapes(inputs) == {"x": ((1, 3, 4, 4),) * 3}
    assert adapter.resolve_profile_shapes(inputs, calibration_shapes={"x": (8, 3, 4, 4)}) == {
        "x": ((8, 3, 4, 4),) * 3
    }
    triple = ((1, 3, 4, 4), (8, 3, 4, 4), (16, 3, 4, 4))
    assert adapter.resolve_profile_shapes(
        inputs, input_shapes={"x": triple}, calibration_shapes={"x": (2, 3, 4, 4)}
    ) == {"x": triple}
    with pytest.raises(ConfigError, match="does not fit"):
        adapter.resolve_profile_shapes(inputs, input_shapes={"x": (8, 3, 5, 4)})
    with pytest.raises(ConfigError, match="not network inputs"):
        adapter.resolve_profile_shapes(inputs, input_shapes={"nope": (1,)})
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        adapter.resolve_profile_shapes(
            inputs, input_shapes={"x": ((8, 3, 4, 4), (1, 3, 4, 4), (16, 3, 4, 4))}
        )
    with pytest.raises(ConfigError, match="dynamic dimensions"):
        adapter.resolve_profile_shapes({"img": (1, 3, -1, -1)})


# --------------------------------------------------------------------------------------------
# build_engine and calibrate_with_tensorrt against the builder stand-in
# --------------------------------------------------------------------------------------------


def test_build_from_cache_replays_trtcal_scales(fake_trt, tiny_model):
    cache = write_trt_cache(
        {"x": 2.0, "conv_out": 4.0, "y": 4.0}, trt_version="10.3.0", algorithm="percentile"
    )
    engine = adapter.build_engine(
        tiny_model, cache=cache, workspace_bytes=1 << 20, builder_optimization_level=1
    )
    assert engine == b"fake-engine"
    builder = fake_trt.builders[-1]
    config = builder.config
    assert fake_trt.BuilderFlag.INT8 in config.flags and fake_trt.BuilderFlag.FP16 not in config.flags
    assert config.pool_limits == {fake_trt.MemoryPoolType.WORKSPACE: 1 << 20}
    assert config.builder_optimization_level == 1
    assert config.profiles[0].shapes == {"x": ((1, 3, 4, 4),) * 3}
    assert config.int8_calibrator.reads == 1 and builder.served == {}  # TensorRT took the cache


def test_cache_of_another_model_is_refused_not_built_in_float(fake_trt, tiny_model):
    # TensorRT 8.5.3 took such a cache, warned "Missing scale" per tensor and built an FP32 engine.
    cache = write_trt_cache({"conv_stem.output": 2.0, "blocks.0.output": 4.0}, trt_version="10.3.0", algorithm="entropy2")
    with pytest.raises(CacheFormatError, match="names none of the tensors of .*another model"):
        adapter.build_engine(tiny_model, cache=cache)


def test_a_smoothed_cache_on_the_original_model_is_refused_naming_the_smoothed_model(fake_trt, tmp_path):
    # Most names of a smoothed copy's cache are the original's too: the name check alone would pass it.
    from tests.unit.export.test_smoothing import post_ln_block

    original = tmp_path / "block.onnx"
    original.write_bytes(post_ln_block().SerializeToString())
    cache = write_trt_cache({"x": 2.0, "h": 4.0, "h_smoothed": 1.0, "q": 3.0, "k": 3.0, "qk": 5.0, "y": 6.0},
                            trt_version="10.3.0", algorithm="entropy2")
    shapes = {"x": (1, 5, 16), "mask": (1, 5)}
    with pytest.raises(CacheFormatError, match=r"smoothed copy of .*block.onnx.*'h_smoothed'.*model.smoothed.onnx"):
        adapter.build_engine(original, cache=cache, input_shapes=shapes)


def test_timing_cache_is_read_and_rewritten_atomically(fake_trt, tiny_model, tmp_path):
    cache = write_trt_cache({"x": 2.0, "conv_out": 4.0, "y": 4.0}, trt_version="10.3.0", algorithm="entropy2")
    timing = tmp_path / "sub" / "timing.cache"
    adapter.build_engine(tiny_model, cache=cache)
    assert not hasattr(fake_trt.builders[-1].config, "timing_cache")  # not asked for: none set
    adapter.build_engine(tiny_model, cache=cache, timing_cache=timing)
    assert timing.read_bytes() == b"timing:+"
    adapter.build_engine(tiny_model, cache=cache, timing_cache=timing)
    assert fake_trt.builders[-1].config.timing_cache.data == b"timing:+"  # the first build's cache was read
    assert timing.read_bytes() == b"timing:++"
    assert [p.name for p in timing.parent.iterdir()] == ["timing.cache"]  # no temp file left
    timing.write_bytes(b"not a timing cache")
    with pytest.raises(ConfigError, match="refused the timing cache .*timing.cache"):
        adapter.build_engine(tiny_model, cache=cache, timing_cache=timing)
    assert timing.read_bytes() == b"not a timing cache"  # a refused cache is left as it was


def test_build_fails_loudly_when_tensorrt_rejects_the_replayed_cache(fake_trt, tiny_model):
    fake_trt.reject_cache = True
    cache = write_trt_cache({"x": 2.0}, trt_version="10.3.0", algorithm="entropy2")
    with pytest.raises(CacheFormatError, match="did not use the replayed calibration cache"):
        adapter.build_engine(tiny_model, cache=cache)


def test_build_with_live_calibrator_serves_all_data_at_the_calibration_profile(fake_trt, cudart, tiny_model):
    data = _data(12)
    with adapter.make_calibrator("entropy2", data, micro_batch=4) as calibrator:
        engine = adapter.build_engine(
            tiny_model, calibrator=calibrator, calibrate_before_fusion=True, fp16=True
        )
    assert engine == b"fake-engine"
    builder = fake_trt.builders[-1]
    config = builder.config
    assert config.calibration_profile.shapes == {"x": ((4, 3, 4, 4),) * 3}
    assert config.profiles[0].shapes == {"x": ((4, 3, 4, 4),) * 3}
    assert fake_trt.QuantizationFlag.CALIBRATE_BEFORE_FUSION in config.quantization_flags
    assert fake_trt.BuilderFlag.FP16 in config.flags
    np.testing.assert_array_equal(np.concatenate(builder.served["x"]), data["x"])
    amax = float(np.abs(data["x"]).max())
    assert calibrator.calibration_cache == f"TRT-101601-EntropyCalibration2\nx: {_scale_hex(amax)}\n".encode()
    assert cudart.blocks == {}  # freed


def test_build_reraises_an_exception_from_inside_get_batch(fake_trt, cudart, tiny_model):
    def source():
        yield _data(4)
        raise OSError("calibration batch truncated")

    with adapter.make_calibrator("entropy2", source(), micro_batch=4) as calibrator:
        with pytest.raises(OSError, match="truncated"):
            adapter.build_engine(tiny_model, calibrator=calibrator)
    assert cudart.blocks == {}


def test_build_reports_parser_errors(fake_trt, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelError, match="ONNX parser rejected .*bad.onnx.*ModelImporter"):
        adapter.build_engine(bad, dynamic_ranges={"x": 1.0})


def test_build_failure_carries_tensorrt_errors(fake_trt, tiny_model, caplog):
    fake_trt.fail_build = True
    with caplog.at_level(logging.ERROR):
        with pytest.raises(ModelError, match="no implementation found"):
            adapter.build_engine(tiny_model, dynamic_ranges={"x": 1.0})
    assert "TensorRT: Internal error" in caplog.text


def test_manual_dynamic_ranges_are_set_on_network_tensors(fake_trt, tiny_model, caplog):
    adapter.build_engine(tiny_model, dynamic_ranges={"x": 2.5, "conv_out": (-1.0, 3.0)})
    network = fake_trt.builders[-1].network
    assert network.get_input(0).dynamic_range == (-2.5, 2.5)
    assert network.get_layer(0).get_output(0).dynamic_range == (-1.0, 3.0)
    with caplog.at_level(logging.WARNING):
        adapter.build_engine(tiny_model, dynamic_ranges={"x": 1.0, "folded_away": 1.0})
    assert "1 of 2 dynamic ranges name tensors TensorRT's network does not have" in caplog.text
    with pytest.raises(ConfigError, match="none of the 1 dynamic_ranges.*nope"):
        adapter.build_engine(tiny_model, dynamic_ranges={"nope": 1.0})
    with pytest.raises(ConfigError, match="min < 0 < max"):
        adapter.build_engine(tiny_model, dynamic_ranges={"x": 0.0})


def test_build_argument_errors(fake_trt, cudart, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="needs scales"):
        adapter.build_engine(tiny_model)
    with adapter.make_calibrator("entropy2", _data(), micro_batch=4) as calibrator:
        with pytest.raises(ConfigError, match="not both"):
            adapter.build_engine(tiny_model, cache=TRT_CACHE, calibrator=calibrator)
    with pytest.raises(ModelError, match="does not exist"):
        adapter.build_engine(tmp_path / "missing.onnx", cache=TRT_CACHE)
    with pytest.raises(ConfigError, match="workspace_bytes"):
        adapter.build_engine(tiny_model, cache=TRT_CACHE, workspace_bytes=-1)


def test_calibrate_with_tensorrt_returns_tensorrts_cache(fake_trt, cudart, tiny_model, tmp_path):
    data = _data(8)
    store = DictStore()
    cache = adapter.calibrate_with_tensorrt(
        tiny_model, data, algorithm="minmax", micro_batch=4, cache=store, cache_key="tiny+data"
    )
    amax = float(np.abs(data["x"]).max())
    assert cache == f"TRT-101601-MinMaxCalibration\nx: {_scale_hex(amax)}\n".encode()
    assert list(store.data.values()) == [cache]

    relabelled = adapter.calibrate_with_tensorrt(
        tiny_model, data, algorithm="minmax", micro_batch=4, trt_version="10.3.0"
    )
    assert relabelled == cache.replace(b"101601", b"100300")


def test_calibrate_with_tensorrt_reuses_a_stored_cache_without_data(fake_trt, cudart, tiny_model):
    store = DictStore()
    first = adapter.calibrate_with_tensorrt(
        tiny_model, _data(8), algorithm="entropy2", micro_batch=4, cache=store, cache_key="k"
    )
    calls = len(cudart.calls)

    def no_data():
        raise AssertionError("the cache should have been used")
        yield  # pragma: no cover

    second = adapter.calibrate_with_tensorrt(
        tiny_model,
        no_data(),
        algorithm="entropy2",
        micro_batch=4,
        cache=store,
        cache_key="k",
        input_shapes={"x": (4, 3, 4, 4)},
    )
    assert second == first and len(cudart.calls) == calls


# --------------------------------------------------------------------------------------------
# CLI: trtcal engine build
# --------------------------------------------------------------------------------------------


def test_cli_without_tensorrt_stops_with_the_install_hint(efficientnet_path: Path, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    cache = tmp_path / "calibration.cache"
    cache.write_bytes(TRT_CACHE)
    out = tmp_path / "model.engine"
    rc = cli_main(["engine", "build", str(efficientnet_path), "--cache", str(cache), "-o", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "trtcal: error: TensorRT is not installed" in err and "pip install 'trtcal[tensorrt]'" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--calibrate"], "--calibrate needs --data"),
        (["--cache", "CACHE", "--micro-batch", "4"], "--micro-batch only apply with --calibrate"),
        (["--cache", "CACHE", "--algorithm", "legacy"], "cannot be replayed as the legacy"),
        (["--cache", "missing.cache"], "does not exist"),
        (["--cache", "CACHE", "--input-shape", "x=8by3"], "not a shape"),
        (["--cache", "CACHE", "--input-shape", "x=1x3,2x3"], "NAME=DIMS or MIN,OPT,MAX"),
        (["--cache", "CACHE", "--input-shape", "x=1x3", "--input-shape", "x=2x3"], "names 'x' twice"),
    ],
)
def test_cli_argument_errors_come_before_tensorrt(efficientnet_path: Path, monkeypatch, tmp_path, capsys, extra, match):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    cache = tmp_path / "calibration.cache"
    cache.write_bytes(TRT_CACHE)
    extra = [str(cache) if e == "CACHE" else e for e in extra]
    rc = cli_main(["engine", "build", str(efficientnet_path), *extra, "-o", str(tmp_path / "m.engine")])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_cli_builds_from_cache_with_the_stand_in(efficientnet_path: Path, fake_trt, tmp_path):
    cache = tmp_path / "calibration.cache"
    cache.write_bytes(write_trt_cache({"input": 1.0}, trt_version="10.3.0", algorithm="entropy2"))
    ranges = tmp_path / "ranges.json"
    ranges.write_text('{"input": {"amax": 1.5}}')
    out = tmp_path / "out" / "model.engine"
    rc = cli_main(
        [
            "engine",
            "build",
            str(efficientnet_path),
            "--cache",
            str(cache),
            "--input-shape",
            "input=1x3x224x224,8x3x224x224,16x3x224x224",
            "--ranges",
            str(ranges),
            "--workspace-mib",
            "64",
            "-o",
            str(out),
        ]
    )
    assert rc == 0 and out.read_bytes() == b"fake-engine"
    config = fake_trt.builders[-1].config
    assert config.profiles[0].shapes == {"input": ((1, 3, 224, 224), (8, 3, 224, 224), (16, 3, 224, 224))}
    assert config.pool_limits == {fake_trt.MemoryPoolType.WORKSPACE: 64 << 20}
    assert fake_trt.builders[-1].network.get_input(0).dynamic_range == (-1.5, 1.5)


def test_cli_calibrates_from_an_npz_batch_with_the_stand_in(fake_trt, cudart, tiny_model, tmp_path):
    data = _data(8)
    batch = tmp_path / "batch.npz"
    np.savez(batch, **data)
    out, saved = tmp_path / "tiny.engine", tmp_path / "tiny.cache"
    rc = cli_main(
        [
            "-q",
            "engine",
            "build",
            str(tiny_model),
            "--calibrate",
            "--data",
            str(batch),
            "--algorithm",
            "minmax",
        ]
        + ["--micro-batch", "4", "--save-cache", str(saved), "-o", str(out)]
    )
    assert rc == 0 and out.read_bytes() == b"fake-engine"
    amax = float(np.abs(data["x"]).max())
    assert saved.read_bytes() == f"TRT-101601-MinMaxCalibration\nx: {_scale_hex(amax)}\n".encode()


def test_cli_calibrates_from_trtcals_arrow_batch_with_the_stand_in(fake_trt, cudart, tiny_model, tmp_path):
    from trtcal.batch import write_batch

    data = _data(6)
    batch = tmp_path / "batch.arrow"
    write_batch(batch, data, [f"s{i}" for i in range(6)], spec={"preset": "test"})
    out = tmp_path / "tiny.engine"
    rc = cli_main(
        ["-q", "engine", "build", str(tiny_model), "--calibrate", "--data", str(batch)]
        + ["--micro-batch", "3", "-o", str(out)]
    )
    assert rc == 0 and out.read_bytes() == b"fake-engine"
    served = fake_trt.builders[-1].served["x"]
    assert [b.shape[0] for b in served] == [3, 3]
    np.testing.assert_array_equal(np.concatenate(served), data["x"])
    assert cudart.blocks == {}


def test_calibration_batch_is_served_through_its_own_micro_batches(tmp_path):
    from trtcal.batch import batch_from_arrays

    data = _data(10)
    batch = batch_from_arrays(data)
    cut = list(adapter.iter_micro_batches(batch, 4, partial_batch="drop"))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in cut]), data["x"][:8])
    assert feed._count_micro_batches(batch, 4, "drop") == 2
    with pytest.raises(DataError, match="10 samples"):
        list(adapter.iter_micro_batches(batch, 4))


@pytest.mark.parametrize(
    ("config", "kwargs", "field"),
    [
        (adapter.CalibratorConfig, {"micro_batch": 0}, "micro_batch"),
        (adapter.CalibratorConfig, {"micro_batch": 2.0}, "micro_batch"),
        (adapter.CalibratorConfig, {"partial_batch": "pad"}, "partial_batch"),
        (adapter.CalibratorConfig, {"quantile": 0.0}, "quantile"),
        (adapter.CalibratorConfig, {"regression_cutoff": 1.5}, "regression_cutoff"),
        (adapter.EngineBuildConfig, {"builder_optimization_level": 7}, "builder_optimization_level"),
        (adapter.EngineBuildConfig, {"workspace_bytes": True}, "workspace_bytes"),
        (adapter.EngineBuildConfig, {"replay_algorithm": "percentile"}, "replay_algorithm"),
    ],
)
def test_configs_name_the_bad_field(config, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        config(**kwargs)


def test_micro_batches_that_do_not_fit_a_static_input_fail_before_the_build(fake_trt, cudart, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "static",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = tmp_path / "static.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), model)
    data = {"x": np.ones((8, 3), np.float32)}
    with adapter.make_calibrator("entropy2", data, micro_batch=4) as calibrator:
        with pytest.raises(DataError, match=r"are \[4, 3\], but TensorRT calibrates it at \[2, 3\]"):
            adapter.build_engine(model, calibrator=calibrator)
    assert fake_trt.builders[-1].served == {} and cudart.count("malloc") == 0
    with adapter.make_calibrator("entropy2", data, micro_batch=2) as calibrator:
        assert adapter.build_engine(model, calibrator=calibrator) == b"fake-engine"
    assert [b.shape for b in fake_trt.builders[-1].served["x"]] == [(2, 3)] * 4


def test_stale_cache_file_fails_the_build_before_any_data_is_read(fake_trt, cudart, tiny_model, tmp_path):
    path = tmp_path / "calibration.cache"
    path.write_bytes(TRT_CACHE.replace(b"101601", b"8601"))

    def no_data():
        raise AssertionError("no data should be read")
        yield  # pragma: no cover

    with adapter.make_calibrator("entropy2", no_data(), micro_batch=4, cache=path) as calibrator:
        with pytest.raises(CacheFormatError, match="TRT-8601-EntropyCalibration2"):
            adapter.build_engine(tiny_model, calibrator=calibrator)
    assert cudart.calls == []
