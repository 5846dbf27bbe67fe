"""The PyTorch ONNX interpreter against ONNX Runtime, and the device runners' statistics against
trtcal.core on the same activations (CPU; the GPU runs are in tests/gpu/)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    pytest.fail("these tests need torch (the CPU wheel is enough): add it to the dev extra", pytrace=False)

from tests.fixtures.data import INPUT_NAME, photo_views
from trtcal.batch import batch_from_arrays
from trtcal.core import fill_counts, merge_stats, reduce_stats
from trtcal.errors import ConfigError, ModelError, NonFiniteError
from trtcal.runners.data_parallel import collect_sliced, plan_slices
from trtcal.runners.onnxruntime import OnnxRuntimeRunner
from trtcal.runners.torch_runner import SUPPORTED_OPS, OrtDeviceRunner, TorchRunner

F32 = np.float32


def one_node_model(op: str, inputs: dict[str, np.ndarray], inits: dict[str, np.ndarray] | None = None,
                   opset: int = 13, extra_in: list[str] | None = None, n_out: int = 1, **attrs):  # fmt: skip
    names = [*inputs, *(extra_in or [])]
    node = helper.make_node(op, names, [f"y{i}" for i in range(n_out)], name=f"{op}_0", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in inputs.items()],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(n_out)],
        [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def r(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(F32)


I64 = np.int64
OP_CASES = {
    "conv-asym-pads": dict(op="Conv", inputs={"x": r(2, 3, 9, 8)}, inits={"w": r(4, 3, 3, 3, seed=1), "b": r(4, seed=2)},
                           extra_in=["w", "b"], pads=[0, 0, 1, 1], strides=[2, 2]),
    "conv-depthwise-dilated": dict(op="Conv", inputs={"x": r(1, 4, 10, 10)}, inits={"w": r(4, 1, 3, 3, seed=1)},
                                   extra_in=["w"], group=4, pads=[2, 2, 2, 2], dilations=[2, 2]),
    "conv-same-upper": dict(op="Conv", inputs={"x": r(1, 2, 7, 7)}, inits={"w": r(3, 2, 3, 3, seed=1)},
                            extra_in=["w"], auto_pad="SAME_UPPER", strides=[2, 2]),
    "conv-1d": dict(op="Conv", inputs={"x": r(2, 3, 11)}, inits={"w": r(5, 3, 3, seed=1)}, extra_in=["w"], pads=[1, 1]),
    "clip-inputs": dict(op="Clip", inputs={"x": r(3, 50, scale=5)}, inits={"lo": np.array(0, F32), "hi": np.array(6, F32)},
                        extra_in=["lo", "hi"]),
    "clip-max-only": dict(op="Clip", inputs={"x": r(3, 50, scale=5)}, inits={"hi": np.array(1.5, F32)}, extra_in=["", "hi"]),
    "clip-opset6": dict(op="Clip", inputs={"x": r(3, 50, scale=5)}, opset=6, min=-1.0, max=2.0),
    "relu": dict(op="Relu", inputs={"x": r(4, 7)}),
    "leaky-relu": dict(op="LeakyRelu", inputs={"x": r(4, 7)}, alpha=0.1),
    "sigmoid": dict(op="Sigmoid", inputs={"x": r(4, 7, scale=4)}),
    "tanh": dict(op="Tanh", inputs={"x": r(4, 7, scale=4)}),
    "hard-sigmoid": dict(op="HardSigmoid", inputs={"x": r(4, 7, scale=4)}, alpha=0.25, beta=0.4),
    "hard-swish": dict(op="HardSwish", inputs={"x": r(4, 7, scale=4)}, opset=14),
    "add-broadcast": dict(op="Add", inputs={"x": r(2, 3, 4)}, inits={"c": r(3, 1, seed=1)}, extra_in=["c"]),
    "sub": dict(op="Sub", inputs={"x": r(2, 3), "z": r(2, 3, seed=1)}),
    "mul": dict(op="Mul", inputs={"x": r(2, 3), "z": r(3, seed=1)}),
    "div": dict(op="Div", inputs={"x": r(2, 3)}, inits={"c": np.array([2.0, -4.0, 0.5], F32)}, extra_in=["c"]),
    "matmul": dict(op="MatMul", inputs={"x": r(2, 5, 6), "z": r(6, 3, seed=1)}),
    "gemm": dict(op="Gemm", inputs={"x": r(6, 4)}, inits={"w": r(3, 6, seed=1), "c": r(3, seed=2)}, extra_in=["w", "c"],
                 transA=1, transB=1, alpha=0.5, beta=2.0),
    "gemm-no-c": dict(op="Gemm", inputs={"x": r(2, 4)}, inits={"w": r(4, 3, seed=1)}, extra_in=["w"]),
    "global-avg-pool": dict(op="GlobalAveragePool", inputs={"x": r(2, 3, 5, 6)}),
    "global-max-pool": dict(op="GlobalMaxPool", inputs={"x": r(2, 3, 5, 6)}),
    "max-pool-asym": dict(op="MaxPool", inputs={"x": r(1, 2, 7, 7)}, kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
    "max-pool-ceil": dict(op="MaxPool", inputs={"x": r(1, 2, 8, 8)}, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    "avg-pool": dict(op="AveragePool", inputs={"x": r(1, 2, 8, 8)}, kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
    "avg-pool-include-pad": dict(op="AveragePool", inputs={"x": r(1, 2, 8, 8)}, kernel_shape=[2, 2], pads=[1, 1, 1, 1],
                                 count_include_pad=1),
    "reshape": dict(op="Reshape", inputs={"x": r(2, 3, 4)}, inits={"s": np.array([0, -1], I64)}, extra_in=["s"]),
    "flatten": dict(op="Flatten", inputs={"x": r(2, 3, 4, 5)}, axis=2),
    "transpose": dict(op="Transpose", inputs={"x": r(2, 3, 4)}, perm=[2, 0, 1]),
    "softmax": dict(op="Softmax", inputs={"x": r(3, 9, scale=3)}),
    "softmax-opset11": dict(op="Softmax", inputs={"x": r(2, 3, 4, scale=3)}, opset=11, axis=1),
    "batchnorm": dict(op="BatchNormalization", inputs={"x": r(2, 3, 4, 4)},
                      inits={"s": r(3, seed=1), "b": r(3, seed=2), "m": r(3, seed=3), "v": np.abs(r(3, seed=4)) + 0.1},
                      extra_in=["s", "b", "m", "v"], epsilon=1e-3),
    "concat": dict(op="Concat", inputs={"x": r(2, 3), "z": r(2, 5, seed=1)}, axis=1),
    "identity": dict(op="Identity", inputs={"x": r(5)}),
    "squeeze": dict(op="Squeeze", inputs={"x": r(2, 1, 3, 1)}, inits={"a": np.array([1, -1], I64)}, extra_in=["a"]),
    "unsqueeze": dict(op="Unsqueeze", inputs={"x": r(2, 3)}, inits={"a": np.array([0, -1], I64)}, extra_in=["a"]),
    "reduce-mean": dict(op="ReduceMean", inputs={"x": r(2, 3, 4)}, axes=[1, 2], keepdims=0),
    "gather": dict(op="Gather", inputs={"x": r(4, 5)}, inits={"i": np.array([[3, -1], [0, 0]], I64)}, extra_in=["i"], axis=1),
}  # fmt: skip


def _run_both(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[dict, dict]:
    ours = TorchRunner(model, device="cpu")
    theirs = OnnxRuntimeRunner(model)
    assert ours.tensor_names == theirs.tensor_names
    return ours.run(feed), theirs.run(feed)


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_op_matches_onnxruntime(case: str) -> None:
    spec = dict(OP_CASES[case])
    inputs = spec["inputs"]
    model = one_node_model(**spec)
    got, want = _run_both(model, inputs)
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=2e-6, atol=2e-6, err_msg=f"{case}: {name}")


def test_shape_cast_ops_in_a_dynamic_reshape() -> None:
    # Flatten written the way exporters write it: Shape -> Gather -> Unsqueeze -> Concat -> Reshape.
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Cast", ["flat"], ["y"], to=TensorProto.DOUBLE),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, I64), "zero"),
        numpy_helper.from_array(np.array([0], I64), "ax0"),
        numpy_helper.from_array(np.array([-1], I64), "minus1"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    got, want = _run_both(model, {"x": r(5, 3, 4)})
    assert set(got) == set(want) == {"x", "flat", "y"}
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])


def test_every_supported_op_is_tested() -> None:
    tested = {spec["op"] for spec in OP_CASES.values()} | {"Shape", "Cast", "Constant"}
    assert tested >= set(SUPPORTED_OPS)


def test_constant_node() -> None:
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(r(3, seed=5))),
        helper.make_node("Mul", ["x", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    got, want = _run_both(model, {"x": r(2, 3)})
    np.testing.assert_array_equal(got["y"], want["y"])


def test_unsupported_ops_are_named_up_front() -> None:
    model = one_node_model("Erf", {"x": r(3)})
    with pytest.raises(ModelError, match=r"cannot run ops \['Erf'\].*onnxruntime"):
        TorchRunner(model, device="cpu")


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from trtcal.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        TorchRunner(one_node_model("Relu", {"x": r(3)}), device="cuda")
    with pytest.raises(ConfigError, match="device"):
        TorchRunner(one_node_model("Relu", {"x": r(3)}), device="gpu")


@pytest.fixture(scope="module")
def photos_batch():
    """Five real photos from scikit-image, preprocessed as the model expects."""
    arrays, ids = photo_views(5)
    return batch_from_arrays({INPUT_NAME: arrays}, ids)


@pytest.fixture(scope="module")
def lite0_torch(efficientnet_path):
    return TorchRunner(efficientnet_path, device="cpu")


@pytest.fixture(scope="module")
def lite0_ort(efficientnet_path):
    return OnnxRuntimeRunner(efficientnet_path)


def test_efficientnet_lite0_every_tensor_matches_onnxruntime(lite0_torch, lite0_ort, photos_batch) -> None:
    feed = photos_batch.rows(0, 3)
    got, want = lite0_torch.run(feed), lite0_ort.run(feed)
    assert list(got) == list(want) and len(want) == 95
    for name in want:
        scale = float(np.abs(want[name]).max())
        assert np.abs(got[name] - want[name]).max() <= 1e-4 * scale, name
    assert np.array_equal(got["logits"].argmax(1), want["logits"].argmax(1))


def test_device_passes_equal_core_on_the_same_activations(lite0_torch, photos_batch) -> None:
    runner = lite0_torch
    stats = runner.collect_stats(photos_batch, micro_batch=3)  # micro-batches of 3 and 2 rows
    acts = [runner.run(photos_batch.rows(a, min(a + 3, 5))) for a in (0, 3)]
    for name in runner.tensor_names:
        assert stats[name] == merge_stats(reduce_stats(a[name], tensor=name) for a in acts)
    amax = {n: s.amax for n, s in stats.items()}
    counts = runner.collect_counts(photos_batch, amax, num_bins=2048, micro_batch=3)
    for name in runner.tensor_names:
        want = sum(fill_counts(a[name], 2048, amax[name], tensor=name) for a in acts)
        assert np.array_equal(counts[name], want), name


def test_torch_stats_close_to_onnxruntime_stats(lite0_torch, lite0_ort, photos_batch) -> None:
    ours = lite0_torch.collect_stats(photos_batch, micro_batch=3)
    theirs = lite0_ort.collect_stats(photos_batch, micro_batch=3)
    for name, want in theirs.items():
        assert ours[name].count == want.count
        assert abs(ours[name].amax - want.amax) <= 1e-4 * want.amax, name


def test_ort_device_runner_equals_onnxruntime_runner_bit_for_bit(efficientnet_path, lite0_ort, photos_batch) -> None:
    device_runner = OrtDeviceRunner(efficientnet_path, device="cpu")
    stats = device_runner.collect_stats(photos_batch, micro_batch=4)
    want = lite0_ort.collect_stats(photos_batch, micro_batch=4)
    assert stats == want
    amax = {n: s.amax for n, s in want.items()}
    counts = device_runner.collect_counts(photos_batch, amax, num_bins=2048, micro_batch=4)
    want_counts = lite0_ort.collect_counts(photos_batch, amax, num_bins=2048, micro_batch=4)
    assert all(np.array_equal(counts[n], want_counts[n]) for n in want_counts)


def test_slices_on_micro_batch_boundaries_merge_bit_for_bit(lite0_torch, photos_batch) -> None:
    runner = lite0_torch
    whole = collect_sliced(runner, photos_batch, [(0, 5)], micro_batch=2, num_bins=2048)
    for workers in (2, 3):
        slices = plan_slices(5, workers, 2)
        parts = collect_sliced(runner, photos_batch, slices, micro_batch=2, num_bins=2048)
        assert parts[0] == whole[0]
        assert all(np.array_equal(parts[1][n], whole[1][n]) for n in whole[1])


def test_nonfinite_activations_raise_naming_the_tensor() -> None:
    model = one_node_model("Div", {"x": r(2, 3)}, inits={"c": np.array([1.0, 0.0, 2.0], F32)}, extra_in=["c"])
    x = r(4, 3)
    x[0, 1] = 0.0  # 0/0 = NaN; the others give ±Inf
    batch = batch_from_arrays({"x": x})
    runner = TorchRunner(model, device="cpu")
    with pytest.raises(NonFiniteError, match="'y0'") as err:
        runner.collect_stats(batch, micro_batch=2)
    assert (err.value.nan_count, err.value.inf_count) == (1, 3)
    stats = runner.collect_stats(batch, micro_batch=2, nonfinite="ignore")
    assert stats["y0"] == OnnxRuntimeRunner(model).collect_stats(batch, micro_batch=2, nonfinite="ignore")["y0"]
