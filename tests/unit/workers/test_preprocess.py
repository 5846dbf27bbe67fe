"""PreprocessSpec, decoding (modes, EXIF, bad inputs) and the transform, on real photos."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from tests.fixtures import data as reference_data
from tests.unit.workers.images import bomb_png, encode, photo
from trtcal.errors import ConfigError
from trtcal.workers.preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    PRESETS,
    InputRejected,
    PreprocessSpec,
    decode_image,
    load_function,
    output_shape,
    parse_preprocess,
    preprocess_array,
    preprocess_image_bytes,
    preset,
    resized_size,
    transform_image,
)

# -- the spec


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("resize_shorter", 0),
        ("resize_shorter", 2.5),
        ("crop_size", True),
        ("interpolation", "cubic"),
        ("layout", "CHW"),
        ("dtype", "float64"),
        ("channel_order", "RGBA"),
        ("pixel_scale", 0),
        ("pixel_scale", float("nan")),
        ("mean", (1.0, 2.0)),
        ("std", (1.0, 0.0, 1.0)),
        ("alpha_background", (0, 0, 256)),
        ("function", "not a path"),
        ("function", "/tmp/evil.py:run"),
    ],
)
def test_invalid_fields_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        PreprocessSpec(**{field: value})


def test_crop_larger_than_resize_is_refused():
    with pytest.raises(ConfigError, match="crop_size"):
        PreprocessSpec(resize_shorter=200, crop_size=224)


def test_json_is_canonical_and_round_trips():
    spec = PreprocessSpec(mean=(1, 2, 3), std=[4, 5, 6], alpha_background=[1, 2, 3], layout="NHWC")
    text = spec.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert json.loads(text)["mean"] == [1.0, 2.0, 3.0]  # ints normalised: 1 and 1.0 key alike
    assert PreprocessSpec.from_json(text) == spec
    assert PreprocessSpec.from_json(text).to_json() == text
    assert PreprocessSpec(mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), alpha_background=(1, 2, 3), layout="NHWC").to_json() == text
    with pytest.raises(ConfigError, match="unknown"):
        PreprocessSpec.from_dict({**spec.to_dict(), "extra": 1})


def test_presets():
    imagenet, lite, raw = PRESETS["imagenet"], PRESETS["efficientnet-lite"], PRESETS["raw"]
    assert (imagenet.resize_shorter, imagenet.crop_size, imagenet.interpolation) == (256, 224, "bilinear")
    assert imagenet.mean == (0.485, 0.456, 0.406) and imagenet.std == (0.229, 0.224, 0.225)
    assert (imagenet.layout, imagenet.dtype, imagenet.channel_order) == ("NCHW", "float32", "RGB")
    # The model card of efficientnet_lite0.onnx: bicubic, (x - 127) / 128.
    assert (lite.resize_shorter, lite.crop_size, lite.interpolation) == (256, 224, "bicubic")
    assert (lite.pixel_scale, lite.mean, lite.std) == (1.0, (127.0,) * 3, (128.0,) * 3)
    assert raw.is_passthrough and not imagenet.is_passthrough
    assert output_shape(imagenet) == (3, 224, 224)
    assert output_shape(preset("imagenet", layout="NHWC")) == (224, 224, 3)
    assert output_shape(raw) is None


def test_parse_preprocess(tmp_path):
    assert parse_preprocess("imagenet") == PRESETS["imagenet"]
    assert parse_preprocess("efficientnet-lite", layout="NHWC", dtype=None).layout == "NHWC"
    spec = parse_preprocess("tests.unit.workers.funcs:small_gray")
    assert spec.function == "tests.unit.workers.funcs:small_gray"
    text = PreprocessSpec(crop_size=200).to_json()
    assert parse_preprocess(text).crop_size == 200
    path = tmp_path / "spec.json"
    path.write_text(text)
    assert parse_preprocess(str(path)) == PreprocessSpec(crop_size=200)
    with pytest.raises(ConfigError, match="neither a preset"):
        parse_preprocess("imagenet-21k")


# -- geometry and values


def test_resize_follows_torchvision_rule():
    # torchvision Resize(256): the longer side is int(256 * long / short), truncated.
    assert resized_size(451, 300, 256) == (384, 256)
    assert resized_size(300, 451, 256) == (256, 384)
    assert resized_size(600, 400, 256) == (384, 256)
    assert resized_size(256, 256, 256) == (256, 256)


@pytest.mark.parametrize("name", ["coffee", "astronaut"])
def test_efficientnet_lite_matches_the_models_reference_preprocessing(name):
    # tests/fixtures/data.py's preprocess is the model card's recipe written independently; for these
    # photos its rounding choices agree with torchvision's, so the arrays must be bit-identical.
    png = encode(photo(name), "PNG")
    out = preprocess_image_bytes(png, PRESETS["efficientnet-lite"])["input"]
    expected = reference_data.preprocess(photo(name))
    assert out.dtype == np.float32 and out.shape == (3, 224, 224)
    assert np.array_equal(out, expected)


def _slow_reference(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    w, h = image.size
    s = spec.resize_shorter
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[spec.interpolation]
    image = image.resize(size, resample, reducing_gap=None)
    c = spec.crop_size
    top, left = int(round((size[1] - c) / 2.0)), int(round((size[0] - c) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + c, top + c)), dtype=np.float32)
    out = np.empty((3, c, c), dtype=np.float32)
    for k in range(3):
        x = pixels[:, :, k] * np.float32(spec.pixel_scale)
        out[k] = (x - np.float32(spec.mean[k])) / np.float32(spec.std[k])
    return out


@pytest.mark.parametrize("name", ["chelsea", "rocket", "coffee"])
def test_imagenet_matches_a_slow_reference(name):
    image = Image.fromarray(photo(name))
    spec = PRESETS["imagenet"]
    got = transform_image(image, spec)
    assert np.array_equal(got, _slow_reference(image, spec))


def test_layout_dtype_and_channel_order():
    image = Image.fromarray(photo("chelsea"))
    nchw = transform_image(image, PRESETS["imagenet"])
    nhwc = transform_image(image, preset("imagenet", layout="NHWC"))
    assert np.array_equal(nhwc, nchw.transpose(1, 2, 0))
    half = transform_image(image, preset("imagenet", dtype="float16"))
    assert half.dtype == np.float16 and np.array_equal(half, nchw.astype(np.float16))
    raw_rgb = transform_image(image, PRESETS["raw"])
    raw_bgr = transform_image(image, preset("raw", channel_order="BGR"))
    assert np.array_equal(raw_bgr, raw_rgb[::-1])
    assert np.array_equal(raw_rgb, np.asarray(image, dtype=np.float32).transpose(2, 0, 1))


# -- modes, handled deliberately


def test_grayscale_and_one_bit_become_rgb():
    camera = decode_image(encode(photo("camera"), "PNG"))
    assert camera.mode == "RGB"
    arr = np.asarray(camera)
    assert np.array_equal(arr[:, :, 0], photo("camera")) and np.array_equal(arr[:, :, 0], arr[:, :, 2])
    bits = Image.fromarray(photo("camera") > 128)
    assert bits.mode == "1"
    decoded = np.asarray(decode_image(encode(bits, "PNG")))
    assert set(np.unique(decoded)) <= {0, 255}


def test_sixteen_bit_greyscale_is_rounded_to_eight_bits():
    values = np.array([[0, 128, 129, 257, 385, 386, 65535, 65280]], dtype=np.uint16)
    image = Image.fromarray(values)
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    decoded = np.asarray(decode_image(data))[:, :, 0]
    assert decoded.tolist() == [[0, 0, 1, 1, 1, 2, 255, 254]]  # round(v / 257)


def test_cmyk_goes_through_pillows_conversion():
    cmyk = Image.fromarray(photo("coffee")).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    decoded = decode_image(data)
    expected = Image.open(io.BytesIO(data)).convert("RGB")
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.asarray(expected))


def test_palette_with_transparency_and_alpha_policy():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere...
    rgba[:2, :, 3] = 0  # ...transparent on the top half
    rgba[2:, :, 3] = 255
    palette = Image.fromarray(rgba, "RGBA").convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    data = encode(palette, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    dropped = np.asarray(decode_image(data))
    assert dropped[0, 0].tolist() == dropped[3, 3].tolist()  # alpha dropped: colour kept
    white = np.asarray(decode_image(data, alpha_background=(255, 255, 255)))
    assert white[0, 0].tolist() == [255, 255, 255] and white[3, 3].tolist() == dropped[3, 3].tolist()
    la = Image.fromarray(np.dstack([photo("camera"), photo("camera")]), "LA")
    assert decode_image(encode(la, "PNG")).mode == "RGB"


def test_exif_orientation_is_applied():
    image = Image.fromarray(photo("chelsea"))  # 451 x 300
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    plain = Image.open(io.BytesIO(data))
    plain.load()
    decoded = decode_image(data)
    assert decoded.size == (300, 451)
    assert np.array_equal(np.asarray(decoded), np.asarray(plain.transpose(Image.Transpose.ROTATE_270)))


def test_webp_and_bmp_decode():
    for fmt in ("WEBP", "BMP"):
        assert decode_image(encode(photo("rocket"), fmt)).size == (640, 427)


# -- bad inputs


def _reason(data: bytes, **kwargs) -> str:
    with pytest.raises(InputRejected) as info:
        decode_image(data, **kwargs)
    return info.value.reason


def test_bad_inputs_have_reasons():
    jpeg = encode(photo("coffee"), "JPEG", quality=90)
    png = encode(photo("coffee"), "PNG")
    assert _reason(b"") == "zero-byte"
    assert _reason(jpeg[: len(jpeg) // 2]) == "truncated"
    assert _reason(png[: len(png) // 2]) == "truncated"
    assert _reason(b"this is a text file, named .jpg\n") == "non-image"
    assert _reason(encode(photo("coffee"), "TIFF")) == "non-image"  # not one of our formats
    damaged = png[:3000] + bytes(range(256)) * 20 + png[3000 + 5120 :]
    assert _reason(damaged) == "corrupt"


def test_decompression_bomb_is_refused_per_call_without_touching_pillow_globals():
    before_limit = Image.MAX_IMAGE_PIXELS
    before_filters = list(warnings.filters)
    bomb = bomb_png()
    assert len(bomb) < 100_000
    with pytest.raises(InputRejected) as info:
        decode_image(bomb)
    assert info.value.reason == "bomb" and "144000000" in info.value.detail
    # A per-call limit: a normal photo is a bomb under a tiny limit, fine under the default.
    coffee = encode(photo("coffee"), "PNG")
    assert _reason(coffee, max_pixels=1000) == "bomb"
    assert decode_image(coffee).size == (600, 400)
    assert Image.MAX_IMAGE_PIXELS == before_limit == DEFAULT_MAX_IMAGE_PIXELS
    assert list(warnings.filters) == before_filters


def test_too_small_for_the_crop_without_resize():
    spec = PreprocessSpec(resize_shorter=None, crop_size=224)
    tiny = encode(np.zeros((100, 300, 3), dtype=np.uint8), "PNG")
    with pytest.raises(InputRejected, match="too-small"):
        preprocess_image_bytes(tiny, spec)


# -- functions and tensors


def test_load_function_by_import_path_only():
    assert load_function("tests.unit.workers.funcs:small_gray").__name__ == "small_gray"
    assert load_function("numpy:linalg.norm") is np.linalg.norm
    with pytest.raises(ConfigError, match="cannot import"):
        load_function("no_such_package_xyz.mod:f")
    with pytest.raises(ConfigError, match="no attribute"):
        load_function("tests.unit.workers.funcs:missing")
    with pytest.raises(ConfigError, match="not a callable"):
        load_function("tests.unit.workers.funcs:NOT_CALLABLE")
    with pytest.raises(ConfigError):
        load_function("tests/unit/workers/funcs.py:small_gray")


def test_function_outputs_are_checked_and_cast():
    data = encode(photo("astronaut"), "JPEG")
    out = preprocess_image_bytes(data, parse_preprocess("tests.unit.workers.funcs:small_gray"))
    assert out["input"].dtype == np.float32 and out["input"].shape == (1, 32, 32)
    two = preprocess_image_bytes(data, parse_preprocess("tests.unit.workers.funcs:two_inputs", dtype="float16"))
    assert sorted(two) == ["mean_rgb", "pixels"] and two["pixels"].dtype == np.float16
    with pytest.raises(InputRejected, match="bad-output"):
        preprocess_image_bytes(data, parse_preprocess("tests.unit.workers.funcs:returns_nan"))
    with pytest.raises(InputRejected, match="function-error.*boom"):
        preprocess_image_bytes(data, parse_preprocess("tests.unit.workers.funcs:raises"))


def test_tensor_rows_pass_through_raw():
    floats = {"input": np.arange(6, dtype=np.float64).reshape(2, 3)}
    assert preprocess_array(floats, PRESETS["raw"])["input"].dtype == np.float32
    ids = {"tokens": np.arange(4, dtype=np.int64)}
    assert preprocess_array(ids, preset("raw", dtype="float16"))["tokens"].dtype == np.int64
    doubled = preprocess_array(floats, parse_preprocess("tests.unit.workers.funcs:scale_rows"))
    assert np.array_equal(doubled["input"], (floats["input"] * 2).astype(np.float32))
    with pytest.raises(ConfigError, match="raw"):
        preprocess_array(floats, PRESETS["imagenet"])


def test_timings_are_accumulated():
    timings: dict[str, float] = {}
    preprocess_image_bytes(encode(photo("coffee"), "JPEG"), PRESETS["imagenet"], timings=timings)
    assert timings["decode"] > 0 and timings["transform"] > 0
