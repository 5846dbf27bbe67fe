"""`build_batch`: Ray tasks over a sharded dataset -> ONE calibration batch, identical whatever the parallelism.

Stages (each a set of Ray tasks, at most `workers` in flight, consumed with ray.wait as they end):

1. list     the driver plans shards with a few one-level listings (`sources.plan_shards`); one
            task per shard lists it and keeps the sorted listing in the object store, sending
            the driver only per-class counts.
2. select   the driver draws positions (`selection.select_samples`: sorted, seeded PCG64) and one
            task per shard turns them into sample references.
3. process  chunks of samples, sorted by id, are read, decoded and transformed by tasks
            (`preprocess`); each result goes straight to its rows' place in the final Arrow file
            (`PlannedBatchWriter`: the ids are known, so is the layout), which is hashed and
            flushed in the background, so the driver holds about `workers` chunks at a time.
4. write    the writer writes the metadata, fsyncs and publishes the one record batch atomically
            (a temp name then a rename locally, one PUT on object stores). Skipped inputs leave
            holes: the rows that came are then rewritten once.

A task whose worker dies (SIGKILL, OOM) is retried by Ray (`max_retries`); a chunk's result is a
pure function of its samples, so a retry changes nothing in the batch. Bad inputs become
`BadInput` records; `on_bad_input="fail"` (default) raises DataError listing all of them,
"skip" leaves them out, lists them in the report and records their count in the batch's spec
(``skipped_inputs``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from trtcal.batch import InputInfo, PlannedBatchWriter
from trtcal.config import BatchConfig, OnBadInput, choices
from trtcal.errors import ConfigError, DataError
from trtcal.progress import NO_PROGRESS, ProgressCallback
from trtcal.workers.build_base import (
    BadInput,
    BuildReport,
    _bad_input_message,
    _Build,
    _location,
    _Runner,
    refuse_access_failures,
)
from trtcal.workers.preprocess import (
    output_shape,
)
from trtcal.workers.ray_runtime import RaySessionInfo, ray_session
from trtcal.workers.selection import make_sample_id, select_samples
from trtcal.workers.sources import (
    Dataset,
    SampleRef,
    Shard,
    open_dataset,
    plan_shards,
    storage_options_for,
)
from trtcal.workers.tasks import (
    _ChunkResult,
    _groups,
    _ShardSummary,
)

__all__ = ["BatchConfig", "BadInput", "BuildReport", "build_batch", "build_batch_on", "ON_BAD_INPUT"]

logger = logging.getLogger(__name__)

ON_BAD_INPUT = choices(OnBadInput)
_CHUNK_TARGET_BYTES = 8 << 20
_DEFAULT_ROW_BYTES = 3 * 224 * 224 * 4


# ---------------------------------------------------------------------------------------------
# The driver


def build_batch(
    data_url: str | os.PathLike[str],
    output_url: str | os.PathLike[str],
    config: BatchConfig | None = None,
    *,
    address: str | None = None,
    progress: ProgressCallback = NO_PROGRESS,
    storage_options: Mapping[str, Any] | None = None,
    output_storage_options: Mapping[str, Any] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> BuildReport:
    """Build ONE calibration batch from a dataset URL and publish it at `output_url`.

    Args:
        data_url: folder/prefix, list file, Parquet/.npy/.npz file (see `trtcal.workers.sources`).
        output_url: where the `.arrow` batch goes (local path or fsspec URL); published atomically.
        config: how to build it (`trtcal.config.BatchConfig`: samples, seed, preprocessing, ...).
        address: a Ray cluster to run on; None starts (and stops) an embedded Ray unless one is
            already initialised in this process (then that one is used, as `calibrate_dataset` does).
        progress: receives "list", "preprocess" (images) and "write" stages.
        storage_options: fsspec options for the dataset (and the output, unless
            `output_storage_options` is given).
        runtime_env: a Ray runtime_env for the tasks (e.g. to ship the module of a preprocessing
            function to a cluster).
        overrides: fields of `BatchConfig` replacing those of `config` (``num_samples=8, seed=0``).

    Raises:
        ConfigError: invalid arguments.  DataError: bad inputs under "fail", no valid samples,
        too few samples under "fail".  StorageError: dataset or output unreachable.
        WorkerError: Ray failed (after retries).
    """
    config = (config or BatchConfig()).with_overrides(**overrides)
    with ray_session(address, num_cpus=config.workers) as session:
        return build_batch_on(
            session, data_url, output_url, config, progress=progress, storage_options=storage_options,
            output_storage_options=output_storage_options, runtime_env=runtime_env,
        )


def build_batch_on(
    session: RaySessionInfo,
    data_url: str | os.PathLike[str],
    output_url: str | os.PathLike[str],
    config: BatchConfig,
    *,
    progress: ProgressCallback = NO_PROGRESS,
    storage_options: Mapping[str, Any] | None = None,
    output_storage_options: Mapping[str, Any] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
) -> BuildReport:
    """`build_batch` on a Ray session the caller holds (`calibrate_dataset` opens one for the whole job)."""
    import ray

    from trtcal.workers.text import is_jsonl_url, open_text_dataset

    started = time.perf_counter()
    text_url = os.fspath(data_url)
    dataset = open_text_dataset(text_url, storage_options) if is_jsonl_url(text_url) else open_dataset(data_url, storage_options)
    output_url = os.fspath(output_url)
    out_options = storage_options_for(
        output_url, output_storage_options if output_storage_options is not None else storage_options
    )
    workers = config.workers or max(1, session.num_cpus)
    run = _Runner(ray, workers, config.max_retries, runtime_env)
    return _build(_Build(run, dataset, output_url, out_options, config, workers, progress), started)


def _split_refused(dataset: Dataset, entries: Iterable[tuple[str, str]]) -> list[BadInput]:
    out: list[BadInput] = []
    for rel, text in entries:
        reason, _, detail = text.partition(": ")
        out.append(BadInput(make_sample_id(rel), _location(dataset, rel), reason, detail))
    return out


def _chunks(refs: Sequence[SampleRef], size: int) -> list[tuple[int, list[SampleRef]]]:
    """(position of the first row in sorted id order, the chunk's refs)."""
    return [(i, list(refs[i : i + size])) for i in range(0, len(refs), size)]


@dataclass
class _Listed:
    """The list stage's outcome: per-shard summaries (listings stay in the object store), refused entries."""

    shards: list[Shard]
    groups: list[range]
    summaries: list[_ShardSummary]
    listings: dict[int, Any]  # group index -> ObjectRef of that group's listings
    refused: list[BadInput]
    ignored: int
    families: set[str]


def _build(b: _Build, started: float) -> BuildReport:
    from trtcal.workers.text import build_text, is_text_request

    if is_text_request(b.dataset, b.config):
        return build_text(b, started)
    wall: dict[str, float] = {}
    warnings: list[str] = []
    t0 = time.perf_counter()
    listed = _list_stage(b)
    refuse_access_failures(b.dataset, listed.refused)
    wall["list"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    selection, refs = _select_stage(b, listed, warnings)
    wall["select"] = time.perf_counter() - t0
    sink, info = _process_and_write_stage(b, listed, refs, warnings, wall)
    for message in warnings:
        logger.warning("%s", message)
    wall["total"] = time.perf_counter() - started
    return BuildReport(
        output_url=info.path, fingerprint=info.fingerprint, num_rows=info.num_rows, inputs=info.inputs,
        nbytes=info.nbytes, spec=sink.document, num_requested=b.config.num_samples,
        num_candidates=selection.num_candidates, num_selected=len(refs), skipped=tuple(sink.skipped),
        refused=tuple(sorted(listed.refused, key=lambda x: x.sample_id)), ignored_files=listed.ignored,
        workers=b.workers, wall_seconds=wall, worker_seconds=sink.worker_seconds, warnings=tuple(warnings),
    )


def _list_stage(b: _Build) -> _Listed:
    """1. list: one task per group of shards; the driver gets per-class counts, refusals and kinds."""
    dataset = b.dataset
    plan = plan_shards(dataset)
    shards = plan.shards
    b.progress.start("list", total=len(shards), unit="shard")
    summaries: dict[int, _ShardSummary] = {}
    listings: dict[int, Any] = {}
    # A few shards per task: enough tasks to keep every worker busy, few enough to schedule cheaply.
    groups = _groups(len(shards), 4 * b.workers)

    def submit_list(group: int) -> Any:
        summary_ref, listing_ref = b.run.list_task.remote(dataset, [shards[i] for i in groups[group]], b.config.stratify)
        listings[group] = listing_ref
        return summary_ref

    def on_listed(group: int, group_summaries: list[_ShardSummary]) -> None:
        for index, summary in zip(groups[group], group_summaries):
            summaries[index] = summary
        b.progress.advance("list", len(groups[group]))

    b.run.map_unordered(submit_list, range(len(groups)), on_listed)
    b.progress.finish("list")
    ordered = [summaries[i] for i in range(len(shards))]
    refused = _split_refused(dataset, plan.refused)
    for summary in ordered:
        refused.extend(_split_refused(dataset, summary.refused))
    listed = _Listed(
        shards=list(shards), groups=groups, summaries=ordered, listings=listings, refused=refused,
        ignored=plan.ignored + sum(s.ignored for s in ordered), families=set(),
    )
    listed.families = _check_listing(b, listed)
    return listed


def _check_listing(b: _Build, listed: _Listed) -> set[str]:
    """One kind of data, inputs that agree, a preprocessing that fits; refusals fail unless skipped."""
    dataset, spec = b.dataset, b.config.preprocess
    kinds = {s.kind for s in listed.summaries if s.kind}
    families = {"tensor" if k in ("npy", "npz") else "image" for k in kinds}
    if len(families) > 1 or ({"npy", "npz"} <= kinds):
        raise DataError(f"dataset {dataset.display_url} mixes {sorted(kinds)} files; a calibration batch needs one kind")
    tensor_inputs = [s.inputs for s in listed.summaries if s.inputs]
    if any(inputs != tensor_inputs[0] for inputs in tensor_inputs):
        raise DataError(f"dataset {dataset.display_url}: tensor files disagree on their inputs: {tensor_inputs[0]} vs others")
    if "tensor" in families and not (spec.is_passthrough or spec.function is not None):
        raise ConfigError(
            "preprocess: tensor data (.npy/.npz) is fed as it is; use the 'raw' preset (optionally with a dtype) "
            "or a preprocessing function"
        )
    if listed.refused and not b.skip:
        raise DataError(_bad_input_message(
            f"dataset {dataset.display_url}", listed.refused,
            "Fix or remove these entries, or pass on_bad_input='skip' (--on-bad-input skip) to leave them out.",
        ))
    if listed.refused:
        logger.warning("%d dataset entries refused while listing (see the report)", len(listed.refused))
    if listed.ignored:
        logger.info("ignored %d files with other extensions or hidden names", listed.ignored)
    return families


def _select_stage(b: _Build, listed: _Listed, warnings: list[str]) -> tuple[Any, list[SampleRef]]:
    """2. select: the seeded draw on the driver, then one task per group turns positions into samples."""
    config, groups = b.config, listed.groups
    selection = select_samples(
        [s.counts for s in listed.summaries], num_samples=config.num_samples, seed=config.seed, allow_fewer=b.skip
    )
    if selection.shortfall > 0:
        warnings.append(
            f"asked for {selection.num_requested} samples but the dataset holds only {selection.num_candidates}; "
            "using all of them"
        )
    refs: list[SampleRef] = []
    chosen_groups = [g for g, members in enumerate(groups) if any(selection.per_shard[i] for i in members)]

    def submit_resolve(group: int) -> Any:
        chosen = [selection.per_shard[i] for i in groups[group]]
        return b.run.resolve_task.remote(listed.listings[group], chosen, config.stratify)

    b.run.map_unordered(submit_resolve, chosen_groups, lambda _g, group_refs: refs.extend(group_refs))
    listed.listings.clear()  # the listings leave the object store
    refs.sort(key=lambda r: r.sample_id)
    for x, y in zip(refs, refs[1:]):
        if x.sample_id == y.sample_id:
            raise DataError(f"two dataset entries map to the same sample id {x.sample_id!r}: {x.path!r} and {y.path!r}")
    logger.info("selected %d of %d samples from %d shards", len(refs), selection.num_candidates, len(listed.shards))
    return selection, refs


class _ChunkSink:
    """The driver's side of stage 3: takes each chunk's result, writes its rows (or records them as bad)."""

    def __init__(self, b: _Build, refs: Sequence[SampleRef], expected: Any, num_refused: int) -> None:
        self.b = b
        self.refs = refs
        self.paths = {r.sample_id: r.path for r in refs}
        self.expected = expected
        self.skipped: list[BadInput] = []
        self.worker_seconds = {"read": 0.0, "decode": 0.0, "transform": 0.0}
        self.write_seconds = 0.0
        self.document: dict[str, Any] = {
            "preprocess": b.config.preprocess.to_dict(), "skipped_inputs": 0, "refused_entries": num_refused,
        }
        if b.config.inputs:  # declared inputs (batch axis, constants) travel with the batch to the runners
            from trtcal.config import input_specs_to_dict

            self.document["inputs"] = input_specs_to_dict(b.config.inputs)
        self.writer: PlannedBatchWriter | None = None if expected is None else self.open_writer(expected)

    def open_writer(self, signature: Any) -> PlannedBatchWriter:
        # Every row has its place from the start: the writer reserves the whole file now (a full
        # disk fails here) and hashes and flushes while the workers run.
        return PlannedBatchWriter(
            self.b.output_url, sample_ids=[r.sample_id for r in self.refs],
            inputs=[InputInfo(name, shape, dtype) for name, shape, dtype in signature], spec=self.document,
            **dict(self.b.out_options),
        )

    def submit(self, item: tuple[int, list[SampleRef]]) -> Any:
        b = self.b
        place = None if self.writer is None or b.run.node_id is None else self.writer.placement(b.run.node_id)
        first_row, chunk = item
        return b.run.process_task.remote(
            b.dataset, chunk, b.config.preprocess, b.config.input_name, b.config.max_image_pixels, place, first_row
        )

    def on_chunk(self, item: tuple[int, list[SampleRef]], result: _ChunkResult) -> None:
        dataset = self.b.dataset
        for key, value in result.timings.items():
            self.worker_seconds[key] = self.worker_seconds.get(key, 0.0) + value
        rejected = [BadInput(sample_id, _location(dataset, path), reason, detail)
                    for sample_id, path, reason, detail in result.rejected]
        refuse_access_failures(dataset, rejected)
        self.skipped.extend(rejected)
        for ids, arrays in result.groups:
            signature = _signature_rows(arrays)
            if self.expected is None:
                self.expected = signature
            if signature != self.expected:
                detail = f"{_describe(signature)} differs from the batch's {_describe(self.expected)}"
                self.skipped.extend(BadInput(s, _location(dataset, self.paths[s]), "shape-mismatch", detail) for s in ids)
                continue
            if self.skipped and not self.b.skip:
                continue  # the build will fail: do not spool rows for nothing
            t_write = time.perf_counter()
            if self.writer is None:
                self.writer = self.open_writer(signature)
            self.writer.write(arrays, ids)
            self.write_seconds += time.perf_counter() - t_write
        for ids, digests in result.placed:
            assert self.writer is not None
            self.writer.mark_written(ids, digests)
        self.b.progress.advance("preprocess", len(item[1]))


def _chunk_plan(b: _Build, listed: _Listed, refs: Sequence[SampleRef]) -> tuple[Any, list[tuple[int, list[SampleRef]]]]:
    """The batch's signature when the preprocessing fixes it, and the chunks of samples (~8 MiB each)."""
    spec = b.config.preprocess
    expected_shape = output_shape(spec) if "image" in listed.families else None
    expected = None if expected_shape is None else ((b.config.input_name, expected_shape, spec.dtype),)
    row_bytes = _DEFAULT_ROW_BYTES if expected_shape is None else int(np.prod(expected_shape)) * np.dtype(spec.dtype).itemsize
    size = b.config.chunk_size or max(1, min(64, _CHUNK_TARGET_BYTES // row_bytes))
    size = max(1, min(size, math.ceil(len(refs) / (b.workers * 4))))
    return expected, _chunks(refs, size)


def _process_and_write_stage(
    b: _Build, listed: _Listed, refs: list[SampleRef], warnings: list[str], wall: dict[str, float]
) -> tuple[_ChunkSink, Any]:
    """3. process (streamed into the writer), 4. write; the batch file is aborted on any error."""
    expected, chunks = _chunk_plan(b, listed, refs)
    t_process = time.perf_counter()
    sink: _ChunkSink | None = None
    try:
        sink = _ChunkSink(b, refs, expected, len(listed.refused))
        b.progress.start("preprocess", total=len(refs), unit="img")
        remaining = chunks
        # The batch's shape is that of the first valid sample in id order: probe chunk by chunk.
        while remaining and sink.expected is None:
            b.run.map_unordered(sink.submit, remaining[:1], sink.on_chunk)
            remaining = remaining[1:]
        # One task queued behind each running one: a worker that finishes starts the next chunk at
        # once instead of waiting for the driver's round trip (results are ids only, or one chunk).
        b.run.map_unordered(sink.submit, remaining, sink.on_chunk, in_flight=2 * b.workers)
        b.progress.finish("preprocess")
        wall["process"] = time.perf_counter() - t_process
        info = _write_stage(b, sink, warnings)
        wall["write"] = sink.write_seconds + info[1]
        return sink, info[0]
    except BaseException:
        if sink is not None and sink.writer is not None:
            sink.writer.abort()
        raise


def _write_stage(b: _Build, sink: _ChunkSink, warnings: list[str]) -> tuple[Any, float]:
    """4. write: fail on bad inputs (unless skipped), then close the writer (metadata, fsync, publish)."""
    dataset, refs = b.dataset, sink.refs
    sink.skipped.sort(key=lambda x: x.sample_id)
    if sink.skipped and not b.skip:
        raise DataError(_bad_input_message(
            f"cannot build a calibration batch from {dataset.display_url}", sink.skipped,
            "Fix or remove these files, or pass on_bad_input='skip' (--on-bad-input skip) to leave them out.",
        ))
    writer = sink.writer
    if writer is None or writer.num_rows == 0:
        raise DataError(_bad_input_message(
            f"no valid samples remain in {dataset.display_url} (all {len(refs)} selected were bad)",
            sink.skipped, "Check the dataset and the preprocessing.",
        ))
    if sink.skipped:
        warnings.append(
            f"{len(sink.skipped)} of {len(refs)} selected inputs were skipped; the batch holds {writer.num_rows}"
            + (f" instead of {b.config.num_samples}" if b.config.num_samples is not None else "")
        )
    sink.document["skipped_inputs"] = len(sink.skipped)
    t_close = time.perf_counter()
    b.progress.start("write", total=1, unit="batch")
    info = writer.close(spec=sink.document)
    b.progress.advance("write")
    b.progress.finish("write")
    return info, time.perf_counter() - t_close


def _signature_rows(arrays: Mapping[str, npt.NDArray[Any]]) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """Per-sample signature of stacked arrays (the row axis dropped)."""
    return tuple((name, tuple(int(d) for d in a.shape[1:]), a.dtype.name) for name, a in sorted(arrays.items()))


def _describe(signature: Any) -> str:
    return ", ".join(f"{name} {list(shape)} {dtype}" for name, shape, dtype in signature)
