"""What identifies a job's two store entries: the batch (by request) and the calibration (by content).

* The **batch entry** is keyed by the request (dataset URL without credentials, sample count, seed,
  stratification, preprocessing spec, bad-input policy): a retry never preprocesses again. The
  dataset is not listed to compute this key (listing 10^5+ objects would dominate a cache hit), so
  a dataset changed in place under the same URL is not noticed: publish changed data under a new
  (versioned) prefix.
* The **calibration entry** is keyed by content (`trtcal.storage.KeyInputs`): model sha256, batch
  fingerprint, preprocessing spec, the methods and their parameters, runner kind and version,
  tensor selection, micro-batch, format version. Same key, same artifact bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from trtcal._version import FORMAT_VERSION
from trtcal.config import BatchConfig, CalibrationConfig, JobConfig

__all__ = ["batch_key_inputs", "calibration_key_inputs", "runner_id", "hit_runner_devices"]


def batch_key_inputs(data: str, batch: BatchConfig) -> dict[str, Any]:
    """What identifies a batch request (not its content: the dataset is only listed when building)."""
    from trtcal._secrets import redact_url

    key = {
        "kind": "calibration-batch",
        "data": redact_url(os.fspath(data)),
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


def calibration_key_inputs(
    model_sha256: str, fingerprint: str, spec: Mapping[str, Any], cal: CalibrationConfig, runner: tuple[str, str]
) -> Any:
    from trtcal.storage import KeyInputs

    return KeyInputs(
        model_sha256=model_sha256,
        batch_fingerprint=fingerprint,
        preprocessing=dict(spec),
        algorithm="+".join(cal.algorithms),
        algorithm_params={"num_bins": cal.num_bins, "method_params": {k: dict(v) for k, v in sorted(cal.method_params.items())}},
        runner=runner[0],
        runner_version=runner[1],
        extra={
            "micro_batch": cal.micro_batch,
            "tensors": cal.tensors if isinstance(cal.tensors, str) else list(cal.tensors),
            "nonfinite": cal.nonfinite,
            "manual_ranges": dict(sorted(cal.manual_ranges.items())),
        },
    )
