"""What identifies a job's two store entries: the batch (by request) and the calibration (by content).

* The **batch entry** is keyed by the request AND the content it is built from: the absolute
  dataset URL (without credentials), a digest of the dataset's listing (relative path, size, and
  mtime_ns / ETag / version id of every dataset file: `trtcal.workers.listing_digest`), the model
  input the batch feeds (name, element type, declared shape), and the sample count, seed,
  stratification, preprocessing spec and bad-input policy. Two projects that both say
  `--data ./images/` get different keys (different absolute paths); changed, added or removed
  files give a new key; a model with another input name gets its own batch. The listing costs
  about what the build's own listing costs (bench/bench_listing.py).
* The **calibration entry** is keyed by content (`trtcal.storage.KeyInputs`): model sha256, batch
  fingerprint, preprocessing spec, the methods and their parameters, runner kind and version,
  tensor selection, micro-batch, format version. Same key, same artifact bytes. When the
  calibration smooths the model (`CalibrationConfig.smooth`, only models with the pattern), the key
  also holds the smoothing rule and alpha (`smoothing_key`): a smoothed result is never served for
  an unsmoothed request or the other way round, and every other model keeps its key. The key also
  holds the search version of any method whose rule changed since its first release
  (`trtcal.core.scales.SEARCH_VERSIONS`; auto counts its candidates' methods).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from trtcal._version import FORMAT_VERSION
from trtcal.config import BatchConfig, CalibrationConfig, JobConfig
from trtcal.errors import ConfigError

__all__ = [
    "batch_key_inputs", "calibration_key_inputs", "smoothing_key", "SMOOTHING_RULE", "dataset_url", "hit_runner_devices",
    "model_input_spec", "runner_id", "search_versions",
]


def dataset_url(data: str | os.PathLike[str]) -> str:
    """The dataset URL as keyed: local paths made absolute (so `./images/` of two projects differ),
    other URLs as given; never with credentials."""
    from trtcal._secrets import redact_url

    text = os.fspath(data)
    if "://" not in text or text.startswith("file://"):
        text = os.path.abspath(os.path.expanduser(text.removeprefix("file://")))
    return redact_url(text)


def batch_key_inputs(
    data: str, batch: BatchConfig, *, listing_sha256: str, listing_files: int, model_input: Mapping[str, Any]
) -> dict[str, Any]:
    """What identifies a batch: the request, the listing digest of the data, and the model input it feeds."""
    key = {
        "kind": "calibration-batch",
        "data": dataset_url(data),
        "listing_sha256": listing_sha256,
        "listing_files": listing_files,
        "model_input": dict(model_input),
        "num_samples": batch.num_samples,
        "seed": batch.seed,
        "stratify": batch.stratify,
        "preprocess": batch.preprocess.to_dict(),
        "on_bad_input": batch.on_bad_input,
        "format_version": FORMAT_VERSION,
    }
    # Text and declared inputs only: image requests keep their keys.
    if batch.inputs:
        from trtcal.config import input_specs_to_dict

        key["inputs"] = input_specs_to_dict(batch.inputs)
    if batch.tokenizer is not None:
        key["tokenizer"] = batch.tokenizer
        key["text_field"] = batch.text_field
        if batch.tokenizer.endswith(".json") and os.path.isfile(batch.tokenizer):
            import hashlib

            with open(batch.tokenizer, "rb") as f:
                key["tokenizer_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return key


def model_input_spec(model_bytes: bytes, wanted: str | None, *, model: str, default: str | None = None) -> dict[str, Any]:
    """{name, elem_type, shape} of the model input a dataset feeds.

    `wanted` (from --input-name) must be one of the model's inputs; without it (or when it is the
    untouched `default` and the model has no input of that name) the model must have exactly one.
    Raises ModelError for a file that is not ONNX (naming the user's `model`)."""
    import onnx

    from trtcal.errors import ModelError

    try:
        graph = onnx.load_from_string(model_bytes).graph
    except Exception as exc:  # onnx raises DecodeError and others
        raise ModelError(f"model {model!r} is not a valid ONNX file ({type(exc).__name__}: {exc}); re-export it") from None
    initializers = {i.name for i in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    if wanted is not None and wanted == default and wanted not in inputs:
        wanted = None
    if wanted is not None and wanted not in inputs:
        raise ConfigError(f"--input-name {wanted!r}: model {model!r} has no such input; its inputs are {sorted(inputs)}")
    if wanted is None:
        if len(inputs) != 1:
            raise ConfigError(
                f"model {model!r} has {len(inputs)} inputs {sorted(inputs)}; an image dataset feeds one: name it with "
                "--input-name, or build a batch with a preprocessing function that returns every input and pass the .arrow file"
            )
        wanted = next(iter(inputs))
    tensor = inputs[wanted].type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return {"name": wanted, "elem_type": onnx.TensorProto.DataType.Name(tensor.elem_type), "shape": shape}


def runner_id(device: str, backend: str = "onnxruntime") -> tuple[str, str]:
    """Runner kind and version that determine the activations (part of the key)."""
    if backend == "tensorrt":
        try:
            import tensorrt

            return ("tensorrt-cuda", str(tensorrt.__version__))
        except ImportError:
            return ("tensorrt-cuda", "unknown")  # the actor reports the real version; no hit is possible here
    import onnxruntime

    return (f"onnxruntime-{device}", str(onnxruntime.__version__))


def hit_runner_devices(config: JobConfig) -> list[str]:
    """The runner devices whose stored result this job may take without starting Ray, CPU first."""
    if config.backend == "tensorrt":
        return ["cuda"]
    return {"cpu": ["cpu"], "gpu": ["cuda"], "auto": ["cpu", "cuda"]}[config.cluster.device]


# Names the smoothing rule (trtcal.export.smoothing: which tensors, the scale formula): change it
# whenever the rule changes, so stored smoothed results are not served for the new rule.
SMOOTHING_RULE = "smoothquant-norm-matmul/1"


def smoothing_key(model_bytes: bytes, cal: CalibrationConfig, backend: str = "onnxruntime", *, model: str = "the model") -> dict[str, Any] | None:
    """The key's record of smoothing: the rule and alpha when calibrating this model smooths it, else
    None (the key is the same as without the option). ConfigError for --smooth on where it cannot
    smooth (no pattern, or TensorRT's own calibrator, which calibrates the model as it is)."""
    if cal.smooth == "off":
        return None
    if backend == "tensorrt":
        if cal.smooth == "on":
            raise ConfigError("--smooth on needs the onnxruntime backend; --backend tensorrt calibrates the model as it is")
        return None
    import onnx

    from trtcal.errors import ModelError
    from trtcal.export.smoothing import smoothing_sites

    try:
        proto = onnx.load_from_string(model_bytes)
    except Exception as exc:  # onnx raises DecodeError and others
        raise ModelError(f"model {model!r} is not a valid ONNX file ({type(exc).__name__}: {exc}); re-export it") from None
    if not smoothing_sites(proto, cal.smooth, model_label=f"model {model!r}"):
        return None
    return {"rule": SMOOTHING_RULE, "alpha": cal.smooth_alpha}


def search_versions(algorithms: tuple[str, ...] | list[str]) -> dict[str, int]:
    """method -> search version for the methods a calibration computes whose rule has changed.

    Empty for methods still at their first rule, so their keys (and stored entries) stay valid.
    """
    from trtcal.config import AUTO
    from trtcal.core.auto_search import AUTO_RULE_VERSION, CANDIDATES
    from trtcal.core.scales import SEARCH_VERSIONS

    methods = set(algorithms)
    versions = {AUTO: AUTO_RULE_VERSION} if AUTO in methods else {}  # auto's own search rule (2: cross-fit guard)
    if AUTO in methods:
        methods |= {c.method for c in CANDIDATES}
    versions.update({m: SEARCH_VERSIONS[m] for m in sorted(methods) if m in SEARCH_VERSIONS})
    return dict(sorted(versions.items()))


def calibration_key_inputs(
    model_sha256: str, fingerprint: str, spec: Mapping[str, Any], cal: CalibrationConfig, runner: tuple[str, str],
    smoothing: Mapping[str, Any] | None = None,
) -> Any:
    """The calibration entry's key inputs; `smoothing` (from `smoothing_key`) only when the model is smoothed."""
    from trtcal.storage import KeyInputs

    extra: dict[str, Any] = {
        "micro_batch": cal.micro_batch,
        "tensors": cal.tensors if isinstance(cal.tensors, str) else list(cal.tensors),
        "nonfinite": cal.nonfinite,
        "manual_ranges": dict(sorted(cal.manual_ranges.items())),
    }
    if smoothing is not None:
        extra["smoothing"] = dict(smoothing)
    params: dict[str, Any] = {"num_bins": cal.num_bins, "method_params": {k: dict(v) for k, v in sorted(cal.method_params.items())}}
    versions = search_versions(cal.algorithms)
    if versions:
        params["search_versions"] = versions
    return KeyInputs(
        model_sha256=model_sha256,
        batch_fingerprint=fingerprint,
        preprocessing=dict(spec),
        algorithm="+".join(cal.algorithms),
        algorithm_params=params,
        runner=runner[0],
        runner_version=runner[1],
        extra=extra,
    )
