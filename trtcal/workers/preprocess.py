"""Preprocessing: one encoded image (or one tensor row) -> the model-ready array, as a frozen spec says.

`PreprocessSpec` is the whole recipe; its canonical JSON is stored in every calibration batch and
is part of the cache key. Presets (`preset`):

    imagenet           resize the shorter side to 256 (bilinear), centre-crop 224, x/255, mean/std
                       (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225), RGB, NCHW, float32
                       (torchvision's Resize(256) + CenterCrop(224) + ToTensor + Normalize)
    efficientnet-lite  the same geometry with bicubic resizing, (x - 127) / 128
                       (what EfficientNet-Lite0, trtcal.demo.model_zoo, was trained with)
    raw                no resize, no crop, pixel values 0..255 as floats (all images must share a size)

Anything else: `function="package.module:function"`, imported by name (never from a file path or
an expression), called with the decoded RGB image (a PIL image) or the tensor row (a numpy array).

Decoding is Pillow's, restricted to JPEG, PNG, WebP and BMP. Modes are handled deliberately:
EXIF orientation is applied (ImageOps.exif_transpose); 1-bit and grayscale are replicated to RGB;
16-bit grayscale ("I;16*", "I") is rounded to 8 bits (v -> round(v / 257)); palette images become
RGBA when they carry transparency, RGB otherwise; alpha is dropped (torchvision's loader does the
same) unless `alpha_background` asks for compositing onto a colour; CMYK and YCbCr go through
Pillow's conversion to RGB (no ICC colour management). A bad input raises `InputRejected` with a
reason from `REJECT_REASONS`; the build turns it into a per-file record.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal.errors import ConfigError, DataError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "PreprocessSpec",
    "PRESETS",
    "preset",
    "parse_preprocess",
    "REJECT_REASONS",
    "InputRejected",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "decode_image",
    "transform_image",
    "preprocess_image_bytes",
    "preprocess_array",
    "load_function",
    "output_shape",
]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "float16")
CHANNEL_ORDERS = ("RGB", "BGR")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Pillow's own default limit (Image.MAX_IMAGE_PIXELS); trtcal never changes the process-wide value.
DEFAULT_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)
MAX_SIDE = 1 << 14  # sanity bound on sizes in a spec

REJECT_REASONS = (
    "zero-byte",  # the file is empty
    "truncated",  # the encoded data ends early
    "corrupt",  # the decoder failed on the data
    "non-image",  # not a JPEG, PNG, WebP or BMP image
    "bomb",  # more pixels than the decompression-bomb limit
    "unreadable",  # the file could not be read (permissions, I/O, missing)
    "outside-root",  # a symlink resolving outside a local dataset's root
    "too-small",  # smaller than the crop (only without resizing)
    "bad-output",  # the preprocessing function returned something unusable
    "shape-mismatch",  # a different shape/dtype than the batch's (raw images of another size, ...)
    "duplicate",  # listed twice in a list file
    "function-error",  # the user's preprocessing function raised
)

_FUNCTION_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class InputRejected(DataError):
    """One input cannot be used; `reason` is one of REJECT_REASONS. Turned into a per-file record."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _floats(name: str, value: Any, length: int) -> tuple[float, ...]:
    try:
        items = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {length} numbers, got {value!r}") from None
    if len(items) != length or not all(math.isfinite(v) for v in items):
        raise ConfigError(f"{name} must be {length} finite numbers, got {value!r}")
    return items


