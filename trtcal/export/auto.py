"""`auto`: choose each Q/DQ tensor's range among the candidates by its measured effect (ONNX Runtime side).

Every measurement is exact simulation: ONNX Runtime with GraphOptimizationLevel.ORT_DISABLE_ALL,
each QuantizeLinear/DequantizeLinear executed as written. The activation scales are *graph
inputs* of two sessions built once, so trying another scale never rebuilds a session:

1. **Local (every quantized activation).** One "side-branch" model: the FP32 graph plus, for each
   (tensor, consuming layer), a copy of the layer that reads Q/DQ(tensor) (its weights quantized
   as the export does, its other inputs float) and a ReduceSumSquare of its output's difference to
   the FP32 layer output. One run per candidate over the search slice gives every tensor's
   consumer-output noise for that candidate (the copies are independent: they read float inputs).
   Each tensor takes its least-noise candidate (layer-wise output matching).
2. **Global start.** The exact Q/DQ model (scale inputs) on the search slice for the local
   assignment and for each single method; the best of them starts the descent, so `auto` is never
   worse than the best single method on the search slice (the start and each start's SQNR are
   recorded).
3. **Coordinate descent.** Tensors in order of their local noise (most harmful first); for each,
   the candidates whose local noise is within `local_margin` of its best are tried on the whole
   model; a change is kept when it lowers the model's output noise on the search slice by more
   than `min_relative_gain`. At most `max_global_evals` whole-model runs.
4. **Guards against fitting the slice.** Cross-fit: steps 1-3 are also run on each half of the
   search slice (alternate rows in sample-id hash order) and the procedures (best single method,
   best start, start + descent) judged on the other half; the one with the least mean held-out
   noise is written. Then the descent's result is written only when it beats its start on the
   whole slice by at least `min_descent_gain_db` (else the start). Per-change acceptance rules
   (each half must improve, paired tests, sign tests) were measured and rejected: docs/algorithms.md.
5. **Verdict** (`verdict`): every method's and auto's Q/DQ model on the *verdict* slice, which the
   search never saw: per output SQNR, cosine, max |error| and argmax agreement along a class axis.

Bound: one FP32 run over each slice + `len(candidates)` side-branch runs (about 2.5 forwards each)
+ (1 + len(candidates) + max_global_evals) Q/DQ runs over the search slice + 2 × (max_global_evals
+ 1) over half of it (the cross-fit) + one Q/DQ run per verdict row label over the verdict slice.

Deterministic: the slices are chosen by sample id (`trtcal.core.auto_search.search_slices`), the
measurements are float64 sums in a fixed order over fixed micro-batches, every decision is a strict
comparison in a fixed order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from trtcal.core.auto_search import (
    AUTO_RULE_VERSION,
    PROCEDURES,
    DescentStep,
    coordinate_descent,
    cross_fit_choice,
    cross_fit_folds,
    descent_plan,
    descent_trusted,
    distinct_candidates,
    local_choice,
    noise_ratio,
    noise_to_db,
    rows_noise,
)
from trtcal.core.output_metrics import OutputMetrics, compare_output
from trtcal.errors import ConfigError, ModelError
from trtcal.export.auto_graphs import scale_input_model, side_branch_model
from trtcal.export.evaluate import output_activations, simulation_session
from trtcal.export.qdq import (
    ModelLike,
    QdqConfig,
    _upgrade_opset,
    activation_scales,
    load_model,
    plan_qdq,
)
from trtcal.progress import NO_PROGRESS, ProgressCallback

if TYPE_CHECKING:
    import onnx
    import onnxruntime

__all__ = ["AUTO_RULE_VERSION", "AutoConfig", "AutoResult", "AutoSimulator", "search_auto", "verdict", "scale_input_model"]

log = logging.getLogger(__name__)

Feed = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True, kw_only=True)
class AutoConfig:
    """Attributes:
    slice_size: samples of the calibration batch held out (by sample id) for auto: the first half
        (rounded up) is searched on, the rest is the verdict slice.
    max_global_evals: whole-model runs the coordinate descent may make.
    max_alternatives: candidates tried per tensor in the descent (the locally best others first).
    local_margin: a candidate is tried on the whole model when its consumer-output noise is at most
        this factor times the tensor's best.
    min_relative_gain: a descent step must lower the search slice's output noise by more than this fraction.
    min_descent_gain_db: the descent's result is written only when it beats its start on the search
        slice by at least this many dB (smaller gains did not carry to other data: docs/algorithms.md).
    micro_batch: samples per ONNX Runtime run.
    intra_op_threads: ONNX Runtime intra-op threads (0: its choice).
    """

    slice_size: int = 64
    max_global_evals: int = 24
    max_alternatives: int = 2
    local_margin: float = 2.0
    min_relative_gain: float = 0.005
    min_descent_gain_db: float = 1.0
    micro_batch: int = 8
    intra_op_threads: int = 0

    def __post_init__(self) -> None:
        for name, low in (("slice_size", 2), ("max_global_evals", 0), ("max_alternatives", 1), ("micro_batch", 1), ("intra_op_threads", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"auto {name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.local_margin, (int, float)) and self.local_margin >= 1.0):
            raise ConfigError(f"auto local_margin must be >= 1, got {self.local_margin!r}")
        if isinstance(self.min_descent_gain_db, bool) or not (isinstance(self.min_descent_gain_db, (int, float)) and 0.0 <= self.min_descent_gain_db < math.inf):
            raise ConfigError(f"auto min_descent_gain_db must be a finite number >= 0, got {self.min_descent_gain_db!r}")
        if not (isinstance(self.min_relative_gain, (int, float)) and 0.0 <= self.min_relative_gain < 1.0):
            raise ConfigError(f"auto min_relative_gain must be in [0, 1), got {self.min_relative_gain!r}")


@dataclass(frozen=True)
class AutoResult:
    """What the search chose and why.

    amax: tensor -> chosen amax (every calibrated tensor, in the given order).
    chosen: tensor -> candidate name.
    tensors: tensor -> {"searched", "chosen", "local_noise_db": {candidate: dB}} (searched ones)
        or {"searched": False, "chosen"} (tensors without Q/DQ in the export take the start method).
    search: the global part: slices' sample ids, start, objective per start, steps, final noise.
    """

    amax: dict[str, float]
    chosen: dict[str, str]
    tensors: dict[str, dict[str, Any]]
    search: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _db(ratio: float) -> float:
    return _finite(noise_to_db(ratio))


# ---------------------------------------------------------------------------------------------
# Running


def _rows(inputs: Mapping[str, npt.NDArray[Any]], start: int, stop: int) -> Feed:
    return {k: np.ascontiguousarray(v[start:stop]) for k, v in inputs.items()}


def _num_rows(inputs: Mapping[str, npt.NDArray[Any]]) -> int:
    return int(next(iter(inputs.values())).shape[0])


class FeedLayout(Protocol):
    """What the simulator needs of `trtcal.runners.base.BatchLayout`."""

    batch_axes: tuple[tuple[str, int], ...]

    def feed(self, chunk: dict[str, npt.NDArray[Any]], rows: int) -> Mapping[str, npt.NDArray[Any]]: ...


def output_batch_axes(model: onnx.ModelProto, input_axes: Mapping[str, int]) -> dict[str, int]:
    """Output name -> its batch axis: where it has the symbolic dim that the fed inputs have on their
    batch axis (axis 0 unless declared); 0 when the shapes do not say."""
    names = set()
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        axis = input_axes.get(vi.name, 0)
        if axis < len(dims) and dims[axis].dim_param:
            names.add(dims[axis].dim_param)
    axes = {}
    for vi in model.graph.output:
        params = [d.dim_param for d in vi.type.tensor_type.shape.dim]
        axes[vi.name] = next((k for k, p in enumerate(params) if p and p in names), 0)
    return axes


def _scale_feed(scale_names: Mapping[str, str], amax: Mapping[str, float]) -> Feed:
    scales = activation_scales({t: amax[t] for t in scale_names})
    return {scale_names[t]: np.array(scales[t], dtype=np.float32) for t in scale_names}


_SUM_CHUNK = 1 << 20  # values per list handed to math.fsum


def _squares(ref: npt.NDArray[Any], out: npt.NDArray[Any] | None = None) -> Iterator[float]:
    """r² (or (r − o)² with `out`) in float64, in C order, as Python floats for `math.fsum`, made 1 M
    values at a time: the same stream (so the same exactly rounded sum) without a list of every value
    (~32 bytes each: 2 GiB for the outputs of an OCR recogniser's search slice)."""
    r_flat = ref.reshape(-1)
    o_flat = None if out is None else out.reshape(-1)
    for start in range(0, r_flat.size, _SUM_CHUNK):
        r = r_flat[start : start + _SUM_CHUNK].astype(np.float64)
        if o_flat is None:
            yield from (r * r).tolist()
        else:
            yield from ((r - o_flat[start : start + _SUM_CHUNK].astype(np.float64)) ** 2).tolist()


class AutoSimulator:
    """The sessions of one search: FP32 reference, exact Q/DQ model with scale inputs, side branches."""

    def __init__(self, model: ModelLike, tensors: Sequence[str], qdq_config: QdqConfig | None = None, *,
                 micro_batch: int = 8, intra_op_threads: int = 0, feed: FeedLayout | None = None) -> None:
        """`feed` turns a micro-batch of batch rows into the model feed (declared batch axes moved,
        constants added: `trtcal.runners.base.BatchLayout.feed`); None feeds the rows as they are."""
        fp32, _ = _upgrade_opset(load_model(model))
        self._feed = feed
        self._output_axes = output_batch_axes(fp32, dict(feed.batch_axes) if feed is not None else {})
        placeholder = {t: 1.0 for t in tensors}
        self.plan = plan_qdq(fp32, activation_scales(placeholder), qdq_config or QdqConfig())
        self.searched = tuple(dict.fromkeys(q.tensor for q in self.plan.inputs if q.kind == "activation"))
        self.micro_batch = micro_batch
        self._threads = intra_op_threads
        self._fp32 = fp32
        self.fp32_session = self._session(fp32)
        self.output_names = [o.name for o in self.fp32_session.get_outputs() if o.type == "tensor(float)"]
        self.output_activations = {name: op for name, (op, _) in output_activations(fp32).items()}
        if not self.output_names:
            raise ModelError("auto needs at least one float32 model output to compare against")
        qdq, self.scale_names = scale_input_model(fp32, self.plan, activation_scales(placeholder))
        self.qdq_session = self._session(qdq)
        self._side: tuple[onnxruntime.InferenceSession, dict[str, str], dict[str, list[tuple[str, str]]]] | None = None

    def _session(self, model: onnx.ModelProto) -> onnxruntime.InferenceSession:
        return simulation_session(model, intra_op_threads=self._threads, low_memory=True)

    def outputs(self, session: onnxruntime.InferenceSession, inputs: Mapping[str, npt.NDArray[Any]],
                extra: Feed | None = None, names: Sequence[str] | None = None) -> list[npt.NDArray[Any]]:
        """The named outputs over all rows, in micro-batches, concatenated."""
        wanted = list(names or self.output_names)
        n = _num_rows(inputs)
        parts: list[list[npt.NDArray[Any]]] = [[] for _ in wanted]
        for start in range(0, n, self.micro_batch):
            result = session.run(wanted, {**self._rows(inputs, start), **(extra or {})})
            for k, value in enumerate(result):
                parts[k].append(np.asarray(value))
        # Batch-first whatever the model's layout (a recurrent state output [2, batch, 128]).
        axes = [self._output_axes.get(name, 0) for name in wanted]
        return [np.moveaxis(np.concatenate(p, axis=a), a, 0) for p, a in zip(parts, axes)]

    def _rows(self, inputs: Mapping[str, npt.NDArray[Any]], start: int) -> Feed:
        rows = _rows(inputs, start, start + self.micro_batch)
        return rows if self._feed is None else dict(self._feed.feed(rows, _num_rows(rows)))

    def reference(self, inputs: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        return self.outputs(self.fp32_session, inputs)

    def quantized(self, inputs: Mapping[str, npt.NDArray[Any]], amax: Mapping[str, float]) -> list[npt.NDArray[Any]]:
        return self.outputs(self.qdq_session, inputs, _scale_feed(self.scale_names, amax))

    def row_energies(self, reference: Sequence[npt.NDArray[Any]], outputs: Sequence[npt.NDArray[Any]] | None = None) -> npt.NDArray[np.float64]:
        """[rows, float outputs]: per row Σ fp32² (or Σ (fp32 − q)² with `outputs`), each an exact float sum
        (so in no particular order, and the same whatever the micro-batching)."""
        n = int(reference[0].shape[0]) if reference else 0
        for name, ref in zip(self.output_names, reference):
            if ref.ndim == 0 or ref.shape[0] != n:  # an output whose batch axis was not inferred (e.g. made inside an If)
                raise ModelError(
                    f"auto: output {name!r} has shape {tuple(ref.shape)} where {n} rows were expected along its batch "
                    "axis, which shape inference could not find (outputs made inside If/Loop/Scan); calibrate with an "
                    "explicit method (-a mse, -a entropy2, ...) instead of auto"
                )
        out = np.zeros((n, len(reference)), dtype=np.float64)
        for k, ref in enumerate(reference):
            for i in range(n):
                out[i, k] = math.fsum(_squares(ref[i]) if outputs is None else _squares(ref[i], outputs[k][i]))
        return out

    def output_errors(self, inputs: Mapping[str, npt.NDArray[Any]], reference: Sequence[npt.NDArray[Any]],
                      amax: Mapping[str, float]) -> npt.NDArray[np.float64]:
        """[rows, float outputs]: per row Σ (fp32 − q)² of the Q/DQ model with these ranges."""
        return self.row_energies(reference, self.quantized(inputs, amax))

    def local_rows(self, inputs: Mapping[str, npt.NDArray[Any]], amax: Mapping[str, float]) -> dict[str, npt.NDArray[np.float64]]:
        """The side branches' per-row energies (error and signal outputs) with these ranges (see `local_noise`)."""
        if not self.searched:
            return {}  # no activation gets Q/DQ: nothing to choose
        if self._side is None:
            model, scale_inputs, energies = side_branch_model(self._fp32, self.plan, activation_scales({t: 1.0 for t in self.searched}))
            self._side = (self._session(model), scale_inputs, energies)
        session, scale_inputs, energies = self._side
        names = sorted({name for pairs in energies.values() for pair in pairs for name in pair})
        per_sample: dict[str, list[npt.NDArray[Any]]] = {name: [] for name in names}
        feed_scales = _scale_feed(scale_inputs, amax)
        for start in range(0, _num_rows(inputs), self.micro_batch):
            result = session.run(names, {**self._rows(inputs, start), **feed_scales})
            for name, value in zip(names, result):
                per_sample[name].append(np.asarray(value, dtype=np.float64).reshape(-1))
        return {name: np.concatenate(parts) for name, parts in per_sample.items()}

    def local_noise_of(self, rows_energy: Mapping[str, npt.NDArray[np.float64]], rows: Sequence[int] | None = None) -> dict[str, float]:
        """tensor -> Σ over its consumers of output error energy / Σ of their FP32 output energy, on `rows`
        (None: every row) of `local_rows`' result."""
        if not self.searched:
            return {}
        assert self._side is not None
        energies = self._side[2]
        index = slice(None) if rows is None else np.asarray(rows, dtype=np.intp)
        totals = {name: math.fsum(values[index].tolist()) for name, values in rows_energy.items()}
        out = {}
        for t, pairs in energies.items():
            signals = dict.fromkeys(s for _, s in pairs)  # a consumer reading t twice counts its output once
            out[t] = noise_ratio(sum(totals[s] for s in signals), sum(totals[e] for e, _ in pairs))
        return out

    def local_noise(self, inputs: Mapping[str, npt.NDArray[Any]], amax: Mapping[str, float]) -> dict[str, float]:
        """tensor -> Σ over its consumers of output error energy / Σ of their FP32 output energy."""
        return self.local_noise_of(self.local_rows(inputs, amax))


# ---------------------------------------------------------------------------------------------
# The search


class _Runs:
    """Whole-model runs on the search slice or a part of it, memoized by (assignment, rows): the per-row
    error energies. A run over every row also serves any part of it."""

    def __init__(self, sim: AutoSimulator, inputs: Mapping[str, npt.NDArray[Any]], reference: Sequence[npt.NDArray[Any]],
                 candidates: Mapping[str, Mapping[str, float]]) -> None:
        self.sim, self.inputs, self.reference, self.candidates = sim, inputs, reference, candidates
        self.num_rows = _num_rows(inputs)
        self._memo: dict[tuple[tuple[str, ...], tuple[int, ...] | None], npt.NDArray[np.float64]] = {}
        self.count = 0

    def errors(self, assignment: Mapping[str, str], rows: Sequence[int] | None = None) -> npt.NDArray[np.float64]:
        key = tuple(assignment[t] for t in self.sim.searched)
        whole = self._memo.get((key, None))
        if whole is not None:
            return whole if rows is None else whole[np.asarray(rows, dtype=np.intp)]
        part = None if rows is None or len(rows) == self.num_rows and list(rows) == list(range(self.num_rows)) else tuple(rows)
        if (key, part) not in self._memo:
            amax = {t: self.candidates[assignment[t]][t] for t in self.sim.searched}
            if part is None:
                inputs, reference = self.inputs, self.reference
            else:
                index = np.asarray(part, dtype=np.intp)
                inputs = {k: np.ascontiguousarray(v[index]) for k, v in self.inputs.items()}
                reference = [r[index] for r in self.reference]
            self.count += 1
            self._memo[(key, part)] = self.sim.output_errors(inputs, reference, amax)
        return self._memo[(key, part)]


@dataclass(frozen=True)
class _Fit:
    """The search fitted on some rows of the slice: the procedures' assignments and how they were found."""

    local: dict[str, dict[str, float]]
    distinct: dict[str, list[str]]
    starts: dict[str, dict[str, str]]
    start_noise: dict[str, float]
    start: str
    best_single: str
    final: dict[str, str]
    final_noise: float
    steps: list[DescentStep]

    def procedure(self, name: str) -> dict[str, str]:
        return {"single": self.starts[self.best_single], "start": self.starts[self.start], "auto": self.final}[name]


def _fit(sim: AutoSimulator, runs: _Runs, local_rows: Mapping[str, Mapping[str, npt.NDArray[np.float64]]],
         signal: npt.NDArray[np.float64], rows: Sequence[int] | None, config: AutoConfig) -> _Fit:
    """Local phase, starts and coordinate descent on `rows` of the search slice (None: every row)."""
    names, searched = list(runs.candidates), list(sim.searched)
    local: dict[str, dict[str, float]] = {t: {} for t in searched}
    for c in names:
        for t, value in sim.local_noise_of(local_rows[c], rows).items():
            local[t][c] = value
    distinct = {t: distinct_candidates({c: runs.candidates[c][t] for c in names}) for t in searched}
    starts: dict[str, dict[str, str]] = {"local": {t: local_choice({c: local[t][c] for c in distinct[t]}) for t in searched}}
    starts.update({c: {t: c for t in searched} for c in names})
    sig = signal if rows is None else signal[np.asarray(rows, dtype=np.intp)]

    def noise_of(assignment: Mapping[str, str]) -> float:
        return rows_noise(runs.errors(assignment, rows), sig)

    start_noise = {label: noise_of(a) for label, a in starts.items()}
    best_single = min(names, key=lambda c: (start_noise[c], names.index(c)))
    start = min(start_noise, key=lambda label: (start_noise[label], list(starts).index(label)))
    order, alternatives = descent_plan(
        local, distinct, starts[start], local_margin=config.local_margin, max_alternatives=config.max_alternatives
    )
    final, final_noise, steps = coordinate_descent(
        starts[start], order, alternatives, noise_of, start_noise=start_noise[start],
        max_evals=config.max_global_evals, min_relative_gain=config.min_relative_gain,
    )
    return _Fit(local, distinct, starts, start_noise, start, best_single, final, final_noise, steps)


def _cross_fit(sim: AutoSimulator, runs: _Runs, local_rows: Mapping[str, Mapping[str, npt.NDArray[np.float64]]],
               signal: npt.NDArray[np.float64], config: AutoConfig, search_ids: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """(procedure to run on the whole slice, record): each procedure fitted on one half, judged on the other."""
    folds = cross_fit_folds(runs.num_rows)
    if not folds:
        return "auto", {"folds": [], "choice": "auto", "note": "fewer than 4 search rows: no cross-fit"}
    held_out: dict[str, list[float]] = {p: [] for p in PROCEDURES}
    records = []
    for fit_rows, test_rows in folds:
        fit = _fit(sim, runs, local_rows, signal, fit_rows, config)
        test_signal = signal[np.asarray(test_rows, dtype=np.intp)]
        for p in PROCEDURES:
            held_out[p].append(rows_noise(runs.errors(fit.procedure(p), test_rows), test_signal))
        records.append({
            "fit_ids": [search_ids[i] for i in fit_rows] if search_ids else list(fit_rows),
            "start": fit.start, "best_single": fit.best_single, "changed_by_descent": sum(fit.final[t] != fit.starts[fit.start][t] for t in fit.final),
            "held_out_sqnr_db": {p: _db(held_out[p][-1]) for p in PROCEDURES},
        })
    choice = cross_fit_choice(held_out)
    mean_db = {p: _db(math.fsum(v) / len(v)) for p, v in held_out.items()}
    return choice, {"folds": records, "mean_held_out_sqnr_db": mean_db, "choice": choice}


def _search_record(search_ids: Sequence[str], full: _Fit, choice: str, cross_fit: Mapping[str, Any], final_noise: float,
                   global_evals: int) -> dict[str, Any]:
    """The global part of the search as ranges.json records it."""
    chosen = full.procedure(choice)
    return {
        "objective": "mean over float outputs of sum((fp32 - qdq)^2) / sum(fp32^2) on the search slice",
        "acceptance": "the start is the least-noise of the starts on the slice; a descent step must lower the objective "
                      "by more than min_relative_gain; then cross-fit: each procedure (single: best single method, start: "
                      "best start, auto: start + descent) is fitted on one half of the slice (alternate rows in sample-id "
                      "hash order) and judged on the other; the one with the least mean held-out noise (ties: the simpler) "
                      "is the one whose whole-slice result is written; auto (the descent) only when it beats its start "
                      "on the whole slice by at least min_descent_gain_db, else the start",
        "rule_version": AUTO_RULE_VERSION,
        "search_ids": list(search_ids),
        "starts_sqnr_db": {label: _db(v) for label, v in full.start_noise.items()},
        "start": full.start,
        "fallback": full.start if full.start != "local" else None,
        "best_single": full.best_single,
        "descent_sqnr_db": _db(full.final_noise),
        "cross_fit": dict(cross_fit),
        "procedure": choice,
        "final_sqnr_db": _db(final_noise),
        "global_evals": global_evals,
        "steps": [{"tensor": s.tensor, "candidate": s.candidate, "sqnr_db": _db(s.noise), "accepted": s.accepted} for s in full.steps],
        "changed_by_descent": sorted(t for t in full.final if full.final[t] != full.starts[full.start][t]),
        "written_differs_from_start": sorted(t for t in chosen if chosen[t] != full.starts[full.start][t]),
    }


def search_auto(
    model: ModelLike,
    candidates: Mapping[str, Mapping[str, float]],
    search_inputs: Mapping[str, npt.NDArray[Any]],
    *,
    config: AutoConfig | None = None,
    qdq_config: QdqConfig | None = None,
    simulator: AutoSimulator | None = None,
    search_ids: Sequence[str] = (),
    progress: ProgressCallback = NO_PROGRESS,
) -> AutoResult:
    """Choose each tensor's candidate (see the module docstring).

    Args:
        model: the FP32 ONNX model.
        candidates: candidate name -> tensor -> amax (every candidate covers the same tensors, in order).
        search_inputs: input name -> the search slice's rows.
        search_ids: the slice's sample ids (recorded only).
    """
    config = config or AutoConfig()
    if not candidates:
        raise ConfigError("auto needs at least one candidate")
    names = list(candidates)
    tensors = list(next(iter(candidates.values())))
    for c in names:
        if list(candidates[c]) != tensors:
            raise ConfigError(f"candidate {c!r} covers other tensors than {names[0]!r}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sim = simulator or AutoSimulator(model, tensors, qdq_config, micro_batch=config.micro_batch, intra_op_threads=config.intra_op_threads)
    if not sim.searched:  # no activation gets Q/DQ: every candidate gives the same model (ties go to the first)
        log.info("auto: no activation gets Q/DQ in this model; nothing to search")
        return AutoResult(
            amax={t: candidates[names[0]][t] for t in tensors}, chosen={t: names[0] for t in tensors},
            tensors={t: {"searched": False, "chosen": names[0]} for t in tensors},
            search={"note": "no activation gets Q/DQ: nothing to search", "search_ids": list(search_ids)}, timings=timings,
        )
    reference = sim.reference(search_inputs)
    signal = sim.row_energies(reference)
    timings["sessions+reference"] = time.perf_counter() - t0

    progress.start("auto", None)
    t0 = time.perf_counter()
    local_rows = {c: sim.local_rows(search_inputs, candidates[c]) for c in names}
    timings["local"] = time.perf_counter() - t0
    runs = _Runs(sim, search_inputs, reference, candidates)
    t0 = time.perf_counter()
    full = _fit(sim, runs, local_rows, signal, None, config)
    timings["search"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    choice, cross_fit = _cross_fit(sim, runs, local_rows, signal, config, search_ids)
    timings["cross_fit"] = time.perf_counter() - t0
    progress.finish("auto")

    trusted = descent_trusted(full.start_noise[full.start], full.final_noise, config.min_descent_gain_db)
    if choice == "auto" and not trusted:
        choice = "start"  # the descent's gain on the slice is too small to carry to other data
    final = full.procedure(choice)
    final_noise = rows_noise(runs.errors(final), signal)
    chosen = {t: final.get(t, full.best_single) for t in tensors}
    info = {
        t: {
            "searched": True, "chosen": chosen[t], "local_choice": full.starts["local"][t],
            "local_noise_db": {c: _db(full.local[t][c]) for c in names}, "distinct": full.distinct[t],
        } if t in final else {"searched": False, "chosen": chosen[t]}
        for t in tensors
    }
    search = _search_record(search_ids, full, choice, cross_fit, final_noise, runs.count)
    search["descent_gain_db"] = round(_db(full.final_noise) - _db(full.start_noise[full.start]), 6)
    search["descent_trusted"] = trusted
    log.info("auto: search-slice SQNR %.2f dB (%s, cross-fit), start %r, best single method %s: %.2f dB, %d whole-model runs",
             noise_to_db(final_noise), choice, full.start, full.best_single, noise_to_db(full.start_noise[full.best_single]), runs.count)
    return AutoResult(
        amax={t: candidates[chosen[t]][t] for t in tensors}, chosen=chosen, tensors=info, search=search, timings=timings,
    )


def verdict(
    simulator: AutoSimulator,
    tables: Mapping[str, Mapping[str, float]],
    verdict_inputs: Mapping[str, npt.NDArray[Any]],
    *,
    default: str,
    verdict_ids: Sequence[str] = (),
    warn_below_best_db: float = 1.0,
) -> dict[str, Any]:
    """Each label's Q/DQ model on the held-out verdict slice: per output SQNR/cosine/max error/agreement.

    Ranking uses the mean SQNR over the float outputs; `default` is the label written as
    calibration.cache. A one-line warning is recorded when it is more than `warn_below_best_db`
    below the best label.
    """
    if default not in tables:
        raise ConfigError(f"the default {default!r} is not among the evaluated labels {sorted(tables)}")
    reference = simulator.reference(verdict_inputs)
    rows: dict[str, Any] = {}
    activations = simulator.output_activations
    for label, amax in tables.items():
        outs = simulator.quantized(verdict_inputs, amax)
        metrics = [compare_output(r, o, activation=activations.get(name)) for name, r, o in zip(simulator.output_names, reference, outs)]
        per_output = {name: _json_quality(m) for name, m in zip(simulator.output_names, metrics)}
        sqnrs = [m.sqnr_db for m in metrics]
        rows[label] = {
            "outputs": per_output,
            "mean_sqnr_db": _finite(float(np.mean(sqnrs))),
            "min_sqnr_db": _finite(float(np.min(sqnrs))),
        }

    best = min(rows, key=lambda label: (-rows[label]["mean_sqnr_db"], list(tables).index(label)))
    gap = round(rows[best]["mean_sqnr_db"] - rows[default]["mean_sqnr_db"], 6)
    warning = None
    if gap > warn_below_best_db:
        warning = (
            f"the written default {default!r} is {gap:.2f} dB below the best method {best!r} on the held-out slice "
            f"({rows[default]['mean_sqnr_db']:.2f} vs {rows[best]['mean_sqnr_db']:.2f} dB output SQNR)"
        )
    return {
        "slice": "verdict rows of the calibration batch, chosen by sample id, never seen by the auto search",
        "verdict_ids": list(verdict_ids),
        "simulation": "onnxruntime CPU, GraphOptimizationLevel.ORT_DISABLE_ALL (Q/DQ executed as written)",
        "rows": rows,
        "best": best,
        "default": default,
        "default_below_best_db": gap,
        "warning": warning,
    }


_DB_CAP = 999.0  # JSON has no Infinity: an exact match is written as 999 dB (and -999 for a zero reference)


def _finite(value: float) -> float:
    return round(max(-_DB_CAP, min(_DB_CAP, value)), 6)


def _json_quality(m: OutputMetrics) -> dict[str, Any]:
    """The verdict's per-output record: trtcal.core.output_metrics' numbers (the ones `trtcal eval` reports)."""
    q = {"sqnr_db": m.sqnr_db, "cosine": m.cosine, "max_abs_error": m.max_abs_error, "argmax_agreement": m.top1_agreement}
    return {"kind": m.kind, **{k: (None if v is None else _finite(float(v))) for k, v in q.items()}}
