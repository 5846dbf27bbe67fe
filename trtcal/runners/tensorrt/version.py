"""Which TensorRT is installed: `load_tensorrt` (8.5, 8.6 or 10.x, with a clear error otherwise) and `check_tensorrt_version`.

TensorRT 8.5/8.6 and 10.x share the calibrator API this adapter uses; the differences are handled
where they arise (explicit-batch network flag before 10, no builder optimization level before 8.6).
TensorRT 8.5.3 ran tests/tensorrt for real (docs/tensorrt.md).
"""

from __future__ import annotations

import logging
import re
from types import ModuleType

from trtcal.errors import (
    BackendUnavailableError,
)

log = logging.getLogger(__name__)


INSTALL_HINT = (
    "TensorRT is not installed. The TensorRT backend needs TensorRT 10.x and cuda-python on a machine "
    "with an NVIDIA GPU: pip install 'trtcal[tensorrt]' with NVIDIA's package index added as an extra "
    "index (the TensorRT wheels on PyPI download their libraries from it; see TensorRT's installation "
    "guide). Without TensorRT, calibrate with the default ONNX Runtime backend: its calibration.cache "
    "loads in TensorRT 10 (trtexec --calib, or `trtcal engine build --cache` where TensorRT exists) "
    "and its Q/DQ model builds in TensorRT 11."
)


_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?")


def check_tensorrt_version(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a TensorRT version string, if this adapter supports it.

    Raises:
        BackendUnavailableError: TensorRT 11+ (implicit calibration removed), older than 8.5
            (or a 9.x build), or an unreadable version string.
    """
    m = _VERSION_RE.match(str(version))
    if not m:
        raise BackendUnavailableError(
            f"cannot read the TensorRT version {version!r}; is the 'tensorrt' module TensorRT's own package?"
        )
    major, minor, patch = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if major >= 11:
        raise BackendUnavailableError(
            f"TensorRT {version} is installed, but implicit INT8 calibration no longer exists in TensorRT 11: "
            "the IInt8Calibrator family, BuilderFlag.INT8, ITensor.set_dynamic_range and the quantization flags "
            "were removed in 11.0 in favour of explicit quantization. Export a Q/DQ model with "
            "`trtcal export qdq` and build that with TensorRT 11, or install TensorRT 10.x (10.16 is the last "
            "release with calibrators) to use this backend."
        )
    if (major, minor) < (8, 5) or major == 9:
        raise BackendUnavailableError(
            f"TensorRT {version} is installed; trtcal's TensorRT backend needs TensorRT 8.5, 8.6 or 10.x. "
            "trtcal can still write a calibration cache for it (set the cache's target TensorRT version), "
            "which trtexec --calib or your own calibrator can load."
        )
    return major, minor, patch


def load_tensorrt() -> ModuleType:
    """Import TensorRT and check that it is a supported release (8.5, 8.6 or 10.x).

    Raises:
        BackendUnavailableError: TensorRT missing (with the install hint), broken, or unsupported.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(f"{INSTALL_HINT} (import tensorrt: {exc})") from exc
    except OSError as exc:  # the Python module is there but libnvinfer is not loadable
        raise BackendUnavailableError(
            f"TensorRT's Python module is installed but its libraries do not load ({exc}); "
            "reinstall TensorRT 10.x so its libraries match the Python bindings."
        ) from exc
    version = getattr(trt, "__version__", None)
    if not isinstance(version, str):
        raise BackendUnavailableError(
            "the installed 'tensorrt' module has no __version__; it is probably the placeholder package "
            f"whose real wheels failed to download. {INSTALL_HINT}"
        )
    check_tensorrt_version(version)
    module: ModuleType = trt
    return module


def tensorrt_major(trt: ModuleType) -> int:
    """The major version of an imported TensorRT module."""
    return check_tensorrt_version(str(trt.__version__))[0]


def _trt_version_int(trt: ModuleType) -> int:
    from trtcal.core import trt_version_int

    return trt_version_int(str(trt.__version__))
