"""trtcal's settings: one frozen dataclass per concern; every default and every check written once.

    JobConfig                        `trtcal calibrate MODEL --data URL` (`trtcal.calibrate_dataset`)
      .batch        BatchConfig        dataset -> ONE calibration batch (`trtcal batch build`)
      .calibration  CalibrationConfig  batch -> statistics -> scales -> caches (`trtcal.calibrate`)
      .store        StoreSettings      where results are looked up and published
      .cluster      ClusterConfig      which Ray, which device the calibration actor takes

Each validates on construction and raises ConfigError naming the field. The CLI maps its options
onto these fields and sets no default of its own; enumerations are `Literal` types whose values
the CLI offers as `choices`.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from trtcal.core.cache_format import trt_version_int
from trtcal.core.histogram import DEFAULT_NUM_BINS
from trtcal.core.scales import METHODS, compute_amax
from trtcal.errors import ConfigError
from trtcal.workers.preprocess import DEFAULT_MAX_IMAGE_PIXELS, PreprocessSpec, parse_preprocess

__all__ = [
    "AUTO", "BatchConfig", "CalibrationConfig", "ClusterConfig", "JobConfig", "StoreSettings", "MAX_NUM_BINS",
    "Backend", "ActorDevice", "SmoothMode", "Nonfinite", "OnBadInput", "TensorSelection", "TENSORRT_ALGORITHMS",
    "choices", "default_store_url", "parse_num_samples", "check_seed", "InputSpec", "INPUT_DTYPES",
    "parse_input_specs", "input_specs_to_dict",
]

AUTO = "auto"  # the per-tensor method (trtcal.export.auto); not a histogram method of trtcal.core
MAX_NUM_BINS = 1 << 20  # far beyond any use; keeps a typo from allocating gigabytes per tensor
TensorSelection = Literal["all", "quantizable"]
Nonfinite = Literal["error", "ignore"]
OnBadInput = Literal["fail", "skip"]
ActorDevice = Literal["auto", "cpu", "gpu"]
Backend = Literal["onnxruntime", "tensorrt"]
SmoothMode = Literal["auto", "on", "off"]
TENSORRT_ALGORITHMS = ("entropy2", "minmax", "entropy", "legacy")  # TensorRT 10's own calibrators
INPUT_DTYPES = ("int64", "int32", "float32", "float16", "bool")


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a Literal type (what the CLI offers as `choices`)."""
    return tuple(get_args(literal))


def _check_choice(name: str, value: Any, literal: Any) -> None:
    if value not in choices(literal):
        raise ConfigError(f"{name} must be one of {list(choices(literal))}, got {value!r}")


