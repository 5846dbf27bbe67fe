"""The ONNX Runtime statistics runner on tiny graphs whose activations are known exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.unit.runners import tiny_models
from trtcal.batch import batch_from_arrays
from trtcal.core.histogram import TensorStats, fill_counts, merge_stats, reduce_stats
from trtcal.errors import BackendUnavailableError, ConfigError, DataError, ModelError, NonFiniteError
from trtcal.model import load_model, select_tensors, with_extra_outputs
from trtcal.progress import RecordingProgress
from trtcal.runners.onnxruntime import OnnxRuntimeRunner

NUM_BINS = 64


def _batch(x: np.ndarray, name: str = "x"):
    return batch_from_arrays({name: x})


# -- tensor selection -----------------------------------------------------------------------------


def test_all_selects_floating_activations_only() -> None:
    names = select_tensors(tiny_models.mlp(), "all")
    # Not: W, C (initializers), two/k (Constant), kneg (computed from constants), shape (int64).
    assert names == tiny_models.MLP_ACTIVATIONS


def test_quantizable_selects_inputs_of_matmul_and_residual_add() -> None:
    # MatMul's x (its W is an initializer); Add(r, h) has two activation inputs; Add(s, C) does not count.
    assert select_tensors(tiny_models.mlp(), "quantizable") == ["x", "h", "r"]
    assert select_tensors(tiny_models.conv(), "quantizable") == ["x"]


def test_named_tensors_keep_graph_order_and_bad_names_are_explained() -> None:
    assert select_tensors(tiny_models.mlp(), ["y", "h"]) == ["h", "y"]
    with pytest.raises(ConfigError) as info:
        select_tensors(tiny_models.mlp(), ["h", "W", "kneg", "nope", "shape"])
    message = str(info.value)
    assert "'W' (a constant or initializer" in message
    assert "'kneg' (a constant" in message
    assert "'nope' (not a tensor of the top-level graph)" in message
    assert "'shape' (not floating point)" in message
    with pytest.raises(ConfigError, match="'all', 'quantizable'"):
        select_tensors(tiny_models.mlp(), "everything")


def test_extra_outputs_do_not_change_the_models_output() -> None:
    model = tiny_models.conv()
    x = np.random.default_rng(3).standard_normal((5, 1, 6, 6)).astype(np.float32)
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    runner = OnnxRuntimeRunner(model)
    assert runner.tensor_names == ("x", "c", "y")
    np.testing.assert_array_equal(runner.run({"x": x})["y"], plain)
    augmented = with_extra_outputs(model, ["c"])
    assert [o.name for o in augmented.graph.output] == ["y", "c"]
    assert [o.name for o in model.graph.output] == ["y"]  # the original is untouched


# -- statistics -----------------------------------------------------------------------------------


def test_stats_and_counts_equal_the_numpy_reference() -> None:
    x = tiny_models.small_int_inputs(20, [4])
    runner = OnnxRuntimeRunner(tiny_models.mlp())
    stats = runner.collect_stats(_batch(x), micro_batch=6)
    expected = tiny_models.mlp_reference(x)
    for name in tiny_models.MLP_ACTIVATIONS:
        assert stats[name] == reduce_stats(expected[name]), name
    amax = {n: s.amax for n, s in stats.items()}
    counts = runner.collect_counts(_batch(x), amax, num_bins=NUM_BINS, micro_batch=6)
    for name in tiny_models.MLP_ACTIVATIONS:
        np.testing.assert_array_equal(counts[name], fill_counts(expected[name], NUM_BINS, amax[name]), err_msg=name)


def test_row_range_shards_merge_bit_identically_and_micro_batch_size_does_not_matter() -> None:
    x = np.random.default_rng(1).standard_normal((23, 1, 6, 6)).astype(np.float32)
    batch = _batch(x)
    runner = OnnxRuntimeRunner(tiny_models.conv())
    whole = runner.collect_stats(batch, micro_batch=23)
    bounds = [(0, 7), (7, 8), (8, 23)]
    shards = [runner.collect_stats(batch, start=a, stop=b, micro_batch=4) for a, b in bounds]
    merged = {n: merge_stats(s[n] for s in reversed(shards)) for n in runner.tensor_names}
    assert merged == whole
    amax = {n: s.amax for n, s in whole.items()}
    reference = runner.collect_counts(batch, amax, num_bins=NUM_BINS, micro_batch=23)
    for micro_batch in (1, 5, 8):
        counts = runner.collect_counts(batch, amax, num_bins=NUM_BINS, micro_batch=micro_batch)
        assert all(np.array_equal(counts[n], reference[n]) for n in runner.tensor_names), micro_batch
    parts = [runner.collect_counts(batch.slice(a, b), amax, num_bins=NUM_BINS, micro_batch=3) for a, b in bounds]
    for name in runner.tensor_names:
        np.testing.assert_array_equal(sum(p[name] for p in parts), reference[name])


def test_fixed_batch_one_and_unbatched_models_match_the_dynamic_model() -> None:
    x = tiny_models.small_int_inputs(9, [4], seed=2)
    dynamic = OnnxRuntimeRunner(tiny_models.mlp("N")).collect_stats(_batch(x), micro_batch=4)
    fixed = OnnxRuntimeRunner(tiny_models.mlp(1))
    progress = RecordingProgress()
    assert fixed.layout(_batch(x)).micro_batch(32) == 1
    assert fixed.collect_stats(_batch(x), micro_batch=4, progress=progress) == dynamic
    assert [e for e in progress.events if e[0] == "advance"] == [("advance", "statistics", 1)] * 9
    unbatched = OnnxRuntimeRunner(tiny_models.mlp(None))  # input [4], one sample per run
    assert unbatched.collect_stats(_batch(x), micro_batch=4) == dynamic


def test_fixed_batch_larger_than_one_needs_whole_batches() -> None:
    runner = OnnxRuntimeRunner(tiny_models.mlp(2))
    x = tiny_models.small_int_inputs(6, [4])
    assert runner.collect_stats(_batch(x)) == OnnxRuntimeRunner(tiny_models.mlp()).collect_stats(_batch(x))
    with pytest.raises(DataError, match="fixed at 2 but rows \\[0, 5\\) hold 5 samples"):
        runner.collect_stats(_batch(x[:5]))


def test_zero_tensors_have_zero_amax_and_all_counts_in_bin_zero() -> None:
    x = tiny_models.small_int_inputs(4, [3])
    runner = OnnxRuntimeRunner(tiny_models.zeros_model())
    stats = runner.collect_stats(_batch(x))
    assert stats["z"] == TensorStats(amax=0.0, min=0.0, max=0.0, count=12)
    counts = runner.collect_counts(_batch(x), {n: s.amax for n, s in stats.items()}, num_bins=8)
    assert counts["z"].tolist() == [12, 0, 0, 0, 0, 0, 0, 0]


# -- bad input ------------------------------------------------------------------------------------


def test_batch_that_does_not_fit_the_model_is_refused_naming_the_input() -> None:
    runner = OnnxRuntimeRunner(tiny_models.conv())
    x = np.zeros((2, 1, 6, 6), np.float32)
    with pytest.raises(DataError, match=r"missing input\(s\) \['x'\] \(expected \['x: \[\?, 1, 6, 6\] float32'\]\)"):
        runner.collect_stats(_batch(x, name="image"))
    with pytest.raises(DataError, match=r"column\(s\) \['extra'\] that the model has no input for"):
        runner.collect_stats(batch_from_arrays({"x": x, "extra": x}))
    with pytest.raises(DataError, match="input 'x': the model expects float32, the batch holds float64"):
        runner.collect_stats(_batch(x.astype(np.float64)))
    with pytest.raises(DataError, match=r"input 'x': the model expects \[\?, 1, 6, 6\] float32.*\[1, 5, 6\].*dimension 2 is 5"):
        runner.collect_stats(_batch(np.zeros((2, 1, 5, 6), np.float32)))
    with pytest.raises(DataError, match=r"input 'x': the model expects \[\?, 1, 6, 6\].*samples have shape \[6, 6\]"):
        runner.collect_stats(_batch(np.zeros((2, 6, 6), np.float32)))


def test_models_that_fail_to_load_raise_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage that is not protobuf \xff\xff")
    with pytest.raises(ModelError, match="junk.onnx"):
        OnnxRuntimeRunner(tmp_path / "junk.onnx")
    truncated = tiny_models.conv().SerializeToString()[:-40]
    with pytest.raises(ModelError):
        OnnxRuntimeRunner(truncated)
    broken = tiny_models.conv()
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ModelError, match="ONNX Runtime cannot load model"):
        OnnxRuntimeRunner(broken)


def test_nan_and_inf_activations_are_named_or_counted() -> None:
    x = np.array([[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0]], np.float32)  # log(-1) = NaN, log(0) = -Inf
    runner = OnnxRuntimeRunner(tiny_models.log_model())
    with pytest.raises(NonFiniteError, match="tensor 'y' holds 1 NaN and 1 Inf") as info:
        runner.collect_stats(_batch(x))
    assert (info.value.tensor, info.value.nan_count, info.value.inf_count) == ("y", 1, 1)
    stats = runner.collect_stats(_batch(x), nonfinite="ignore")
    assert (stats["y"].nan_count, stats["y"].inf_count, stats["y"].count) == (1, 1, 4)
    assert stats["y"].amax == pytest.approx(np.log(4.0))
    counts = runner.collect_counts(_batch(x), {n: s.amax for n, s in stats.items()}, num_bins=4, nonfinite="ignore")
    assert counts["y"].sum() == 4


def test_cuda_without_the_provider_is_a_clear_error() -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        OnnxRuntimeRunner(tiny_models.conv(), device="cuda")
    with pytest.raises(ConfigError, match="device"):
        OnnxRuntimeRunner(tiny_models.conv(), device="tpu")


def test_model_hash_is_of_the_file_bytes(tmp_path: Path) -> None:
    import hashlib

    model = tiny_models.conv()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert load_model(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_model(path.read_bytes()).sha256 == load_model(path).sha256


def test_outputs_without_a_leading_batch_axis_survive_a_short_last_micro_batch() -> None:
    x = tiny_models.small_int_inputs(10, [4], seed=5)
    runner = OnnxRuntimeRunner(tiny_models.transposing_model())
    for micro_batch in (4, 10, 3):  # 4+4+2 and 3+3+3+1 end on a short micro-batch
        stats = runner.collect_stats(_batch(x), micro_batch=micro_batch)
        # Transpose and Reshape only move values: their stats are those of x whatever the grouping.
        assert stats["x"] == stats["t"] == stats["f"] == reduce_stats(x), micro_batch
        # The Gram output is per micro-batch: the merge of its blocks.
        blocks = [x[i : i + micro_batch] @ x[i : i + micro_batch].T for i in range(0, 10, micro_batch)]
        assert stats["g"] == merge_stats(reduce_stats(b) for b in blocks), micro_batch


# -- the activation budget -------------------------------------------------------------------------


def test_the_probe_measures_one_samples_tensors_and_the_budget_picks_samples_per_run() -> None:
    x = np.random.default_rng(3).standard_normal((10, 1, 6, 6)).astype(np.float32)
    batch = _batch(x)
    runner = OnnxRuntimeRunner(tiny_models.conv())
    one = runner.run({"x": x[:1]})
    per_sample = sum(v.nbytes for v in one.values())
    assert runner.activation_bytes_per_sample(batch) == per_sample
    assert runner.budgeted_micro_batch(batch, 32, 0) == 32  # no budget
    assert runner.budgeted_micro_batch(batch, 32, 3 * per_sample + 1) == 3
    assert runner.budgeted_micro_batch(batch, 2, 3 * per_sample) == 2  # never more than asked
    assert runner.budgeted_micro_batch(batch, 32, 1) == 1  # at least one sample
    reference = runner.collect_stats(batch, micro_batch=10)
    assert runner.collect_stats(batch, micro_batch=runner.budgeted_micro_batch(batch, 32, 3 * per_sample)) == reference


def test_a_fixed_batch_model_keeps_its_batch_whatever_the_budget() -> None:
    x = tiny_models.small_int_inputs(8, [4], seed=4)
    assert OnnxRuntimeRunner(tiny_models.mlp(1)).budgeted_micro_batch(_batch(x), 32, 1) == 1
    assert OnnxRuntimeRunner(tiny_models.mlp(None)).budgeted_micro_batch(_batch(x), 32, 1) == 1  # one sample per run
    assert OnnxRuntimeRunner(tiny_models.mlp(4)).budgeted_micro_batch(_batch(x), 32, 1) == 4
