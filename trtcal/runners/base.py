"""The statistics loop, written once; each runner supplies only how it runs the model.

A runner (`BaseRunner` subclass) knows a loaded model, its fed inputs and the tensors it
calibrates, and implements three hooks (Polygraphy's `infer` -> `infer_impl` split):

* `infer_impl(feed)`: run one micro-batch, yield `(tensor name, value)` for every selected tensor
  in `tensor_names` order (a value may be freed once the generator resumes);
* `_stats_collector(nonfinite)` / `_counts_collector(hist_amax, num_bins, nonfinite)`: where the
  values are reduced (numpy on the host here, device kernels in `torch_runner`);
* optionally `_pass_context()` (e.g. exact FP32 and inference mode) and `_uploader()` (host ->
  device copies of each micro-batch).

`collect_stats` (pass 1: exact max |x|, min, max, NaN/Inf counts) and `collect_counts` (pass 2:
integer |x| histograms on the pass-1 amax) then walk a contiguous row range [start, stop) of the
batch in micro-batches (`feed_micro_batches`, the one feeder). Results of row ranges merge exactly
(`trtcal.core.merge_stats`, integer addition), which is what `data_parallel` relies on.

`make_runner` is the one factory: "onnxruntime", "torch", "onnxruntime-device", or "auto" (ONNX
Runtime, except on a CUDA device where onnxruntime lacks its CUDA provider and PyTorch sees a GPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from trtcal.core.histogram import (
    DEFAULT_NUM_BINS,
    NonFinitePolicy,
    TensorStats,
    fill_counts,
    merge_stats,
    reduce_stats,
)
from trtcal.errors import ConfigError, DataError
from trtcal.model import MASK_FILL_LIMIT
from trtcal.progress import NO_PROGRESS, ProgressCallback

if TYPE_CHECKING:

    from trtcal.batch import CalibrationBatch
    from trtcal.model import LoadedModel, ModelInput

__all__ = [
    "BaseRunner",
    "BatchLayout",
    "Collector",
    "Runner",
    "RunnerKind",
    "batch_layout",
    "feed_micro_batches",
    "row_range",
]

logger = logging.getLogger(__name__)

RunnerKind = Literal["auto", "onnxruntime", "torch", "onnxruntime-device"]
RUNNER_KINDS = ("auto", "onnxruntime", "torch", "onnxruntime-device")
Feed = Mapping[str, Any]  # input name -> array (numpy on the host, or a device tensor)


# ---------------------------------------------------------------------------------------------
# Batch layout and the micro-batch feeder


@dataclass(frozen=True)
class BatchLayout:
    """How rows of the batch become feeds: stacked (with a possibly fixed batch size) or one by one.

    Declared inputs (`trtcal.config.InputSpec`, stored in the batch's spec under "inputs") add
    inputs whose samples stack along another axis (`batch_axes`), constants fed every micro-batch
    (`constants`: name, array, axis it is repeated along or None) and the mask input.
    """

    stacked: bool  # samples have rank r-1: stack them along a new leading axis
    fixed_batch: int | None  # the model's fixed leading dimension when stacked
    batch_axes: tuple[tuple[str, int], ...] = ()
    constants: tuple[tuple[str, Any, int | None], ...] = field(default=(), compare=False)
    mask_input: str | None = None

    def micro_batch(self, requested: int) -> int:
        if not self.stacked:
            return 1
        return self.fixed_batch if self.fixed_batch is not None else requested

    def feed(self, chunk: dict[str, npt.NDArray[Any]], rows: int) -> dict[str, npt.NDArray[Any]]:
        """The model feed for `rows` stacked rows (or one unstacked sample): axes moved, constants added."""
        if not self.stacked:
            feed = {n: a[0] for n, a in chunk.items()}
        else:
            feed = dict(chunk)
            for name, axis in self.batch_axes:
                feed[name] = np.ascontiguousarray(np.moveaxis(feed[name], 0, axis))
        for name, value, repeat_axis in self.constants:
            if repeat_axis is None or not self.stacked:
                feed[name] = value
            else:
                shape = (*value.shape[:repeat_axis], rows, *value.shape[repeat_axis:])
                feed[name] = np.ascontiguousarray(np.broadcast_to(np.expand_dims(value, repeat_axis), shape))
        return feed


def batch_layout(inputs: Mapping[str, ModelInput], batch: CalibrationBatch, source: str) -> BatchLayout:
    """Check the batch against the model inputs (and the input specs it carries); DataError naming the
    input on any mismatch."""
    from trtcal.config import parse_input_specs

    try:
        specs = {s.name: s for s in parse_input_specs(batch.spec.get("inputs") or {})}
    except ConfigError as exc:
        raise DataError(f"calibration batch {batch.source!r}: its input specs are invalid ({exc})") from None
    undeclared = sorted(set(specs) - set(inputs))
    if undeclared:
        raise DataError(
            f"calibration batch {batch.source!r} declares input(s) {undeclared} that model {source!r} does not have; "
            f"its inputs are {sorted(inputs)}"
        )
    fed = {n: m for n, m in inputs.items() if not (n in specs and specs[n].is_constant)}
    got = batch.inputs
    missing = sorted(set(fed) - set(got))
    extra = sorted(set(got) - set(fed))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing} (expected {[f'{n}: {inputs[n].describe()}' for n in missing]})")
        if extra:
            parts.append(f"column(s) {extra} that the model has no input for")
        raise DataError(
            f"calibration batch {batch.source!r} does not match model {source!r}: {'; '.join(parts)}. "
            f"The model's inputs are {sorted(inputs)}; the batch holds {sorted(got)}"
            + (f"; declare constant inputs (value) with --inputs '{_spec_hint(_missing_hint(missing, fed, got, specs))}'"
               " (VALUE: the input's constant, e.g. a sample rate); see docs/inputs.md" if missing else "")
        )
    modes: dict[str, tuple[bool, int | None]] = {}
    axes: list[tuple[str, int]] = []
    for name, expected in sorted(fed.items()):
        axis = specs[name].batch_axis if name in specs else 0
        if axis is None or (expected.dims and axis >= len(expected.dims)):
            raise DataError(
                f"input {name!r}: batch_axis {axis} does not fit the model's {expected.describe()}; "
                "inputs read from the data need a batch axis (constants take a value)"
            )
        modes[name] = _input_mode(name, expected, got[name], axis)
        if axis and modes[name][0]:
            axes.append((name, axis))
    if len(set(modes.values())) > 1:
        described = "; ".join(
            f"{n!r} (model {fed[n].describe()}, samples {list(got[n].shape)}): "
            + (f"stacked, batch dim {'?' if lead is None else lead}" if stacked else "one whole feed per row")
            for n, (stacked, lead) in sorted(modes.items())
        )
        hint = _suggested_specs({n: fed[n] for n in modes if n not in specs}, got)
        raise DataError(
            f"inputs disagree on the batch axis: {described}. Declare each input's batch axis, or its value if it is "
            "a constant"
            + (f": --inputs '{_spec_hint(hint)}'" if hint else " (--inputs '{\"NAME\": {\"batch_axis\": K}}')")
            + "; see docs/inputs.md"
        )
    stacked, lead = next(iter(modes.values()))
    constants = tuple(_constant_feed(specs[n], inputs[n], stacked) for n in sorted(inputs) if n in specs and specs[n].is_constant)
    masks = [n for n, s in specs.items() if s.mask]
    return BatchLayout(stacked=stacked, fixed_batch=lead, batch_axes=tuple(axes), constants=constants,
                       mask_input=masks[0] if masks else None)


_VALUE = "VALUE"  # placeholder in a suggested spec: the user's constant


def _spec_hint(specs: Mapping[str, Any]) -> str:
    """The --inputs JSON of suggested specs, VALUE left as a bare placeholder."""
    text = json.dumps(dict(sorted(specs.items())), separators=(", ", ": "))
    return text.replace(f'"{_VALUE}"', _VALUE)


def _missing_hint(missing: list[str], fed: Mapping[str, ModelInput], got: Mapping[str, Any], specs: Mapping[str, Any]) -> dict[str, Any]:
    """Constants for the missing inputs, plus the batch axes the present ones will need."""
    present = {n: m for n, m in fed.items() if n in got and n not in specs}
    return {**_suggested_specs(present, got), **{n: {"value": _VALUE} for n in missing}}


def _suggested_specs(undeclared: Mapping[str, ModelInput], got: Mapping[str, Any]) -> dict[str, Any]:
    """Specs that would make the undeclared inputs agree: a scalar is a constant; an input whose
    samples fit its model shape only with the batch on one axis k != 0 gets batch_axis k."""
    hint: dict[str, Any] = {}
    for name, expected in undeclared.items():
        dims, sample = expected.dims, tuple(got[name].shape)
        if not dims:
            hint[name] = {"value": _VALUE}
            continue
        if len(sample) != len(dims) - 1:
            continue
        fits = [k for k in range(len(dims)) if dims[k] is None
                and all(w is None or w == h for w, h in zip(dims[:k] + dims[k + 1 :], sample))]
        if len(fits) == 1 and fits[0] != 0:
            hint[name] = {"batch_axis": fits[0]}
    return hint


def _constant_feed(spec: Any, expected: ModelInput, stacked: bool) -> tuple[str, Any, int | None]:
    """(name, array, repeat axis or None) of a constant input: fed as is when it has the model's rank."""
    value = spec.constant()
    if spec.dtype is None:
        value = value.astype(expected.dtype)
    rank = len(expected.dims)
    if value.ndim == rank:
        return spec.name, value, None
    axis = spec.batch_axis if spec.batch_axis is not None else 0
    if value.ndim == rank - 1 and stacked:
        return spec.name, value, axis
    raise DataError(
        f"input {spec.name!r}: the constant has shape {list(value.shape)}, the model expects {expected.describe()}; "
        "give the whole input's shape, or the per-sample shape with its batch_axis"
    )


def _input_mode(name: str, expected: ModelInput, info: Any, axis: int = 0) -> tuple[bool, int | None]:
    """(stacked, batch dim) of one input, or DataError saying how the batch column differs."""
    if np.dtype(info.dtype) != np.dtype(expected.dtype):
        raise DataError(
            f"input {name!r}: the model expects {expected.dtype}, the batch holds {info.dtype}; "
            f"convert the data to {expected.dtype} when preprocessing (or declare its dtype with --inputs)"
        )
    sample = info.shape
    dims = expected.dims
    if len(sample) == len(dims) - 1:
        stacked, model_dims, lead = True, dims[:axis] + dims[axis + 1 :], dims[axis]
    elif len(sample) == len(dims):
        stacked, model_dims, lead = False, dims, None
    else:
        raise DataError(
            f"input {name!r}: the model expects {expected.describe()} (a batch axis then "
            f"{len(dims) - 1} dims), the batch's samples have shape {list(sample)}"
        )
    for position, (want, have) in enumerate(zip(model_dims, sample)):
        if want is not None and want != have:
            model_axis = position + (1 if stacked and position >= axis else 0)
            raise DataError(
                f"input {name!r}: the model expects {expected.describe()}, the batch's samples have shape "
                f"{list(sample)} (dimension {model_axis} is {have}, expected {want})"
            )
    return stacked, lead


def row_range(batch: CalibrationBatch, start: int, stop: int | None) -> tuple[int, int]:
    """[start, stop) checked against the batch (stop None: to the end)."""
    stop = batch.num_rows if stop is None else stop
    if not (0 <= start <= stop <= batch.num_rows):
        raise ConfigError(f"row range [{start}, {stop}) is outside the batch's {batch.num_rows} rows")
    return start, stop


def feed_micro_batches(
    batch: CalibrationBatch, layout: BatchLayout, start: int, stop: int, micro_batch: int
) -> Iterator[tuple[dict[str, npt.NDArray[Any]], int]]:
    """(feed, rows) per micro-batch of rows [start, stop): stacked rows, or one unstacked sample."""
    if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch < 1:
        raise ConfigError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
    size = layout.micro_batch(micro_batch)
    if layout.fixed_batch is not None and layout.fixed_batch > 1 and (stop - start) % layout.fixed_batch:
        raise DataError(
            f"the model's batch size is fixed at {layout.fixed_batch} but rows [{start}, {stop}) hold "
            f"{stop - start} samples; give a multiple of {layout.fixed_batch} (padding would change the statistics)"
        )
    for chunk in batch.iter_micro_batches(size, start=start, stop=stop):
        rows = next(iter(chunk.values())).shape[0]
        yield layout.feed(chunk, rows), rows


def drop_padding(value: Any, keep: Any, rule: tuple[bool, tuple[int, ...]]) -> Any:
    """The values of a tensor at real token positions, flattened to [kept positions, rest].

    `keep` [N, S] is mask != 0. A batched tensor (axis 0 the batch, sequence `axes` >= 1) keeps a
    position when it is real on every sequence axis (attention scores [N, H, S, S]: a real query
    and a real key). An unbatched one (a position table [S, D] or [1, S, D]) keeps the positions
    that are real in some row of the micro-batch. numpy or torch values alike."""
    batched, axes = rule
    seq = keep.shape[1]
    if any(value.shape[a] != seq for a in axes) or (batched and value.shape[0] != keep.shape[0]):
        return value  # a shape the rule does not cover (data-dependent): left as is
    first = 1 if batched else 0
    targets = tuple(range(first, first + len(axes)))
    moved = value.movedim(axes, targets) if hasattr(value, "movedim") else np.moveaxis(value, axes, targets)
    if not batched:
        return moved[keep.any(0)]
    both = keep
    for _ in axes[1:]:
        both = both[..., None] & keep.reshape(keep.shape[0], *([1] * (both.ndim - 1)), seq)
    return moved[both]


# ---------------------------------------------------------------------------------------------
# Collectors: where the values of one pass are reduced


class Collector(Protocol):
    """Takes each tensor value of a pass; `result()` is the pass's answer per tensor."""

    def update(self, name: str, value: Any) -> None: ...

    def result(self) -> dict[str, Any]: ...


class HostStatsCollector:
    """Pass 1 on the host: exact stats per micro-batch, merged (numpy, `trtcal.core`)."""

    def __init__(self, names: tuple[str, ...], nonfinite: NonFinitePolicy) -> None:
        self._stats = {n: TensorStats() for n in names}
        self._nonfinite = nonfinite

    def update(self, name: str, value: npt.NDArray[Any]) -> None:
        batch_stats = reduce_stats(value, tensor=name, nonfinite=self._nonfinite)
        self._stats[name] = merge_stats([self._stats[name], batch_stats])

    def result(self) -> dict[str, TensorStats]:
        return self._stats


class HostCountsCollector:
    """Pass 2 on the host: integer |x| counts on [0, hist_amax[t]], added per micro-batch."""

    def __init__(self, hist_amax: Mapping[str, float], num_bins: int, nonfinite: NonFinitePolicy) -> None:
        self._amax = {n: float(a) for n, a in hist_amax.items()}
        self._counts = {n: np.zeros(num_bins, dtype=np.int64) for n in self._amax}
        self._num_bins = num_bins
        self._nonfinite = nonfinite

    def update(self, name: str, value: npt.NDArray[Any]) -> None:
        self._counts[name] += fill_counts(value, self._num_bins, self._amax[name], tensor=name, nonfinite=self._nonfinite)

    def result(self) -> dict[str, npt.NDArray[np.int64]]:
        return self._counts


# ---------------------------------------------------------------------------------------------
# The runner protocol and the loop


class Runner(Protocol):
    """What callers of a runner use (the pipeline, data-parallel workers, the Ray actor)."""

    kind: str
    tensor_names: tuple[str, ...]

    @property
    def info(self) -> dict[str, Any]: ...

    def layout(self, batch: CalibrationBatch) -> BatchLayout: ...

    def collect_stats(
        self,
        batch: CalibrationBatch,
        *,
        start: int = 0,
        stop: int | None = None,
        micro_batch: int = 32,
        nonfinite: NonFinitePolicy = "error",
        progress: ProgressCallback = NO_PROGRESS,
        stage: str = "statistics",
    ) -> dict[str, TensorStats]: ...

    def collect_counts(
        self,
        batch: CalibrationBatch,
        hist_amax: Mapping[str, float],
        *,
        num_bins: int = DEFAULT_NUM_BINS,
        start: int = 0,
        stop: int | None = None,
        micro_batch: int = 32,
        nonfinite: NonFinitePolicy = "error",
        progress: ProgressCallback = NO_PROGRESS,
        stage: str = "histograms",
    ) -> dict[str, npt.NDArray[np.int64]]: ...


class BaseRunner:
    """collect_stats / collect_counts over a row range; subclasses implement `infer_impl`."""

    kind = "base"
    # MiB of selected tensor values one run may hold when the config leaves it open (CPU memory).
    default_activation_budget_mib = 256
    model: LoadedModel
    inputs: dict[str, ModelInput]
    tensor_names: tuple[str, ...]

    # -- hooks
    def infer_impl(self, feed: Feed) -> Iterator[tuple[str, Any]]:
        """Run one micro-batch; yield (name, value) for each of `tensor_names`, in that order."""
        raise NotImplementedError

    def _stats_collector(self, nonfinite: NonFinitePolicy) -> Collector:
        return HostStatsCollector(self.tensor_names, nonfinite)

    def _counts_collector(self, hist_amax: Mapping[str, float], num_bins: int, nonfinite: NonFinitePolicy) -> Collector:
        return HostCountsCollector({n: hist_amax[n] for n in self.tensor_names}, num_bins, nonfinite)

    def _pass_context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def _uploader(self) -> Callable[[dict[str, npt.NDArray[Any]]], Feed]:
        """Turns each host micro-batch into what `infer_impl` takes (one uploader per pass)."""
        return lambda feed: feed

    # -- the loop
    @property
    def info(self) -> dict[str, Any]:
        raise NotImplementedError

    def layout(self, batch: CalibrationBatch) -> BatchLayout:
        """Validate `batch` against the model's inputs (DataError naming the input if it does not fit)."""
        return batch_layout(self.inputs, batch, self.model.source)

    def _collect(
        self, batch: CalibrationBatch, collector: Collector, start: int, stop: int | None,
        micro_batch: int, progress: ProgressCallback, stage: str,
    ) -> dict[str, Any]:  # fmt: skip
        layout = self.layout(batch)
        start, stop = row_range(batch, start, stop)
        progress.start(stage, stop - start, "sample")
        # A started stage is always finished, also when a pass fails (NonFiniteError, a bad feed):
        # the ONNX Runtime runner did so, the device runners left the stage open on errors.
        masked, axes = self._mask_rules(layout.mask_input)
        try:
            with self._pass_context():
                upload = self._uploader()
                for feed, rows in feed_micro_batches(batch, layout, start, stop, micro_batch):
                    fed = upload(feed)
                    keep = None if layout.mask_input is None else fed[layout.mask_input] != 0
                    for name, value in self.infer_impl(fed):
                        if keep is not None and name in axes:
                            value = drop_padding(value, keep, axes[name])
                        if name in masked:
                            value = value[value > MASK_FILL_LIMIT]  # the mask's fill is not data
                        collector.update(name, value)
                    progress.advance(stage, rows)
                return collector.result()
        finally:
            progress.finish(stage)

    def activation_bytes_per_sample(self, batch: CalibrationBatch) -> int:
        """Bytes of the selected tensors' values for one sample: a one-row probe run, cached per input
        shape. What one run holds grows with this times its samples (the values are outputs)."""
        layout = self.layout(batch)
        cache = self.__dict__.setdefault("_probe_cache", {})
        key = tuple(sorted((n, tuple(i.shape), str(i.dtype)) for n, i in batch.inputs.items()))
        if key not in cache:
            with self._pass_context():
                feed = self._uploader()(layout.feed(batch.rows(0, 1), 1))
                cache[key] = sum(int(getattr(value, "nbytes", 0)) for _, value in self.infer_impl(feed))
            release = getattr(self, "release_buffers", None)
            if release is not None:
                release()  # the next run holds several samples: no one-row buffers to keep
        return int(cache[key])

    def budgeted_micro_batch(self, batch: CalibrationBatch, requested: int, budget_bytes: int) -> int:
        """The samples per run: `requested` (or the model's fixed batch), fewer when the selected tensors
        of that many samples would exceed `budget_bytes` (at least 1; 0 means no budget). Results do
        not depend on it: statistics and counts merge exactly over micro-batches."""
        layout = self.layout(batch)
        size = layout.micro_batch(requested)
        if budget_bytes <= 0 or size <= 1 or layout.fixed_batch is not None or batch.num_rows <= 1:
            return size
        per_sample = self.activation_bytes_per_sample(batch)
        fit = max(1, budget_bytes // max(per_sample, 1))
        if fit < size:
            logger.info(
                "%d selected tensors take %.1f MiB per sample: %d samples per run instead of %d keep them under %.0f MiB",
                len(self.tensor_names), per_sample / 2**20, fit, size, budget_bytes / 2**20,
            )
        return min(size, fit)

    def _mask_rules(self, mask_input: str | None) -> tuple[frozenset[str], dict[str, tuple[bool, tuple[int, ...]]]]:
        """(masked activations, token axes per tensor when a mask input is declared), cached."""
        from trtcal.model import mask_tensors, token_axes

        cache = self.__dict__.setdefault("_mask_cache", {})
        if mask_input not in cache:
            _, masked = mask_tensors(self.model.proto, mask_input)
            axes = token_axes(self.model.proto, mask_input) if mask_input is not None else {}
            selected = set(self.tensor_names)
            cache[mask_input] = (frozenset(masked & selected), {n: a for n, a in axes.items() if n in selected})
            if axes:
                logger.info("statistics leave out padded positions of %d tensors (mask input %r)", len(cache[mask_input][1]), mask_input)
        return cache[mask_input]  # type: ignore[no-any-return]

    def collect_stats(
        self,
        batch: CalibrationBatch,
        *,
        start: int = 0,
        stop: int | None = None,
        micro_batch: int = 32,
        nonfinite: NonFinitePolicy = "error",
        progress: ProgressCallback = NO_PROGRESS,
        stage: str = "statistics",
    ) -> dict[str, TensorStats]:
        """Pass 1 over rows [start, stop): exact per-tensor stats (merge shards with `merge_stats`)."""
        collector = self._stats_collector(nonfinite)
        return self._collect(batch, collector, start, stop, micro_batch, progress, stage)

    def collect_counts(
        self,
        batch: CalibrationBatch,
        hist_amax: Mapping[str, float],
        *,
        num_bins: int = DEFAULT_NUM_BINS,
        start: int = 0,
        stop: int | None = None,
        micro_batch: int = 32,
        nonfinite: NonFinitePolicy = "error",
        progress: ProgressCallback = NO_PROGRESS,
        stage: str = "histograms",
    ) -> dict[str, npt.NDArray[np.int64]]:
        """Pass 2 over rows [start, stop): int64 |x| counts on [0, hist_amax[t]] (shards merge by adding)."""
        missing = [n for n in self.tensor_names if n not in hist_amax]
        if missing:
            raise ConfigError(f"hist_amax lacks tensors {missing[:5]}; run collect_stats over the whole batch first")
        collector = self._counts_collector(hist_amax, num_bins, nonfinite)
        return self._collect(batch, collector, start, stop, micro_batch, progress, stage)


# ---------------------------------------------------------------------------------------------
# The one factory
