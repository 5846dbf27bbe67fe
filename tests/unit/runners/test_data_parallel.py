"""Data-parallel statistics: slice planning, exact merges, and real worker processes (CPU here;
tests/gpu/test_gpu_kernels.py runs one worker per GPU)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    pytest.fail("these tests need torch (the CPU wheel is enough): add it to the dev extra", pytrace=False)

from trtcal.batch import open_batch, write_batch
from trtcal.core import TensorStats
from trtcal.errors import ConfigError, ModelError, NonFiniteError
from trtcal.runners.data_parallel import (
    DataParallelStatistics,
    WorkerSpec,
    collect_sliced,
    merge_slice_counts,
    merge_slice_stats,
    plan_slices,
)
from trtcal.runners.torch_runner import TorchRunner

F32 = np.float32


@pytest.mark.parametrize(
    ("rows", "workers", "micro", "want"),
    [
        (10, 2, 2, [(0, 6), (6, 10)]),
        (10, 3, 4, [(0, 4), (4, 8), (8, 10)]),
        (10, 5, 4, [(0, 4), (4, 8), (8, 10)]),  # never more slices than micro-batches
        (8, 2, 3, [(0, 6), (6, 8)]),
        (1, 4, 32, [(0, 1)]),
        (0, 2, 8, []),
        (64, 1, 16, [(0, 64)]),
    ],
)
def test_plan_slices(rows: int, workers: int, micro: int, want: list[tuple[int, int]]) -> None:
    got = plan_slices(rows, workers, micro)
    assert got == want
    for start, stop in got:
        assert start % micro == 0 and stop > start  # cut on micro-batch boundaries, none empty


def test_plan_slices_covers_every_row_once() -> None:
    for rows in range(0, 70, 7):
        for workers in (1, 2, 3, 8):
            for micro in (1, 5, 16):
                slices = plan_slices(rows, workers, micro)
                assert [r for a, b in slices for r in range(a, b)] == list(range(rows))


def test_plan_slices_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="num_workers"):
        plan_slices(10, 0, 2)
    with pytest.raises(ConfigError):
        plan_slices(10, 2, 0)


def test_merges_are_exact_and_check_their_inputs() -> None:
    a = {"t": TensorStats(amax=2.0, min=-2.0, max=1.0, count=3)}
    b = {"t": TensorStats(amax=3.0, min=-1.0, max=3.0, count=5, nan_count=1)}
    assert merge_slice_stats([a, b]) == {"t": TensorStats(amax=3.0, min=-2.0, max=3.0, count=8, nan_count=1)}
    assert merge_slice_stats([b, a]) == merge_slice_stats([a, b])
    c1, c2 = {"t": np.array([1, 2, 3])}, {"t": np.array([4, 0, 1])}
    assert np.array_equal(merge_slice_counts([c1, c2])["t"], [5, 2, 4])
    with pytest.raises(ConfigError, match="different tensors"):
        merge_slice_stats([a, {"u": a["t"]}])
    with pytest.raises(ConfigError, match="bins"):
        merge_slice_counts([c1, {"t": np.zeros(4, dtype=np.int64)}])
    with pytest.raises(ConfigError):
        merge_slice_counts([])


def small_cnn(path) -> str:
    """Conv -> Clip -> Conv -> Div (a 0 in the divisor makes Inf/NaN only when asked) -> GAP."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(F32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(F32), "w2"),
        numpy_helper.from_array(np.array(0, F32), "lo"),
        numpy_helper.from_array(np.array(6, F32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("GlobalAveragePool", ["c2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    out = str(path / "cnn.onnx")
    with open(out, "wb") as f:
        f.write(model.SerializeToString())
    return out


@pytest.mark.slow
def test_worker_processes_equal_one_worker_bit_for_bit(tmp_path) -> None:
    model = small_cnn(tmp_path)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((21, 3, 16, 16)).astype(F32)
    x[20, 0, 0, 0] = np.nan  # only in the last row: the NaN check below reads it
    ids = [f"s{i:03d}" for i in range(21)]
    write_batch(tmp_path / "clean.arrow", {"x": x[:20]}, ids[:20], spec={})
    write_batch(tmp_path / "nan.arrow", {"x": x}, ids, spec={})

    with open_batch(tmp_path / "clean.arrow") as batch:
        single = collect_sliced(TorchRunner(model, device="cpu"), batch, [(0, 20)], micro_batch=3, num_bins=256)
    spec = WorkerSpec(model=model, batch=str(tmp_path / "clean.arrow"), runner="torch", device="cpu")
    with DataParallelStatistics(spec, ["cpu", "cpu"]) as pool:
        assert len(pool.ready_seconds) == 2
        stats, counts = pool.collect(20, micro_batch=3, num_bins=256)
        assert stats == single[0]
        assert all(np.array_equal(counts[n], single[1][n]) for n in single[1])
        assert all(int(c.sum()) == stats[n].count for n, c in counts.items())

    nan_spec = WorkerSpec(model=model, batch=str(tmp_path / "nan.arrow"), runner="torch", device="cpu")
    with DataParallelStatistics(nan_spec, ["cpu", "cpu"]) as pool:
        with pytest.raises(NonFiniteError, match="'x'") as err:  # raised in worker 2, re-raised here
            pool.collect(21, micro_batch=3, num_bins=256)
        assert err.value.nan_count == 1


@pytest.mark.slow
def test_worker_start_failure_is_raised_in_the_parent(tmp_path) -> None:
    spec = WorkerSpec(model=str(tmp_path / "missing.onnx"), batch=str(tmp_path / "none.arrow"), device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        DataParallelStatistics(spec, ["cpu"])
