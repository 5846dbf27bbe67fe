"""TensorRT calibration cache codec (text: `TRT-<version>-<Algo>` header, `name: %08x` lines).

Values are the big-endian bit pattern of the float32 scale = float32(amax) / 127
(docs/algorithms.md, "TensorRT calibration cache format"). The reader is lenient where real caches
vary (legacy `1` header, names with spaces, colons, `*`, brackets; 1-8 hex digits; CRLF; trailing
blank lines) and strict everywhere else: malformed input raises CacheFormatError with the line number.

TensorRT's legacy calibrator writes no `TRT-` header: TensorRT 8.5.3 wrote
`0 3ff0000000000000 3fefff2e48e8a71e`, that is "0" and the regression cutoff (1.0) and the
quantile (0.9999) as the hex bit patterns of IEEE doubles (docs/tensorrt.md). trtcal writes and
reads that form for `legacy` (TrtCache.legacy_params holds the two numbers).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from trtcal.errors import CacheFormatError, ConfigError

__all__ = [
    "ALGORITHM_HEADERS",
    "TrtCache",
    "trt_version_int",
    "header_algorithm",
    "scale_to_hex",
    "hex_to_scale",
    "write_trt_cache",
    "read_trt_cache",
    "retarget_trt_cache",
    "legacy_header",
]

# trtcal method -> the calibrator whose header a cache must carry for TensorRT to accept it.
# percentile/mse/legacy results are served through an EntropyCalibration2 calibrator by default
# (what trtexec --calib uses); `algorithm=` may name any header explicitly.
ALGORITHM_HEADERS: Mapping[str, str] = {
    "entropy2": "EntropyCalibration2",
    "minmax": "MinMaxCalibration",
    "entropy": "EntropyCalibration",  # suffix seen in TensorRT 8.5.3's own caches (docs/tensorrt.md)
    "legacy": "LegacyCalibration",  # written as TensorRT's `0 <cutoff> <quantile>` line, not TRT-…
    "percentile": "EntropyCalibration2",
    "mse": "EntropyCalibration2",
    "auto": "EntropyCalibration2",  # per-tensor choice; the header only gates replay (docs/algorithms.md)
}
_KNOWN_HEADER_NAMES = frozenset(ALGORITHM_HEADERS.values())

_HEX = re.compile(r"[0-9a-fA-F]{1,8}")
_LEGACY_HEADER = re.compile(r"0 ([0-9a-fA-F]{16}) ([0-9a-fA-F]{16})")
LEGACY_ALGORITHM = "LegacyCalibration"
DEFAULT_LEGACY_PARAMS = (0.9999, 1.0)  # (quantile, regression_cutoff): scales.amax_legacy's defaults
_VERSION = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.(\d+))?")
MAX_CACHE_BYTES = 256 << 20  # a cache is a few KB; refuse absurd inputs before decoding them


@dataclass(frozen=True)
class TrtCache:
    """A decoded calibration cache. `scale` and `amax` keep the file's tensor order."""

    version: int | None  # the header's integer (None for the `1` and the legacy calibrator's header)
    algorithm: str | None  # e.g. "EntropyCalibration2" (None for the old `1` header)
    scale: dict[str, float] = field(default_factory=dict)
    legacy_params: tuple[float, float] | None = None  # (quantile, regression_cutoff) of a legacy header

    @property
    def header(self) -> str:
        if self.legacy_params is not None:
            return legacy_header(*self.legacy_params)
        return "1" if self.version is None else f"TRT-{self.version}-{self.algorithm}"

    @property
    def amax(self) -> dict[str, float]:
        # float32 multiply, as ONNX Runtime's TensorRT EP decodes the table.
        return {name: float(np.float32(s) * np.float32(127.0)) for name, s in self.scale.items()}


