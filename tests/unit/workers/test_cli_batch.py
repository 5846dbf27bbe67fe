"""`trtcal batch build` options map onto BatchConfig without starting Ray; None means the config's default."""

from __future__ import annotations

import pytest

from trtcal.cli import build_parser
from trtcal.cli.cmd_batch import batch_config_from_args
from trtcal.config import BatchConfig
from trtcal.errors import ConfigError
from trtcal.workers.preprocess import PRESETS, preset


def _config(*extra: str) -> BatchConfig:
    args = build_parser().parse_args(["batch", "build", "--data", "d", "-o", "o.arrow", *extra])
    return batch_config_from_args(args)


def test_defaults_come_from_the_dataclass():
    assert _config() == BatchConfig()


def test_options_map_onto_the_config():
    config = _config(
        "--num-samples", "all", "--seed", "9", "--preprocess", "efficientnet-lite", "--layout", "NHWC",
        "--workers", "3", "--on-bad-input", "skip", "--stratify", "--input-name", "images",
        "--max-image-pixels", "1000000",
    )
    assert config == BatchConfig(
        num_samples=None, seed=9, preprocess=preset("efficientnet-lite", layout="NHWC"), workers=3,
        on_bad_input="skip", stratify=True, input_name="images", max_image_pixels=1_000_000,
    )
    assert _config("--dtype", "float16").preprocess == preset("imagenet", dtype="float16")
    assert _config("--preprocess", "raw").preprocess == PRESETS["raw"]


@pytest.mark.parametrize(
    "extra", [("--num-samples", "0"), ("--workers", "0"), ("--preprocess", "nope"), ("--seed", "-1")]
)
def test_bad_values_are_config_errors(extra):
    with pytest.raises(ConfigError):
        _config(*extra)


def test_storage_options():
    """`batch` parses --storage-option like every other subcommand (tests/unit/cli/test_storage_options.py)."""
    from trtcal.cli._options import parse_storage_options

    args = build_parser().parse_args(["batch", "show", "b.arrow", "--storage-option", "anon=false",
                                      "--storage-option", "endpoint_url=http://127.0.0.1:9000"])
    assert parse_storage_options(args.storage_option) == {"anon": False, "endpoint_url": "http://127.0.0.1:9000"}
