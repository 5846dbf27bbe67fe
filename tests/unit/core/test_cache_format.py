import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trtcal.core import read_trt_cache, trt_version_int, write_trt_cache
from trtcal.errors import CacheFormatError, ConfigError

# Public, real TensorRT cache lines (docs/algorithms.md, "Public cache lines"): (R, i) -> amax = (i + 0.5) * R / 2048.
GOLDEN = [
    ("data", 1.0, 2040, "3c008912"),
    ("prob", 1.0, 2048, "3c010a14"),
    ("sigmoid", 1.0, 2047, "3c00f9f4"),
    ("images", 1.0, 916, "3b66eddc"),
    ("input", 255.0, 2048, "4000890a"),
]


@pytest.mark.parametrize("name,r,i,hexval", GOLDEN)
def test_golden_lines_are_bit_exact(name, r, i, hexval):
    amax = (i + 0.5) * r / 2048
    out = write_trt_cache({name: amax}, trt_version="8.6.1", algorithm="entropy2").decode()
    assert out == f"TRT-8601-EntropyCalibration2\n{name}: {hexval}\n"


def test_minmax_golden():
    assert write_trt_cache({"images": 1.0}, trt_version="10.3.0", algorithm="minmax") == (
        b"TRT-100300-MinMaxCalibration\nimages: 3c010204\n"
    )


@pytest.mark.parametrize(
    "version,expected",
    [("7.0.0", 7000), ("8.6.1", 8601), ("8.2.5", 8205), ("10.3.0", 100300), ("10.16.1", 101601),
     ("10.16.1.11", 101601), ((10, 3, 0), 100300), (101601, 101601), ("9.3", 9300)],
)
def test_version_integers(version, expected):
    assert trt_version_int(version) == expected


def test_bad_versions():
    for bad in ["", "ten", "10.100.0", "-1", 0]:
        with pytest.raises(ConfigError):
            trt_version_int(bad)


def test_reader_accepts_real_world_variants():
    text = (
        "TRT-8205-EntropyCalibration2\r\n"
        "(Unnamed Layer* 22) [Constant]_output: 3a4b050c\r\n"
        "weird:name:with:colons: 3c010a14\r\n"
        "short: 3f8\r\n"
        "\r\n\r\n"
    )
    cache = read_trt_cache(text.encode())
    assert cache.version == 8205 and cache.algorithm == "EntropyCalibration2"
    assert list(cache.scale) == ["(Unnamed Layer* 22) [Constant]_output", "weird:name:with:colons", "short"]
    assert cache.scale["short"] == struct.unpack(">f", bytes.fromhex("000003f8"))[0]
    assert cache.amax["weird:name:with:colons"] == pytest.approx(1.00024414, rel=1e-7)


def test_legacy_header():
    cache = read_trt_cache(b"1\ndata: 3c008912\n")
    assert cache.version is None and cache.algorithm is None and cache.header == "1"


def test_tensorrt_legacy_calibrator_header_is_read():
    # The first line TensorRT 8.5.3's IInt8LegacyCalibrator wrote (quantile 0.9999, cutoff 1.0).
    cache = read_trt_cache(b"0 3ff0000000000000 3fefff2e48e8a71e\ninput: 3c010a14\n")
    assert cache.version is None and cache.algorithm == "LegacyCalibration"
    assert cache.legacy_params == (0.9999, 1.0)
    assert cache.header == "0 3ff0000000000000 3fefff2e48e8a71e"


def test_legacy_cache_is_written_as_tensorrt_writes_it():
    data = write_trt_cache({"input": 1.0}, trt_version="8.5.3", algorithm="legacy")
    assert data == b"0 3ff0000000000000 3fefff2e48e8a71e\ninput: 3c010204\n"
    other = write_trt_cache({"input": 1.0}, trt_version="10.16.1", algorithm="legacy", legacy_params=(0.5, 0.5))
    assert other.split(b"\n")[0] == b"0 3fe0000000000000 3fe0000000000000"
    assert read_trt_cache(other).legacy_params == (0.5, 0.5)


def test_round_trip_is_bit_exact():
    rng = np.random.default_rng(0)
    amax = {f"t{i} [x]": float(v) for i, v in enumerate(rng.uniform(1e-6, 1e4, 200))}
    data = write_trt_cache(amax, trt_version="10.16.1", algorithm="entropy2")
    cache = read_trt_cache(data)
    again = write_trt_cache(cache.amax, trt_version="10.16.1", algorithm="EntropyCalibration2")
    assert again == data


@pytest.mark.parametrize(
    "data,line,reason",
    [
        (b"", 1, "empty"),
        (b"TRT-abc-EntropyCalibration2\n", 1, "header"),
        (b"TRT-8601\n", 1, "header"),
        (b"hello\n", 1, "header"),
        (b"TRT-8601-EntropyCalibration2\nno colon here\n", 2, "tensor: hexscale"),
        (b"TRT-8601-EntropyCalibration2\nx: zz\n", 2, "hexadecimal"),
        (b"TRT-8601-EntropyCalibration2\nx: 123456789\n", 2, "hexadecimal"),
        (b"TRT-8601-EntropyCalibration2\nx: 3c010a14\nx: 3c010a14\n", 3, "twice"),
        (b"TRT-8601-EntropyCalibration2\nx: 7f800000\n", 2, "finite"),
        (b"TRT-8601-EntropyCalibration2\nx: bf800000\n", 2, "positive"),
        (b"TRT-8601-EntropyCalibration2\nx: 0\n", 2, "positive"),
        (b"TRT-8601-EntropyCalibration2\na: 3c010a14\n\nb: 3c010a14\n", 3, "blank"),
        (b"TRT-8601-EntropyCalibration2\n\xff\xfe: 3c010a14\n", 2, "UTF-8"),
    ],
)
def test_malformed_inputs_name_the_line(data, line, reason):
    with pytest.raises(CacheFormatError, match=reason) as info:
        read_trt_cache(data)
    assert info.value.line == line
    assert f"line {line}" in str(info.value)


def test_writer_refuses_unwritable_names_and_values():
    for bad in ["", "a\nb", " lead", "nul\x00"]:
        with pytest.raises(ConfigError):
            write_trt_cache({bad: 1.0}, trt_version="10.0.0", algorithm="minmax")
    for value in [0.0, -1.0, float("nan"), float("inf")]:
        with pytest.raises(ConfigError, match="amax"):
            write_trt_cache({"x": value}, trt_version="10.0.0", algorithm="minmax")
    with pytest.raises(ConfigError, match="unknown calibration algorithm"):
        write_trt_cache({"x": 1.0}, trt_version="10.0.0", algorithm="kl")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_reader_only_raises_cache_format_error(data):
    try:
        read_trt_cache(data)
    except CacheFormatError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(min_size=0, max_size=30), st.text(alphabet="0123456789abcdefABCDEFxg: \r", max_size=12)),
        max_size=8,
    ),
    st.sampled_from(["TRT-8601-EntropyCalibration2", "1", "TRT-100300-MinMaxCalibration", "TRT--x"]),
)
def test_fuzz_structured_reader(lines, header):
    text = header + "\n" + "\n".join(f"{a}: {b}" for a, b in lines)
    try:
        read_trt_cache(text.encode("utf-8", "surrogatepass"))
    except (CacheFormatError, UnicodeEncodeError):
        pass