def trt_version_int(version: str | int | tuple[int, ...]) -> int:
    """NV_TENSORRT_VERSION for a version: ≤9.x major*1000+minor*100+patch, ≥10 major*10000+minor*100+patch.

    Accepts "10.16.1", "10.16.1.11" (build ignored), (10, 3, 0), or an already-encoded int.
    """
    if isinstance(version, int):
        if version <= 0:
            raise ConfigError(f"TensorRT version integer must be positive, got {version}")
        return version
    if isinstance(version, tuple):
        parts = [int(p) for p in version[:3]]
    else:
        m = _VERSION.fullmatch(str(version).strip())
        if not m:
            raise ConfigError(f"trt_version must look like 10.16.1, got {version!r}")
        parts = [int(g) for g in m.groups()[:3] if g is not None]
    major, minor, patch = (parts + [0, 0, 0])[:3]
    if not (1 <= major and 0 <= minor <= 99 and 0 <= patch <= 99):
        raise ConfigError(f"unsupported TensorRT version {version!r}")
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def header_algorithm(algorithm: str) -> str:
    """Header suffix for a trtcal method name or a TensorRT header name."""
    if algorithm in ALGORITHM_HEADERS:
        return ALGORITHM_HEADERS[algorithm]
    if algorithm in _KNOWN_HEADER_NAMES:
        return algorithm
    raise ConfigError(
        f"unknown calibration algorithm {algorithm!r}; use one of {sorted(ALGORITHM_HEADERS)} "
        f"or a TensorRT header name {sorted(_KNOWN_HEADER_NAMES)}"
    )


def legacy_header(quantile: float, regression_cutoff: float) -> str:
    """TensorRT's legacy-calibrator first line: `0 <cutoff> <quantile>`, IEEE doubles in hex."""
    return f"0 {struct.pack('>d', float(regression_cutoff)).hex()} {struct.pack('>d', float(quantile)).hex()}"


def scale_to_hex(scale: float) -> str:
    return format(struct.unpack(">I", struct.pack(">f", scale))[0], "08x")


def hex_to_scale(text: str) -> float:
    return float(struct.unpack(">f", struct.pack(">I", int(text, 16)))[0])


