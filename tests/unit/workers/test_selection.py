"""Deterministic selection (sorted, seeded PCG64), per-class allocation and sample ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trtcal.batch import validate_sample_ids
from trtcal.errors import ConfigError, DataError
from trtcal.workers.selection import (
    MAX_SAMPLE_ID_BYTES,
    allocate_per_class,
    make_sample_id,
    parse_num_samples,
    path_sort_key,
    select_samples,
)


def _global(selection, counts):
    """Selected global positions (unstratified: shard offsets + local positions)."""
    offsets = np.concatenate(([0], np.cumsum([sum(c.values()) for c in counts])))
    out = []
    for shard, chosen in enumerate(selection.per_shard):
        for positions in chosen.values():
            out.extend((positions + offsets[shard]).tolist())
    return sorted(out)


def test_golden_selection_pins_the_generator():
    # Literal values measured with numpy 2.4: if numpy ever changes Generator.choice for PCG64 (both
    # of its algorithms: full permutation for small pools, Floyd's for large ones), this fails and
    # the selection, hence every batch, would change: bump FORMAT_VERSION then.
    small = select_samples([{"": 1000}], num_samples=8, seed=1234)
    assert small.per_shard[0][""].tolist() == [104, 170, 261, 378, 921, 970, 972, 983]
    large = select_samples([{"": 60000}, {"": 40000}], num_samples=8, seed=1234)
    assert large.per_shard[0][""].tolist() == [10489, 17135, 26169, 38018]
    assert large.per_shard[1][""].tolist() == [92322 - 60000, 97664 - 60000, 97928 - 60000, 98789 - 60000]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    data=st.data(),
    seed=st.integers(0, 2**63),
)
def test_selection_does_not_depend_on_how_the_listing_was_split(sizes, data, seed):
    total = sum(sizes)
    if total == 0:
        return
    n = data.draw(st.integers(1, total))
    split = select_samples([{"": s} for s in sizes], num_samples=n, seed=seed)
    whole = select_samples([{"": total}], num_samples=n, seed=seed)
    picked = _global(split, [{"": s} for s in sizes])
    assert picked == whole.per_shard[0][""].tolist()
    assert len(picked) == len(set(picked)) == n == split.num_selected
    assert all(0 <= p < total for p in picked)


def test_all_and_counts():
    selection = select_samples([{"": 3}, {"": 0}, {"": 2}], num_samples=None, seed=0)
    assert selection.num_selected == 5 and selection.num_candidates == 5
    assert selection.per_shard[0][""].tolist() == [0, 1, 2] and selection.per_shard[2][""].tolist() == [0, 1]
    assert parse_num_samples("all") is None and parse_num_samples("12") == 12
    for bad in ("0", "-1", "x", 2.5, True):
        with pytest.raises(ConfigError):
            parse_num_samples(bad)


def test_too_few_samples():
    with pytest.raises(DataError, match="holds only 5"):
        select_samples([{"": 5}], num_samples=6, seed=0)
    allowed = select_samples([{"": 5}], num_samples=6, seed=0, allow_fewer=True)
    assert allowed.num_selected == 5 and allowed.shortfall == 1
    with pytest.raises(DataError, match="no samples"):
        select_samples([{"": 0}], num_samples=1, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        select_samples([{"": 5}], num_samples=1, seed=-1)


@settings(max_examples=80, deadline=None)
@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=10),
    data=st.data(),
    seed=st.integers(0, 1000),
)
def test_per_class_allocation(counts, data, seed):
    total = sum(counts)
    n = data.draw(st.integers(1, max(1, total + 5)))
    allocation = allocate_per_class(counts, n, np.random.Generator(np.random.PCG64(seed)))
    assert allocation.sum() == min(n, total)
    assert (allocation <= np.asarray(counts)).all() and (allocation >= 0).all()
    # Even: a class below the top either is exhausted or within one of the top.
    if (allocation > 0).any():
        top = allocation.max()
        for a, c in zip(allocation, counts):
            assert a == c or a >= top - 1


def test_stratified_draw_is_even_and_stable():
    counts = [{"a": 10}, {"a": 5, "b": 20}, {"c": 2}]
    first = select_samples(counts, num_samples=9, seed=3)
    again = select_samples(counts, num_samples=9, seed=3)
    per_class: dict[str, int] = {}
    for chosen in first.per_shard:
        for cls, positions in chosen.items():
            per_class[cls] = per_class.get(cls, 0) + len(positions)
    assert per_class == {"a": 4, "b": 3, "c": 2} or per_class == {"a": 3, "b": 4, "c": 2}
    assert [{k: v.tolist() for k, v in c.items()} for c in first.per_shard] == [
        {k: v.tolist() for k, v in c.items()} for c in again.per_shard
    ]


def test_sort_key_keeps_folders_together():
    names = ["a-b/y.jpg", "a/x.jpg", "a/b/z.jpg", "b.jpg", "a.jpg"]
    assert sorted(names, key=path_sort_key) == ["a/b/z.jpg", "a/x.jpg", "a-b/y.jpg", "a.jpg", "b.jpg"]


def test_sample_ids_are_printable_and_escaped():
    assert make_sample_id("train/n01440764/x.JPEG") == "train/n01440764/x.JPEG"
    assert make_sample_id("a b/ü ñ.jpg") == "a b/ü ñ.jpg"
    assert make_sample_id("new\nline.jpg") == "new\\x0aline.jpg"
    assert make_sample_id("back\\slash.jpg") == "back\\\\slash.jpg"
    assert make_sample_id("bad\udcffbyte.jpg") == "bad\\xffbyte.jpg"  # surrogateescape of byte 0xff
    assert make_sample_id("rtl\u202e.jpg") == "rtl\\u202e.jpg"
    assert make_sample_id("data.parquet", 7) == "data.parquet#000000007"
    long_id = make_sample_id("x/" * 600 + "y.jpg")
    assert len(long_id.encode()) <= MAX_SAMPLE_ID_BYTES and "sha256:" in long_id
    assert make_sample_id("x/" * 600 + "z.jpg") != long_id


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=30), min_size=2, max_size=20, unique=True))
def test_sample_ids_are_injective_and_valid_for_the_batch(paths):
    ids = [make_sample_id(p) for p in paths]
    assert len(set(ids)) == len(ids)
    validate_sample_ids(ids)  # the batch writer's own check: printable, unique, not too long
