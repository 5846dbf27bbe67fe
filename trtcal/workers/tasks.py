"""The bodies of `build_batch`'s Ray tasks: plain functions (wrapped with ray.remote by the driver).

list      `_list_task`: list a group of shards, keep the listings, return per-class counts.
select    `_resolve_task`: positions chosen by the driver -> sample references.
process   `_process_task`: read, decode and transform a chunk; never raises for a bad input; on the
          driver's node, writes its rows straight into the batch file (`RowPlacement`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from trtcal.batch import RowPlacement
from trtcal.workers.preprocess import InputRejected, PreprocessSpec, preprocess_array, preprocess_image_bytes
from trtcal.workers.sources import (
    Dataset,
    SampleRef,
    Shard,
    ShardListing,
    list_shard,
    read_container_rows,
    read_images,
    resolve_selection,
)


@dataclass(frozen=True)
class _ShardSummary:
    counts: dict[str, int]
    kind: str
    refused: list[tuple[str, str]]
    ignored: int
    inputs: dict[str, tuple[tuple[int, ...], str]]


def _list_task(
    dataset: Dataset, shards: Sequence[Shard], stratify: bool
) -> tuple[list[_ShardSummary], list[ShardListing]]:
    """List a group of shards (one task per shard costs more in scheduling than a small listing)."""
    summaries, listings = [], []
    for shard in shards:
        listing = list_shard(dataset, shard)
        summaries.append(_ShardSummary(
            counts=listing.class_counts(stratify), kind=listing.kind, refused=listing.refused,
            ignored=listing.ignored, inputs=listing.inputs,
        ))
        listings.append(listing)
    return summaries, listings


def _resolve_task(
    listings: Sequence[ShardListing], chosen: Sequence[Mapping[str, npt.NDArray[np.int64]]], stratify: bool
) -> list[SampleRef]:
    refs: list[SampleRef] = []
    for listing, picked in zip(listings, chosen):
        if picked:
            refs.extend(resolve_selection(listing, picked, stratify))
    return refs


def _groups(count: int, num_groups: int) -> list[range]:
    """`count` items split into at most `num_groups` contiguous, near-equal ranges."""
    num_groups = max(1, min(count, num_groups))
    bounds = [count * k // num_groups for k in range(num_groups + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


@dataclass
class _ChunkResult:
    """Valid rows grouped by signature (ids, stacked arrays), rejected rows, and stage seconds."""

    groups: list[tuple[list[str], dict[str, npt.NDArray[Any]]]]
    rejected: list[tuple[str, str, str, str]]  # (sample_id, path, reason, detail)
    timings: dict[str, float]
    # (ids, digests per input) of rows the task wrote into the batch file itself
    placed: list[tuple[list[str], dict[str, bytes]]] = field(default_factory=list)


def _signature(arrays: Mapping[str, npt.NDArray[Any]]) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    return tuple((name, tuple(int(d) for d in a.shape), a.dtype.name) for name, a in sorted(arrays.items()))


def _on_node(node: str) -> bool:
    """Whether this task runs on the Ray node `node` (so it sees the driver's files)."""
    try:
        import ray

        return bool(ray.get_runtime_context().get_node_id() == node)
    except Exception:  # not inside Ray
        return False


def _process_task(
    dataset: Dataset, refs: Sequence[SampleRef], spec: PreprocessSpec, input_name: str, max_pixels: int,
    place: RowPlacement | None = None, first_row: int = 0,
) -> _ChunkResult:
    """Read, decode and transform one chunk of samples; never raises for a bad input.

    With `place` (the batch file's layout) and on the driver's node, valid rows are written straight
    into the batch file at ``first_row + their index in refs`` and only their ids go back.
    """
    fs = dataset.filesystem()
    timings = {"read": 0.0, "decode": 0.0, "transform": 0.0, "write": 0.0}
    rows: list[tuple[str, dict[str, npt.NDArray[Any]]]] = []
    rejected: list[tuple[str, str, str, str]] = []

    def reject(ref: SampleRef, exc: InputRejected) -> None:
        rejected.append((ref.sample_id, ref.path, exc.reason, exc.detail))

    def run_image(ref: SampleRef, data: bytes) -> None:
        try:
            rows.append((ref.sample_id, preprocess_image_bytes(
                data, spec, input_name=input_name, max_pixels=max_pixels, timings=timings
            )))
        except InputRejected as exc:
            reject(ref, exc)

    images = [r for r in refs if r.kind == "image"]
    t0 = time.perf_counter()
    encoded = read_images(dataset, fs, images)
    timings["read"] += time.perf_counter() - t0
    for ref in images:
        value = encoded.pop(ref.sample_id)
        if isinstance(value, InputRejected):
            reject(ref, value)
        else:
            run_image(ref, value)
    by_file: dict[str, list[SampleRef]] = {}
    for ref in refs:
        if ref.kind != "image":
            by_file.setdefault(ref.path, []).append(ref)
    for path, file_refs in by_file.items():
        kind = file_refs[0].kind
        by_row = {int(r.row or 0): r for r in file_refs}
        done: set[int] = set()
        try:
            t0 = time.perf_counter()
            for row, value in read_container_rows(fs, path, kind, list(by_row), input_name):
                timings["read"] += time.perf_counter() - t0
                ref = by_row[row]
                done.add(row)
                if kind == "parquet":
                    run_image(ref, value)
                else:
                    try:
                        rows.append((ref.sample_id, preprocess_array(value, spec, timings=timings)))
                    except InputRejected as exc:
                        reject(ref, exc)
                t0 = time.perf_counter()
        except InputRejected as exc:
            for row, ref in by_row.items():
                if row not in done:
                    reject(ref, exc)
    stacked = _stack_by_signature(rows)
    placed: list[tuple[list[str], dict[str, bytes]]] = []
    if place is not None and stacked and _on_node(place.node):
        t0 = time.perf_counter()
        position = {ref.sample_id: first_row + k for k, ref in enumerate(refs)}
        stacked, placed = _place_rows(place, stacked, position)
        timings["write"] += time.perf_counter() - t0
    return _ChunkResult(groups=stacked, rejected=rejected, timings=timings, placed=placed)


_Stacked = list[tuple[list[str], dict[str, npt.NDArray[Any]]]]


def _stack_by_signature(rows: Sequence[tuple[str, dict[str, npt.NDArray[Any]]]]) -> _Stacked:
    """Rows grouped by (input, shape, dtype) signature and stacked: (ids, name -> array) per group."""
    groups: dict[Any, tuple[list[str], list[dict[str, npt.NDArray[Any]]]]] = {}
    for sample_id, arrays in rows:
        ids, members = groups.setdefault(_signature(arrays), ([], []))
        ids.append(sample_id)
        members.append(arrays)
    return [(ids, {name: np.stack([m[name] for m in members]) for name in members[0]}) for ids, members in groups.values()]


def _place_rows(
    place: RowPlacement, stacked: _Stacked, position: Mapping[str, int]
) -> tuple[_Stacked, list[tuple[list[str], dict[str, bytes]]]]:
    """Write the groups the batch file accepts at their rows; (the groups left to the driver, what was placed)."""
    kept: _Stacked = []
    placed: list[tuple[list[str], dict[str, bytes]]] = []
    for ids, arrays in stacked:
        if place.accepts(arrays):
            try:
                placed.append((ids, place.write_rows([position[s] for s in ids], arrays)))
                continue
            except OSError:
                pass  # the driver writes these rows instead (and reports any error)
        kept.append((ids, arrays))
    return kept, placed