def write_trt_cache(
    amax_by_tensor: Mapping[str, float],
    *,
    trt_version: str | int | tuple[int, ...],
    algorithm: str,
    legacy_params: tuple[float, float] = DEFAULT_LEGACY_PARAMS,
) -> bytes:
    """Encode a TensorRT calibration cache, tensors in the mapping's order.

    `legacy` gets TensorRT's legacy header built from `legacy_params` (quantile, regression
    cutoff); every other algorithm `TRT-<version>-<Algorithm>`.
    Raises ConfigError for names TensorRT's text format cannot carry (empty, newline, NUL,
    surrounding spaces) and for amax values that are not finite and positive.
    """
    algo = header_algorithm(algorithm)
    if algo == LEGACY_ALGORITHM:
        trt_version_int(trt_version)  # still validated: the caller's version must make sense
        lines = [legacy_header(*legacy_params)]
    else:
        lines = [f"TRT-{trt_version_int(trt_version)}-{algo}"]
    for name, amax in amax_by_tensor.items():
        if not isinstance(name, str) or not name or name != name.strip() or any(c in name for c in "\r\n\x00"):
            raise ConfigError(f"tensor name {name!r} cannot be written to a calibration cache")
        value = float(amax)
        if not (np.isfinite(value) and value > 0.0):
            raise ConfigError(f"amax of tensor {name!r} must be finite and > 0, got {amax!r}")
        scale = np.float32(np.float32(value) / np.float32(127.0))
        if not (np.isfinite(scale) and scale > 0):
            raise ConfigError(f"amax of tensor {name!r} ({value!r}) gives no positive float32 scale")
        lines.append(f"{name}: {scale_to_hex(float(scale))}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def _parse_header(line: str) -> tuple[int | None, str | None]:
    if line == "1":
        return None, None
    if _LEGACY_HEADER.fullmatch(line):
        return None, LEGACY_ALGORITHM
    if not line.startswith("TRT-"):
        raise CacheFormatError(f"header {line[:80]!r} is not 'TRT-<version>-<Algorithm>' (nor the legacy '1')", line=1)
    version_text, sep, algo = line[4:].partition("-")
    if not sep or not version_text.isdigit() or not algo or not algo.isidentifier():
        raise CacheFormatError(f"header {line[:80]!r} is not 'TRT-<version>-<Algorithm>'", line=1)
    if len(version_text) > 9:
        raise CacheFormatError(f"header version {version_text[:20]!r} is too long", line=1)
    return int(version_text), algo


def read_trt_cache(data: bytes) -> TrtCache:
    """Decode a TensorRT calibration cache. Raises CacheFormatError (with a line number) if malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CacheFormatError(f"cache must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > MAX_CACHE_BYTES:
        raise CacheFormatError(f"cache is {len(raw)} bytes; refusing anything over {MAX_CACHE_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw[: exc.start].count(b"\n") + 1
        raise CacheFormatError("not UTF-8 text; is this a TensorRT calibration cache?", line=bad_line) from None
    lines = text.split("\n")
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise CacheFormatError("empty cache (no header line)", line=1)
    version, algorithm = _parse_header(lines[0])
    legacy = _LEGACY_HEADER.fullmatch(lines[0])
    legacy_params = None
    if legacy:
        cutoff, quantile = (struct.unpack(">d", bytes.fromhex(g))[0] for g in legacy.groups())
        legacy_params = (quantile, cutoff)
    scales: dict[str, float] = {}
    for line_no, line in enumerate(lines[1:], start=2):
        if line == "":
            raise CacheFormatError("blank line inside the table", line=line_no)
        if "\x00" in line:
            raise CacheFormatError("NUL character in line", line=line_no)
        name, sep, value = line.rpartition(":")
        if not sep or not name:
            raise CacheFormatError(f"expected 'tensor: hexscale', got {line[:80]!r}", line=line_no)
        value = value.strip()
        if not _HEX.fullmatch(value):
            raise CacheFormatError(f"value {value[:20]!r} is not 1-8 hexadecimal digits", line=line_no)
        if name in scales:
            raise CacheFormatError(f"tensor {name[:80]!r} appears twice", line=line_no)
        scale = hex_to_scale(value)
        if not (np.isfinite(scale) and scale > 0.0):
            raise CacheFormatError(f"scale {value} of tensor {name[:80]!r} is not finite and positive ({scale!r})", line=line_no)
        scales[name] = scale
    return TrtCache(version=version, algorithm=algorithm, scale=scales, legacy_params=legacy_params)


def retarget_trt_cache(
    data: bytes, *, trt_version: str | int | tuple[int, ...], algorithm: str | None = None, require_tensors: bool = False
) -> bytes:
    """The same cache with header `TRT-<version>-<Algorithm>`, entries re-emitted bit for bit.

    TensorRT ignores a cache whose header names another version or calibrator; the scales do not
    depend on either. Entries keep their exact float32 bits (re-deriving them from amax would move
    ~3% of them by one ulp), so only the header and formatting (padding, CRLF) can change.
    `algorithm` is a trtcal method or a TensorRT header name; None keeps the cache's own.
    `require_tensors`: an empty table is a CacheFormatError (a cache TensorRT is to replay).
    """
    cache = read_trt_cache(data)
    if require_tensors and not cache.scale:
        raise CacheFormatError("the calibration cache holds no tensors; nothing to replay")
    if algorithm is None:
        if cache.algorithm is None:
            raise ConfigError("the stored cache has the legacy '1' header with no calibrator name; pass algorithm=")
        try:
            header = header_algorithm(cache.algorithm)
        except ConfigError:  # the name came from the stored file, not from the caller
            raise CacheFormatError(f"the stored cache names an unknown calibrator {cache.algorithm!r} in its header") from None
    else:
        header = header_algorithm(algorithm)
    if header == LEGACY_ALGORITHM:  # TensorRT's legacy calibrator reads its own `0 <cutoff> <quantile>` line
        lines = [legacy_header(*(cache.legacy_params or DEFAULT_LEGACY_PARAMS))]
    else:
        lines = [f"TRT-{trt_version_int(trt_version)}-{header}"]
    lines.extend(f"{name}: {scale_to_hex(scale)}" for name, scale in cache.scale.items())
    return ("\n".join(lines) + "\n").encode("utf-8")