def _check_int(name: str, value: Any, low: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def parse_num_samples(value: str | int | None) -> int | None:
    """'all' or None -> None; a positive integer (or its string) -> int. ConfigError otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"num_samples must be a positive integer or 'all', got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"num_samples must be a positive integer or 'all', got {value!r}") from None
    if isinstance(value, float) or number < 1:
        raise ConfigError(f"num_samples must be a positive integer or 'all', got {value!r}")
    return number


def check_seed(seed: Any) -> None:
    """Seeds are non-negative integers (numpy's PCG64 takes nothing else)."""
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


def default_store_url() -> str:
    """`$TRTCAL_CACHE_DIR/store`, else `~/.cache/trtcal/store`."""
    root = os.environ.get("TRTCAL_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "trtcal"
    return str(base / "store")


def _overrides(cls: type, values: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`values` without the None ones ("not given"); ConfigError for a name that is not a field of `cls`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")
    return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """How to calibrate. Validated on construction (ConfigError names the field).

    Attributes:
        algorithms: scale-search methods (keys of `trtcal.core.METHODS`, or "auto": per tensor the
            candidate with the least measured output noise, docs/algorithms.md); all are computed from
            the same histograms; the first one also becomes ``calibration.cache``.
        trt_version: TensorRT version whose header the caches carry, e.g. "10.16.1".
        micro_batch: samples per ONNX Runtime run (memory grows with it, not with the batch size).
        activation_budget_mib: the most MiB of selected tensor values one run may hold: runs take fewer
            samples than `micro_batch` when one sample's values times `micro_batch` would exceed it
            (measured on one sample). 0: no limit. None: the runner's default, 256 MiB on the CPU and
            no limit on a GPU (there the values live in GPU memory, and 5 samples per run instead of
            128 made EfficientNet-Lite0 7x slower on an H100; docs/batch-format.md). On the CPU the
            results are the same bytes for any budget (tested); GPU kernels may round differently at
            other batch sizes. Not part of any cache key.
        num_bins: histogram bins on [0, max |x|] per tensor.
        method_params: per-method parameters, e.g. ``{"percentile": {"percentile": 99.99}}``.
        tensors: "all" floating activations, "quantizable" op inputs, or a tuple of tensor names.
        nonfinite: "error" raises NonFiniteError naming the tensor; "ignore" skips NaN/Inf values
            (they are counted in ranges.json).
        manual_ranges: tensor -> amax that overrides (or adds to) the calibrated value.
        device: "cpu", or "cuda"/"cuda:N": ONNX Runtime's CUDA provider when onnxruntime-gpu is
            installed, else the PyTorch runner (statistics on the GPU) when torch sees CUDA.
        processes: CPU processes that collect the statistics, each on a contiguous slice of the
            batch, merged exactly (the artifacts are the bytes of one worker; tested). 1: in this
            process. 0: one per 2 cores, at most 8. Needs a local .arrow/.npy batch file (other
            batches are collected in this process). Not part of any cache key.
        allow_empty: accept a Q/DQ export that quantizes nothing (e.g. every weighted layer inside
            If/Loop/Scan bodies); by default that is a ModelError naming why. Not part of any cache
            key. (A calibration that selects no tensor is always an error: it has nothing to write.)
        verdict: judge every method (and auto) on the held-out verdict slice and record it
            (manifest, store entry). Not part of any cache key.
        min_sqnr: fail (QualityError, nothing written or published) when the written default's worst
            output SQNR on the verdict slice is below this many dB. None: no bar. Not part of any key.
        smooth: SmoothQuant-style smoothing before calibration (docs/qdq.md, "Smoothing"): "auto"
            smooths where the model has the pattern (a normalisation output read by MatMuls with
            constant 2-D weights: BERT-class encoders) and leaves every other model as it is; "on"
            requires the pattern (ConfigError without it); "off" never smooths. When it smooths, the
            caches and the Q/DQ model are of the smoothed copy, which is written too
            (model.smoothed.onnx). Part of the key only when it smooths.
        smooth_alpha: the migration strength in [0, 1] (0.5, the SmoothQuant paper's default).
    """

    algorithms: tuple[str, ...] = (AUTO,)
    trt_version: str = "10.16.1"
    micro_batch: int = 32
    activation_budget_mib: int | None = None
    num_bins: int = DEFAULT_NUM_BINS
    method_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tensors: TensorSelection | tuple[str, ...] = "all"
    nonfinite: Nonfinite = "error"
    manual_ranges: Mapping[str, float] = field(default_factory=dict)
    device: str = "cpu"
    processes: int = 1
    allow_empty: bool = False
    verdict: bool = True
    min_sqnr: float | None = None
    smooth: SmoothMode = "auto"
    smooth_alpha: float = 0.5

    def __post_init__(self) -> None:
        algorithms = (self.algorithms,) if isinstance(self.algorithms, str) else tuple(self.algorithms)
        if not algorithms:
            raise ConfigError("algorithms: give at least one method")
        unknown = [a for a in algorithms if a not in METHODS and a != AUTO]
        if unknown:
            raise ConfigError(f"algorithms: unknown method(s) {unknown}; choose from {sorted([*METHODS, AUTO])}")
        if len(set(algorithms)) != len(algorithms):
            raise ConfigError(f"algorithms: {list(algorithms)} names a method twice")
        object.__setattr__(self, "algorithms", algorithms)

        if not isinstance(self.trt_version, str):
            raise ConfigError(f"trt_version must be a string like '10.16.1', got {self.trt_version!r}")
        try:
            trt_version_int(self.trt_version)
        except ConfigError as exc:
            raise ConfigError(f"trt_version: {exc}") from None

        _check_int("micro_batch", self.micro_batch, 1)
        if self.activation_budget_mib is not None:
            _check_int("activation_budget_mib", self.activation_budget_mib, 0)
        _check_int("num_bins", self.num_bins, 1)
        if self.num_bins > MAX_NUM_BINS:
            raise ConfigError(f"num_bins must be <= {MAX_NUM_BINS}, got {self.num_bins}")
        object.__setattr__(self, "method_params", self._checked_method_params(algorithms))

        if isinstance(self.tensors, str):
            if self.tensors not in choices(TensorSelection):
                raise ConfigError(
                    f"tensors must be one of {choices(TensorSelection)} or a list of tensor names, got {self.tensors!r}"
                )
        else:
            names = tuple(self.tensors)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"tensors: a list of tensor names must be non-empty strings, got {names!r}")
            object.__setattr__(self, "tensors", names)

        _check_choice("nonfinite", self.nonfinite, Nonfinite)
        object.__setattr__(self, "manual_ranges", self._checked_manual_ranges())

        if not isinstance(self.device, str) or not (
            self.device in ("cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or not 0 <= self.processes <= 256:
            raise ConfigError(f"processes must be an int from 0 (auto) to 256, got {self.processes!r}")
        _check_bool("allow_empty", self.allow_empty)
        if not isinstance(self.verdict, bool):
            raise ConfigError(f"verdict must be True or False, got {self.verdict!r}")
        if self.min_sqnr is not None:
            if isinstance(self.min_sqnr, bool) or not isinstance(self.min_sqnr, (int, float)) or not math.isfinite(self.min_sqnr):
                raise ConfigError(f"min_sqnr must be a finite number of dB, got {self.min_sqnr!r}")
            if not self.verdict:
                raise ConfigError("min_sqnr needs the quality verdict; do not turn verdict off")
            object.__setattr__(self, "min_sqnr", float(self.min_sqnr))
        _check_choice("smooth", self.smooth, SmoothMode)
        alpha = self.smooth_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"smooth_alpha must be a number in [0, 1], got {alpha!r}")
        object.__setattr__(self, "smooth_alpha", float(alpha))

    def _checked_method_params(self, algorithms: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        params = {str(k): dict(v) for k, v in dict(self.method_params).items()}
        for method, kwargs in params.items():
            if method == AUTO:
                raise ConfigError("method_params: 'auto' takes no parameters (its candidates are fixed)")
            if method not in algorithms:
                raise ConfigError(f"method_params: {method!r} is not one of the requested algorithms {list(algorithms)}")
            # Validate the names and values now, on a one-bin histogram, rather than after collection.
            try:
                compute_amax([1] * min(self.num_bins, 256), 1.0, method, **kwargs)
            except ConfigError as exc:
                raise ConfigError(f"method_params[{method!r}]: {exc}") from None
        return copy.deepcopy(params)

    def _checked_manual_ranges(self) -> dict[str, float]:
        manual = {}
        for name, amax in dict(self.manual_ranges).items():
            try:
                value = float(amax)
            except (TypeError, ValueError):
                value = math.nan
            if not isinstance(name, str) or not name or not (math.isfinite(value) and value > 0.0):
                raise ConfigError(f"manual_ranges: tensor {name!r} needs a finite amax > 0, got {amax!r}")
            manual[name] = value
        return manual

    def with_overrides(self, **values: Any) -> CalibrationConfig:
        """A copy with the fields given (None means "not given"); ConfigError for an unknown name."""
        given = _overrides(CalibrationConfig, values, "calibration")
        return replace(self, **given) if given else self

    def resolved_processes(self) -> int:
        """`processes` with 0 (auto) resolved for this machine."""
        if self.processes:
            return self.processes
        return max(1, min(8, (os.cpu_count() or 1) // 2))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); `from_dict` inverts it."""
        out = asdict(self)
        out["algorithms"] = list(self.algorithms)
        if not isinstance(self.tensors, str):
            out["tensors"] = list(self.tensors)
        out["method_params"] = {k: dict(v) for k, v in sorted(self.method_params.items())}
        out["manual_ranges"] = dict(sorted(self.manual_ranges.items()))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown calibration config field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """How one model input is fed (docs/inputs.md). Declared per input; undeclared inputs are fed
    from the batch column of the same name, batch axis 0, as stored.

    Attributes:
        name: the model input.
        dtype: element type of the fed array ("int64", "int32", "float32", "float16", "bool");
            None: the data's own (token ids from text are int64).
        length: token inputs: pad or truncate the last axis to this many positions.
        pad_value: what padding positions hold (0; a mask input pads with 0 whatever this says).
        batch_axis: the model input's axis that holds the samples (0 for most; 1 for an RNN state
            [2, N, 128]); None: the input has no batch axis (fed as is, e.g. a scalar).
        value: a constant input (e.g. ``sr=16000``, a zero RNN state): the same value every run,
            not read from the data. With a batch axis it is repeated along that axis per micro-batch.
        shape: a constant's per-sample shape (``value`` is broadcast to it), e.g. [2, 128].
        mask: the attention mask: 1 for a real token, 0 for padding. Statistics then drop padded
            positions (docs/inputs.md states the rule); text sources derive it when the data lacks it.
        column: the data's column / tokenizer output feeding this input (default: `name`).
    """

    name: str
    dtype: str | None = None
    length: int | None = None
    pad_value: float = 0
    batch_axis: int | None = 0
    value: Any = None
    shape: tuple[int, ...] | None = None
    mask: bool = False
    column: str | None = None

    def __post_init__(self) -> None:
        where = f"inputs[{self.name!r}]"
        if not isinstance(self.name, str) or not self.name or self.name == "sample_id":
            raise ConfigError(f"inputs: an input name must be a non-empty string other than 'sample_id', got {self.name!r}")
        if self.dtype is not None and self.dtype not in INPUT_DTYPES:
            raise ConfigError(f"{where}.dtype must be one of {list(INPUT_DTYPES)}, got {self.dtype!r}")
        _check_int(f"{where}.length", self.length, 1, optional=True)
        _check_int(f"{where}.batch_axis", self.batch_axis, 0, optional=True)
        _check_bool(f"{where}.mask", self.mask)
        if isinstance(self.pad_value, bool) or not isinstance(self.pad_value, (int, float)) or not math.isfinite(self.pad_value):
            raise ConfigError(f"{where}.pad_value must be a finite number, got {self.pad_value!r}")
        if self.shape is not None:
            if isinstance(self.shape, (str, bytes)) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in self.shape
            ):
                raise ConfigError(f"{where}.shape must be a list of positive integers, got {self.shape!r}")
            object.__setattr__(self, "shape", tuple(self.shape))
        if self.value is not None:
            import numpy as np

            try:
                array = np.asarray(self.value)
            except (TypeError, ValueError):
                array = np.asarray(None)
            if array.dtype.kind not in "biuf" or (array.dtype.kind == "f" and not np.all(np.isfinite(array))):
                raise ConfigError(f"{where}.value must be a finite number or a nested list of numbers, got {self.value!r}")
            if self.shape is not None:
                try:
                    np.broadcast_to(array, self.shape)
                except ValueError:
                    raise ConfigError(f"{where}.value of shape {list(array.shape)} cannot fill shape {list(self.shape)}") from None
            if self.mask or self.length is not None:
                raise ConfigError(f"{where}: a constant (value) cannot also be a mask or have a length")
            object.__setattr__(self, "value", array.tolist())
        elif self.shape is not None:
            raise ConfigError(f"{where}.shape is for constants: give a value too")
        elif self.batch_axis is None:
            raise ConfigError(f"{where}: only a constant (value) can have no batch axis")
        if self.column is not None and (not isinstance(self.column, str) or not self.column):
            raise ConfigError(f"{where}.column must be a non-empty string, got {self.column!r}")

    @property
    def is_constant(self) -> bool:
        return self.value is not None

    @property
    def source_column(self) -> str:
        return self.column or self.name

    def constant(self) -> Any:
        """The constant's per-sample array (numpy), in `dtype` (default: int64 for integers, float32)."""
        import numpy as np

        array = np.asarray(self.value)
        dtype = self.dtype or ("int64" if array.dtype.kind in "iu" else "bool" if array.dtype.kind == "b" else "float32")
        if self.shape is not None:
            array = np.broadcast_to(array, self.shape)
        return np.array(array, dtype=dtype, copy=True)  # 0-d stays 0-d (a scalar input)

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults (canonical: part of batch keys and documents)."""
        defaults = InputSpec(name=self.name)
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and value != getattr(defaults, f.name):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def parse_input_specs(value: Any) -> tuple[InputSpec, ...]:
    """Input specs from a mapping ``{name: {field: value}}``, its JSON text, a path to a .json file, or
    InputSpecs; sorted by name. ConfigError naming the input and field on anything else."""
    import json

    if value is None:
        return ()
    if isinstance(value, InputSpec):
        return (value,)
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            try:
                with open(text, encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                raise ConfigError(f"inputs: {value!r} is neither a JSON object nor a readable .json file ({exc})") from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"inputs: not valid JSON ({exc})") from None
    if isinstance(value, Mapping):
        specs = []
        known = {f.name for f in fields(InputSpec)} - {"name"}
        for name, body in value.items():
            if isinstance(body, InputSpec):
                specs.append(body)
                continue
            if not isinstance(body, Mapping):
                raise ConfigError(f"inputs[{name!r}] must be an object of fields {sorted(known)}, got {body!r}")
            unknown = sorted(set(body) - known)
            if unknown:
                raise ConfigError(f"inputs[{name!r}]: unknown field(s) {unknown}; known: {sorted(known)}")
            specs.append(InputSpec(name=name, **dict(body)))
    elif isinstance(value, (list, tuple)) and all(isinstance(v, InputSpec) for v in value):
        specs = list(value)
    else:
        raise ConfigError(f"inputs must be a mapping input name -> fields (or its JSON), got {type(value).__name__}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"inputs: an input is declared twice in {names}")
    if sum(s.mask for s in specs) > 1:
        raise ConfigError(f"inputs: at most one input can be the mask, got {[s.name for s in specs if s.mask]}")
    return tuple(sorted(specs, key=lambda s: s.name))


def input_specs_to_dict(specs: tuple[InputSpec, ...]) -> dict[str, dict[str, Any]]:
    """The JSON form of input specs (``{name: {non-default fields}}``), sorted by name."""
    return {s.name: s.to_dict() for s in sorted(specs, key=lambda s: s.name)}


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """How to build a calibration batch from a dataset. Validated on construction.

    Attributes:
        num_samples: how many samples to draw; None (or "all") for all of them.
        seed: seeds the draw (numpy PCG64).
        preprocess: a PreprocessSpec, or a preset name ("imagenet", "efficientnet-lite", "raw"),
            "package.module:function", a JSON spec or a .json file (parsed here).
        stratify: draw evenly per class (first folder level, or a list's label column).
        workers: tasks in flight at once (and the CPUs of an embedded Ray); None: the cluster's CPUs.
        on_bad_input: "fail" (raise, listing every bad input) or "skip" (leave them out, report them).
        input_name: the model input the preprocessed arrays feed (`calibrate_dataset` sets it from the model).
        max_image_pixels: decompression-bomb limit (width x height) per image.
        max_retries: how often Ray reruns a task whose worker died.
        chunk_size: samples per task; None picks ~8 MiB of output per task.
        inputs: declared model inputs (`InputSpec`: dtype, length, batch axis, constants, mask); a
            mapping or its JSON is parsed here. Stored in the batch; runners feed by it.
        tokenizer: raw text: "package.module:function" (text -> {column: token ids}) or a path to
            a Hugging Face ``tokenizer.json`` (needs trtcal[text]).
        text_field: the JSONL / Parquet field holding raw text.
    """

    num_samples: int | None = 500
    seed: int = 0
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    stratify: bool = False
    workers: int | None = None
    on_bad_input: OnBadInput = "fail"
    input_name: str = "input"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_retries: int = 3
    chunk_size: int | None = None
    inputs: tuple[InputSpec, ...] = ()
    tokenizer: str | None = None
    text_field: str = "text"

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_samples", parse_num_samples(self.num_samples))
        object.__setattr__(self, "inputs", parse_input_specs(self.inputs))
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise ConfigError(f"tokenizer must be 'package.module:function' or a tokenizer.json path, got {self.tokenizer!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ConfigError(f"text_field must be a non-empty string, got {self.text_field!r}")
        check_seed(self.seed)
        if isinstance(self.preprocess, str):
            object.__setattr__(self, "preprocess", parse_preprocess(self.preprocess))
        if not isinstance(self.preprocess, PreprocessSpec):
            raise ConfigError(f"preprocess must be a PreprocessSpec or a preset/function name, got {type(self.preprocess).__name__}")
        _check_bool("stratify", self.stratify)
        _check_choice("on_bad_input", self.on_bad_input, OnBadInput)
        _check_int("workers", self.workers, 1, optional=True)
        _check_int("max_image_pixels", self.max_image_pixels, 1)
        _check_int("max_retries", self.max_retries, 0)
        _check_int("chunk_size", self.chunk_size, 1, optional=True)
        if not isinstance(self.input_name, str) or not self.input_name or self.input_name == "sample_id":
            raise ConfigError(f"input_name must be a non-empty string other than 'sample_id', got {self.input_name!r}")

    def with_overrides(self, **values: Any) -> BatchConfig:
        """A copy with the fields given (None means "not given"); ConfigError for an unknown name."""
        given = _overrides(BatchConfig, values, "batch")
        return replace(self, **given) if given else self


@dataclass(frozen=True, kw_only=True)
class StoreSettings:
    """The cache store a job reads and publishes to (`trtcal.storage.CacheStore` opens it).

    Attributes:
        url: store root (None: `default_store_url()`).
        read_from: other stores searched (read-only) before computing.
        namespace: the store namespace (e.g. a team); None: the store's default.
        read_only: never write to the store (consumers); a miss then computes without publishing.
        on_corrupt: what an entry that fails verification does: "fail" (an error naming it) or
            "recompute" (logged, treated as a miss; the new result replaces it).
    """

    url: str | None = None
    read_from: tuple[str, ...] = ()
    namespace: str | None = None
    read_only: bool = False
    on_corrupt: str = "fail"

    def __post_init__(self) -> None:
        if isinstance(self.read_from, str):
            raise ConfigError("read_from must be a list of store URLs, not one string")
        object.__setattr__(self, "read_from", tuple(self.read_from))
        _check_bool("read_only", self.read_only)
        if self.on_corrupt not in ("fail", "recompute"):
            raise ConfigError(f"on_corrupt must be 'fail' or 'recompute', got {self.on_corrupt!r}")

    def resolved_url(self) -> str:
        return self.url or default_store_url()


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Where the job runs.

    Attributes:
        address: Ray cluster address (None: an embedded local Ray; "auto"; "ray://…").
        device: where the calibration actor runs: "auto" (GPU when the cluster has one and
            onnxruntime-gpu is installed), "cpu" or "gpu" (an error at once when the cluster has none).
    """

    address: str | None = None
    device: ActorDevice = "auto"

    def __post_init__(self) -> None:
        _check_choice("device", self.device, ActorDevice)


# Flat option names (`calibrate_dataset(..., num_samples=500, store="s3://…")`) -> (part, field).
_FLAT_OPTIONS: dict[str, tuple[str, str]] = {
    **{f.name: ("batch", f.name) for f in fields(BatchConfig)},
    "store": ("store", "url"), "read_from": ("store", "read_from"), "namespace": ("store", "namespace"),
    "read_only": ("store", "read_only"), "on_corrupt": ("store", "on_corrupt"), "address": ("cluster", "address"), "device": ("cluster", "device"),
}


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """Everything `trtcal calibrate MODEL --data URL` can be told: the parts, and what joins them.

    Attributes:
        batch, calibration, store, cluster: the parts (see the module docstring).
        output: directory that receives the artifacts (None: leave them in the store only); only
            trtcal's own file names are written there.
        force: also write into a non-empty `output` that holds no trtcal output (refused otherwise).
        export_qdq: also write the Q/DQ ONNX model of the first method.
        backend: "onnxruntime" statistics, or TensorRT 10's own calibrator ("tensorrt": one
            algorithm of `TENSORRT_ALGORITHMS`, on a GPU).
        storage_options: fsspec options for the model, the dataset and the store (credentials stay
            out of every artifact).
    """

    batch: BatchConfig = field(default_factory=BatchConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    store: StoreSettings = field(default_factory=StoreSettings)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: str | None = None
    force: bool = False
    export_qdq: bool = True
    backend: Backend = "onnxruntime"
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, kind in (("batch", BatchConfig), ("calibration", CalibrationConfig), ("store", StoreSettings),
                           ("cluster", ClusterConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        _check_choice("backend", self.backend, Backend)
        if self.backend == "tensorrt":
            algos = self.calibration.algorithms
            if len(algos) != 1 or algos[0] not in TENSORRT_ALGORITHMS:
                raise ConfigError(
                    f"--backend tensorrt runs one TensorRT calibrator: give exactly one --algorithm of "
                    f"{TENSORRT_ALGORITHMS}, got {list(algos)} (auto, the default, measures candidates with the onnxruntime backend)"
                )
        _check_bool("export_qdq", self.export_qdq)
        _check_bool("force", self.force)
        if not isinstance(self.storage_options, Mapping):
            raise ConfigError("storage_options must be a mapping")
        object.__setattr__(self, "storage_options", dict(self.storage_options))

    def with_options(self, **options: Any) -> JobConfig:
        """A copy with flat options applied: JobConfig fields, parts (``batch=BatchConfig(…)``), or a
        part's field by name (``num_samples=``, ``store="s3://…"``, ``address=``, ``device=``, …).

        None means "not given" for a part's field.
        """
        top = {k: v for k, v in options.items() if k in {f.name for f in fields(JobConfig)}
               and not (k == "store" and not isinstance(v, StoreSettings))}
        parts: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            if name in top:
                continue
            if name not in _FLAT_OPTIONS:
                known = sorted({f.name for f in fields(JobConfig)} | set(_FLAT_OPTIONS))
                raise ConfigError(f"unknown job option {name!r}; known: {known}")
            part, field_name = _FLAT_OPTIONS[name]
            if value is not None:
                parts.setdefault(part, {})[field_name] = value
        merged = replace(self, **top) if top else self
        for part, values in parts.items():
            merged = replace(merged, **{part: replace(getattr(merged, part), **values)})
        return merged

    @classmethod
    def from_options(cls, **options: Any) -> JobConfig:
        """`JobConfig().with_options(**options)`: the flat spelling of a job (`calibrate_dataset`'s keywords)."""
        return cls().with_options(**options)
