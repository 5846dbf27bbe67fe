"""PlannedBatchWriter: rows placed straight into the final file must give BatchWriter's exact bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trtcal.batch import (
    BatchWriter,
    InputInfo,
    PlannedBatchWriter,
    compute_fingerprint,
    open_batch,
    write_batch,
)
from trtcal.errors import ConfigError, DataError

SPEC = {"preprocess": {"preset": "imagenet"}, "skipped_inputs": 0}


def _data(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    arrays = {
        "image": rng.standard_normal((n, 3, 6, 5)).astype(np.float32),
        "mask": rng.integers(0, 255, (n, 7)).astype(np.uint8),
    }
    return arrays, [f"train/n{i % 7:04d}/img-{i:05d}.JPEG" for i in range(n)]


def _inputs(arrays: dict[str, np.ndarray]) -> list[InputInfo]:
    return [InputInfo(k, tuple(v.shape[1:]), v.dtype.name) for k, v in arrays.items()]


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("order", ["sorted", "reversed", "shuffled", "one-by-one"])
def test_any_arrival_order_gives_the_bytes_of_write_batch(tmp_path: Path, order: str) -> None:
    arrays, ids = _data(203)
    reference = write_batch(tmp_path / "ref.arrow", arrays, ids, spec=SPEC)
    index = np.argsort(ids)
    if order == "reversed":
        index = index[::-1]
    elif order == "shuffled":
        index = np.random.default_rng(3).permutation(len(ids))
    sizes = [1] * len(ids) if order == "one-by-one" else [1, 17, 64, 5, 116]
    # flush_bytes small: the flushing thread runs many times during the test.
    with PlannedBatchWriter(tmp_path / "planned.arrow", sample_ids=ids[::-1], inputs=_inputs(arrays), spec=SPEC,
                            flush_bytes=4096) as writer:
        start = 0
        for size in sizes:
            part = index[start : start + size]
            writer.write({k: v[part] for k, v in arrays.items()}, [ids[i] for i in part])
            start += size
    assert writer.info is not None
    assert writer.info.fingerprint == reference.fingerprint
    assert (tmp_path / "planned.arrow").read_bytes() == (tmp_path / "ref.arrow").read_bytes()
    assert _files(tmp_path) == ["planned.arrow", "ref.arrow"]  # no temp or sparse file left


def test_fingerprint_equals_compute_fingerprint_and_the_file_opens(tmp_path: Path) -> None:
    arrays, ids = _data(50, seed=1)
    order = np.argsort(ids)
    with PlannedBatchWriter(tmp_path / "p.arrow", sample_ids=ids, inputs=_inputs(arrays), spec=SPEC) as writer:
        writer.write(arrays, ids)
    sorted_ids = [ids[i] for i in order]
    expected = compute_fingerprint(sorted_ids, {k: v[order] for k, v in arrays.items()})
    batch = open_batch(tmp_path / "p.arrow")  # verifies the fingerprint against the content
    assert batch.fingerprint == writer.info.fingerprint == expected
    np.testing.assert_array_equal(batch.array("image"), arrays["image"][order])
    assert batch.spec == SPEC


def test_missing_rows_fall_back_to_rewriting_what_arrived(tmp_path: Path) -> None:
    """Skipped inputs leave holes: the batch holds the rows that came, as BatchWriter writes them."""
    arrays, ids = _data(40)
    keep = [i for i in range(40) if i % 3]
    write_batch(tmp_path / "ref.arrow", {k: v[keep] for k, v in arrays.items()}, [ids[i] for i in keep],
                spec={**SPEC, "skipped_inputs": 14})
    with PlannedBatchWriter(tmp_path / "p.arrow", sample_ids=ids, inputs=_inputs(arrays), spec=SPEC) as writer:
        for i in reversed(keep):
            writer.write({k: v[[i]] for k, v in arrays.items()}, [ids[i]])
        info = writer.close(spec={**SPEC, "skipped_inputs": 14})
    assert info.num_rows == len(keep)
    assert (tmp_path / "p.arrow").read_bytes() == (tmp_path / "ref.arrow").read_bytes()
    assert _files(tmp_path) == ["p.arrow", "ref.arrow"]


def test_a_longer_spec_at_close_moves_the_layout_and_is_still_exact(tmp_path: Path) -> None:
    arrays, ids = _data(12)
    final = {**SPEC, "note": "x" * 500}
    write_batch(tmp_path / "ref.arrow", arrays, ids, spec=final)
    with PlannedBatchWriter(tmp_path / "p.arrow", sample_ids=ids, inputs=_inputs(arrays), spec=SPEC) as writer:
        writer.write(arrays, ids)
        writer.close(spec=final)
    assert (tmp_path / "p.arrow").read_bytes() == (tmp_path / "ref.arrow").read_bytes()


def test_bad_rows_are_refused_with_the_reason(tmp_path: Path) -> None:
    arrays, ids = _data(6)
    with PlannedBatchWriter(tmp_path / "p.arrow", sample_ids=ids, inputs=_inputs(arrays), spec={}) as writer:
        with pytest.raises(DataError, match="not one of the batch's planned ids"):
            writer.write({k: v[:1] for k, v in arrays.items()}, ["elsewhere.JPEG"])
        with pytest.raises(DataError, match="do not match"):
            writer.write({"image": arrays["image"][:1, :2], "mask": arrays["mask"][:1]}, ids[:1])
        with pytest.raises(DataError, match="do not match"):
            writer.write({"image": arrays["image"][:1].astype(np.float64), "mask": arrays["mask"][:1]}, ids[:1])
        with pytest.raises(DataError, match="inputs"):
            writer.write({"image": arrays["image"][:1]}, ids[:1])
        writer.write({k: v[:2] for k, v in arrays.items()}, ids[:2])
        with pytest.raises(DataError, match="already written"):
            writer.write({k: v[1:3] for k, v in arrays.items()}, ids[1:3])
        writer.write({k: v[2:] for k, v in arrays.items()}, ids[2:])
    with pytest.raises(ConfigError, match="closed"):
        writer.write({k: v[:1] for k, v in arrays.items()}, ids[:1])
    assert open_batch(tmp_path / "p.arrow").num_rows == 6


def test_construction_refuses_bad_plans(tmp_path: Path) -> None:
    info = [InputInfo("x", (3,), "float32")]
    with pytest.raises(DataError, match="more than once"):
        PlannedBatchWriter(tmp_path / "p.arrow", sample_ids=["a", "b", "a"], inputs=info, spec={})
    with pytest.raises(DataError, match="at least one row"):
        PlannedBatchWriter(tmp_path / "p.arrow", sample_ids=[], inputs=info, spec={})
    with pytest.raises(DataError, match="no values"):
        PlannedBatchWriter(tmp_path / "p.arrow", sample_ids=["a"], inputs=[InputInfo("x", (0, 3), "float32")], spec={})
    with pytest.raises(DataError):
        PlannedBatchWriter(tmp_path / "p.arrow", sample_ids=["a/../\x00"], inputs=info, spec={})
    assert _files(tmp_path) == []


def test_an_exception_or_no_rows_publishes_nothing(tmp_path: Path) -> None:
    arrays, ids = _data(8)
    with pytest.raises(RuntimeError, match="worker died"):
        with PlannedBatchWriter(tmp_path / "p.arrow", sample_ids=ids, inputs=_inputs(arrays), spec={}) as writer:
            writer.write({k: v[:3] for k, v in arrays.items()}, ids[:3])
            raise RuntimeError("worker died")
    assert _files(tmp_path) == []
    with pytest.raises(DataError, match="no rows"):
        with PlannedBatchWriter(tmp_path / "p.arrow", sample_ids=ids, inputs=_inputs(arrays), spec={}):
            pass
    assert _files(tmp_path) == []


def test_same_bytes_as_batch_writer_streaming(tmp_path: Path) -> None:
    arrays, ids = _data(31, seed=5)
    with BatchWriter(tmp_path / "w.arrow", spec=SPEC) as streaming:
        streaming.write(arrays, ids)
    with PlannedBatchWriter(tmp_path / "p.arrow", sample_ids=ids, inputs=_inputs(arrays), spec=SPEC) as writer:
        writer.write(arrays, ids)
    assert (tmp_path / "p.arrow").read_bytes() == (tmp_path / "w.arrow").read_bytes()
