"""The one runner factory: which runner collects the statistics, for a device and a kind.

Its own module because it imports every concrete runner (each of which imports `base`).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from trtcal.errors import ConfigError
from trtcal.runners.base import RUNNER_KINDS, Runner, RunnerKind

if TYPE_CHECKING:
    import onnx

    from trtcal.model import LoadedModel, TensorSelection

logger = logging.getLogger(__name__)


def make_runner(
    model: str | os.PathLike[str] | bytes | onnx.ModelProto | LoadedModel,
    *,
    kind: RunnerKind = "auto",
    tensors: TensorSelection = "all",
    device: str = "cpu",
    kernel_backend: str = "auto",
    intra_op_num_threads: int = 0,
) -> Runner:
    """The runner `kind` names (heavy modules are imported here, by the process that runs it).

    "auto": ONNX Runtime on the CPU or with its CUDA provider; for a CUDA device without
    onnxruntime-gpu but with a GPU PyTorch sees, the PyTorch runner (trtcal's ONNX interpreter on
    torch, statistics computed on the GPU).
    """
    if kind not in RUNNER_KINDS:
        raise ConfigError(f"runner must be one of {list(RUNNER_KINDS)}, got {kind!r}")
    if kind == "auto":
        kind = "torch" if device != "cpu" and _prefer_torch() else "onnxruntime"
        if kind == "torch":
            logger.info("onnxruntime has no CUDA provider here: collecting with the PyTorch runner on %s", device)
    if kind == "onnxruntime":
        from trtcal.runners.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(model, tensors=tensors, device=device, intra_op_num_threads=intra_op_num_threads)
    from trtcal.runners.torch_runner import OrtDeviceRunner, TorchRunner

    if kind == "torch":
        return TorchRunner(model, tensors=tensors, device=device, kernel_backend=kernel_backend)  # type: ignore[arg-type]
    return OrtDeviceRunner(
        model, tensors=tensors, device=device, kernel_backend=kernel_backend,  # type: ignore[arg-type]
        intra_op_num_threads=intra_op_num_threads,
    )


def _prefer_torch() -> bool:
    """True when onnxruntime lacks its CUDA provider and PyTorch sees a CUDA GPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