@dataclass(frozen=True, kw_only=True)
class PreprocessSpec:
    """How one input becomes a model-ready array. The defaults are the `imagenet` preset.

    Attributes:
        resize_shorter: resize so the shorter side has this many pixels (the longer side keeps the
            aspect ratio, truncated as torchvision does); None keeps the size.
        crop_size: centre crop to crop_size x crop_size; None keeps the whole image.
        interpolation: Pillow resampling filter, one of INTERPOLATIONS.
        channel_order: "RGB" or "BGR".
        pixel_scale, mean, std: per channel, value = (pixel * pixel_scale - mean) / std in float32.
        layout: "NCHW" (channels first) or "NHWC".
        dtype: "float32" or "float16" (computed in float32, then cast).
        alpha_background: None drops alpha; an (r, g, b) composites transparent images onto it.
        function: "package.module:function" replacing the transform; it gets the decoded RGB PIL
            image (or a tensor row) and returns an array, or a mapping input name -> array.
    """

    resize_shorter: int | None = 256
    crop_size: int | None = 224
    interpolation: str = "bilinear"
    channel_order: str = "RGB"
    pixel_scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"
    dtype: str = "float32"
    alpha_background: tuple[int, int, int] | None = None
    function: str | None = None

    def __post_init__(self) -> None:
        for name in ("resize_shorter", "crop_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE):
                raise ConfigError(f"{name} must be an integer in [1, {MAX_SIDE}] or None, got {value!r}")
        if self.resize_shorter is not None and self.crop_size is not None and self.crop_size > self.resize_shorter:
            raise ConfigError(
                f"crop_size ({self.crop_size}) must not exceed resize_shorter ({self.resize_shorter}): "
                "the crop would run off the resized image"
            )
        for name, allowed in (
            ("interpolation", INTERPOLATIONS),
            ("channel_order", CHANNEL_ORDERS),
            ("layout", LAYOUTS),
            ("dtype", DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        try:
            scale = float(self.pixel_scale)
        except (TypeError, ValueError):
            raise ConfigError(f"pixel_scale must be a number, got {self.pixel_scale!r}") from None
        if not math.isfinite(scale) or scale == 0.0:
            raise ConfigError(f"pixel_scale must be a finite non-zero number, got {self.pixel_scale!r}")
        object.__setattr__(self, "pixel_scale", scale)
        object.__setattr__(self, "mean", _floats("mean", self.mean, 3))
        std = _floats("std", self.std, 3)
        if any(s == 0.0 for s in std):
            raise ConfigError(f"std must not contain 0, got {self.std!r}")
        object.__setattr__(self, "std", std)
        if self.alpha_background is not None:
            try:
                bg = tuple(int(v) for v in self.alpha_background)
            except (TypeError, ValueError):
                raise ConfigError(f"alpha_background must be None or 3 integers 0..255, got {self.alpha_background!r}") from None
            if len(bg) != 3 or not all(0 <= v <= 255 for v in bg):
                raise ConfigError(f"alpha_background must be None or 3 integers 0..255, got {self.alpha_background!r}")
            object.__setattr__(self, "alpha_background", bg)
        if self.function is not None and (not isinstance(self.function, str) or not _FUNCTION_PATH.match(self.function)):
            raise ConfigError(
                f"function must look like 'package.module:function' (an importable name), got {self.function!r}"
            )

    # -- serialisation (part of the cache key: canonical, types normalised)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("mean", "std", "alpha_background"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace; equal specs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a preprocessing spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown preprocessing spec field(s) {unknown}; known: {sorted(known)}")
        kwargs = dict(data)
        for name in ("mean", "std", "alpha_background"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"preprocessing spec is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @property
    def is_passthrough(self) -> bool:
        """True when pixel values are not touched (the `raw` preset): what tensor sources need."""
        return (
            self.function is None
            and self.resize_shorter is None
            and self.crop_size is None
            and self.pixel_scale == 1.0
            and self.mean == (0.0, 0.0, 0.0)
            and self.std == (1.0, 1.0, 1.0)
        )


PRESETS: dict[str, PreprocessSpec] = {
    "imagenet": PreprocessSpec(),
    "efficientnet-lite": PreprocessSpec(
        interpolation="bicubic", pixel_scale=1.0, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)
    ),
    "raw": PreprocessSpec(
        resize_shorter=None, crop_size=None, pixel_scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
    ),
}


def preset(name: str, **overrides: Any) -> PreprocessSpec:
    """A preset spec with some fields replaced, e.g. ``preset("imagenet", layout="NHWC")``."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ConfigError(f"preprocess: unknown preset {name!r}; choose from {sorted(PRESETS)} or give 'package.module:function'") from None
    return replace(base, **overrides) if overrides else base


def parse_preprocess(text: str, **overrides: Any) -> PreprocessSpec:
    """A CLI value: a preset name, 'package.module:function', or a JSON object / a path to a .json file."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if text in PRESETS:
        return preset(text, **overrides)
    if _FUNCTION_PATH.match(text):
        base = PRESETS["raw"]
        return replace(base, function=text, **overrides)
    stripped = text.strip()
    if stripped.startswith("{"):
        return replace(PreprocessSpec.from_json(stripped), **overrides)
    if stripped.endswith(".json"):
        try:
            with open(stripped, encoding="utf-8") as f:
                content = f.read()
        except OSError as exc:
            raise ConfigError(f"preprocess: cannot read spec file {stripped!r}: {exc}") from None
        return replace(PreprocessSpec.from_json(content), **overrides)
    raise ConfigError(
        f"preprocess: {text!r} is neither a preset ({', '.join(sorted(PRESETS))}), nor 'package.module:function', "
        "nor a JSON spec"
    )


def output_shape(spec: PreprocessSpec, channels: int = 3) -> tuple[int, ...] | None:
    """The per-sample shape the spec produces for images, or None when it depends on the image."""
    if spec.function is not None or spec.crop_size is None:
        return None
    side = spec.crop_size
    return (channels, side, side) if spec.layout == "NCHW" else (side, side, channels)


# ---------------------------------------------------------------------------------------------
# Decoding (Pillow, imported lazily)


def _resample(name: str) -> Any:
    from PIL import Image

    return getattr(Image.Resampling, name.upper())


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open with our own pixel limit, checked on the header before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputRejected("zero-byte", "the file is empty")
    with warnings.catch_warnings():
        # Pillow's process-wide limit only warns below 2x; our per-call check below decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as exc:
            raise InputRejected("bomb", str(exc)) from None
        except UnidentifiedImageError:
            raise InputRejected("non-image", f"not a {', '.join(IMAGE_FORMATS)} image ({len(data)} bytes)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InputRejected(_decode_reason(exc), f"{type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InputRejected(
            "bomb", f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} (decompression bomb?)"
        )
    if width < 1 or height < 1:
        raise InputRejected("corrupt", f"image claims size {width}x{height}")
    if image.format == "JPEG":
        _check_jpeg_has_enough_data(data, width, height)
    return image


# A Huffman-coded JPEG spends at least 1 bit per 8x8 block (its DC code) on every component: 512
# pixels per byte for grey, fewer for colour (measured floor of a flat grey 4000x4000 image,
# optimized: 255). libjpeg fills the blocks of a scan that ends early with grey and only warns, so
# a header claiming 9000x9000 over 50 KB of data decoded "fine" to a grey sample.
JPEG_MAX_PIXELS_PER_BYTE = 1024
_JPEG_HUFFMAN_SOF = frozenset(range(0xC0, 0xC4))  # baseline, extended, progressive, lossless


def _jpeg_sof(data: bytes) -> int | None:
    """The SOFn marker byte of a JPEG (None if not found in its header segments)."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _check_jpeg_has_enough_data(data: bytes, width: int, height: int) -> None:
    pixels = width * height
    if len(data) * JPEG_MAX_PIXELS_PER_BYTE < pixels and _jpeg_sof(data) in _JPEG_HUFFMAN_SOF:
        raise InputRejected(
            "truncated",
            f"the JPEG header claims {width}x{height} = {pixels} pixels but the file holds {len(data)} bytes; "
            f"a Huffman-coded JPEG needs at least {pixels // JPEG_MAX_PIXELS_PER_BYTE} for that (1 bit per 8x8 block): "
            "truncated or a forged header, and decoding would fill the missing part with grey",
        )


def _decode_reason(exc: BaseException) -> str:
    text = str(exc).lower()
    if "truncated" in text or isinstance(exc, EOFError) or "premature end" in text:
        return "truncated"
    return "corrupt"


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    from PIL import Image

    values = np.asarray(image).astype(np.int64)
    values = np.clip(values, 0, 65535)
    eight = ((values + 128) // 257).astype(np.uint8)  # exact rounding of v / 257 (65535 -> 255)
    return Image.fromarray(eight, mode="L")


def _to_rgb(image: Image.Image, alpha_background: tuple[int, int, int] | None) -> Image.Image:
    """Every mode our formats produce, deliberately, to 8-bit RGB."""
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        image = _sixteen_bit_to_l(image)
    elif mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), mode="L")
    elif mode == "1":
        image = image.convert("L")
    elif mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    mode = image.mode
    if mode in ("RGBA", "LA", "RGBa", "La"):
        if mode in ("RGBa", "La"):  # premultiplied alpha
            image = image.convert("RGBA")
        if alpha_background is None:
            return image.convert("RGB")
        background = Image.new("RGB", image.size, alpha_background)
        background.paste(image.convert("RGB"), mask=image.getchannel("A"))
        return background
    if mode == "RGB":
        return image
    return image.convert("RGB")  # L, CMYK, YCbCr, ...


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, alpha_background: tuple[int, int, int] | None = None) -> Image.Image:
    """Decode encoded bytes to an RGB PIL image, EXIF orientation applied.

    Raises:
        InputRejected: zero-byte, non-image, bomb, truncated or corrupt data.
    """
    from PIL import ImageOps

    image = _open_checked(data, max_pixels)
    try:
        image.load()
        transposed = ImageOps.exif_transpose(image)
        if transposed is not None:
            image = transposed
        return _to_rgb(image, alpha_background)
    except InputRejected:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, MemoryError) as exc:
        raise InputRejected(_decode_reason(exc), f"{type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Transform


@lru_cache(maxsize=64)
def _lookup_table(pixel_scale: float, mean: tuple[float, ...], std: tuple[float, ...]) -> npt.NDArray[np.float32]:
    """(3, 256) float32: the normalised value of every 8-bit pixel value, per channel.

    The same float32 arithmetic as (pixel * scale - mean) / std, done once per value.
    """
    pixels = np.arange(256, dtype=np.float32)
    rows = [
        (pixels * np.float32(pixel_scale) - np.float32(m)) / np.float32(s) for m, s in zip(mean, std)
    ]
    table = np.stack(rows).astype(np.float32)
    table.flags.writeable = False
    return table


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side = `shorter` (torchvision's Resize(int) rule)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def transform_image(
    image: Image.Image, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> npt.NDArray[Any]:
    """An RGB image -> the model-ready array for one sample (no batch axis).

    Raises InputRejected("bomb") when resizing would exceed `max_pixels` (an extreme aspect ratio:
    a 1 x 100000 image becomes 256 x 25600000).
    """
    if spec.resize_shorter is not None:
        size = resized_size(image.width, image.height, spec.resize_shorter)
        if size[0] * size[1] > max_pixels:
            raise InputRejected(
                "bomb", f"{image.width}x{image.height} resized to {size[0]}x{size[1]} would exceed the limit of "
                f"{max_pixels} pixels (extreme aspect ratio)"
            )
        if size != image.size:
            image = image.resize(size, resample=_resample(spec.interpolation), reducing_gap=None)
    if spec.crop_size is not None:
        side = spec.crop_size
        if image.width < side or image.height < side:
            raise InputRejected("too-small", f"{image.width}x{image.height} is smaller than the {side}x{side} crop")
        top = int(round((image.height - side) / 2.0))
        left = int(round((image.width - side) / 2.0))
        image = image.crop((left, top, left + side, top + side))
    pixels = np.asarray(image, dtype=np.uint8)  # H, W, 3
    if spec.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    table = _lookup_table(spec.pixel_scale, spec.mean, spec.std)
    if spec.layout == "NCHW":
        out = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
        for c in range(3):
            np.take(table[c], pixels[:, :, c], out=out[c])
    else:
        out = np.empty(pixels.shape, dtype=np.float32)
        for c in range(3):
            np.take(table[c], pixels[:, :, c], out=out[:, :, c])
    return out if spec.dtype == "float32" else out.astype(spec.dtype)


# ---------------------------------------------------------------------------------------------
# User functions


def load_function(path: str) -> Callable[[Any], Any]:
    """Import `package.module:function` (attribute paths allowed after the colon).

    Raises:
        ConfigError: malformed, not importable, or not callable.
    """
    if not isinstance(path, str) or not _FUNCTION_PATH.match(path):
        raise ConfigError(f"function must look like 'package.module:function', got {path!r}")
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"function {path!r}: cannot import module {module_name!r} ({exc}); it must be importable on every "
            "worker (install it, or ship it with a Ray runtime_env)"
        ) from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"function {path!r}: {module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise ConfigError(f"function {path!r} is a {type(target).__name__}, not a callable")
    return target  # type: ignore[no-any-return]


_cached_functions: dict[str, Callable[[Any], Any]] = {}


def _function(path: str) -> Callable[[Any], Any]:
    fn = _cached_functions.get(path)
    if fn is None:
        fn = _cached_functions[path] = load_function(path)
    return fn


def _check_output(value: Any, spec: PreprocessSpec, input_name: str, keep_integers: bool) -> dict[str, npt.NDArray[Any]]:
    outputs = dict(value) if isinstance(value, Mapping) else {input_name: value}
    if not outputs:
        raise InputRejected("bad-output", "the preprocessing function returned an empty mapping")
    checked: dict[str, npt.NDArray[Any]] = {}
    for name, array in outputs.items():
        if not isinstance(name, str):
            raise InputRejected("bad-output", f"input names must be strings, got {name!r}")
        arr = np.asarray(array)
        if arr.dtype.kind not in "fiub" or arr.ndim == 0 or arr.size == 0:
            raise InputRejected("bad-output", f"{name!r}: expected a non-empty numeric array, got {arr.dtype} {arr.shape}")
        if arr.dtype.kind == "f" or not keep_integers:
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise InputRejected("bad-output", f"{name!r}: NaN or Inf in the preprocessed array")
            arr = arr.astype(spec.dtype, copy=False)
        checked[name] = np.ascontiguousarray(arr)
    return checked


def preprocess_image_bytes(
    data: bytes,
    spec: PreprocessSpec,
    *,
    input_name: str = "input",
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    timings: dict[str, float] | None = None,
) -> dict[str, npt.NDArray[Any]]:
    """Encoded image bytes -> {input name: array}. Adds seconds to timings["decode"/"transform"].

    Raises:
        InputRejected: the input is unusable (the reason says why).
    """
    import time

    t0 = time.perf_counter()
    image = decode_image(data, max_pixels=max_pixels, alpha_background=spec.alpha_background)
    t1 = time.perf_counter()
    try:
        if spec.function is not None:
            fn = _function(spec.function)
            try:
                produced = fn(image)
            except Exception as exc:
                raise InputRejected("function-error", f"{spec.function} raised {type(exc).__name__}: {exc}") from None
            result = _check_output(produced, spec, input_name, keep_integers=False)
        else:
            result = {input_name: transform_image(image, spec, max_pixels=max_pixels)}
    finally:
        if timings is not None:
            t2 = time.perf_counter()
            timings["decode"] = timings.get("decode", 0.0) + (t1 - t0)
            timings["transform"] = timings.get("transform", 0.0) + (t2 - t1)
    return result


def preprocess_array(
    row: Mapping[str, npt.NDArray[Any]], spec: PreprocessSpec, *, timings: dict[str, float] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """One row of tensor data ({input name: array}) -> model inputs.

    Without a function the spec must be the pass-through `raw` one: floating arrays are cast to
    `spec.dtype`, integer arrays (token ids, ...) keep their type. With a function, it gets the
    array (or the mapping when the row has several arrays).
    """
    import time

    t0 = time.perf_counter()
    try:
        if spec.function is not None:
            fn = _function(spec.function)
            argument: Any = next(iter(row.values())) if len(row) == 1 else dict(row)
            try:
                produced = fn(argument)
            except Exception as exc:
                raise InputRejected("function-error", f"{spec.function} raised {type(exc).__name__}: {exc}") from None
            if not isinstance(produced, Mapping) and len(row) == 1:
                produced = {next(iter(row)): produced}
            return _check_output(produced, spec, next(iter(row)), keep_integers=True)
        if not spec.is_passthrough:
            raise ConfigError(
                "tensor data (.npy/.npz/tensors) is fed as it is: use the 'raw' preset (optionally with a dtype) "
                "or a preprocessing function"
            )
        return _check_output(row, spec, next(iter(row)), keep_integers=True)
    finally:
        if timings is not None:
            timings["transform"] = timings.get("transform", 0.0) + (time.perf_counter() - t0)
