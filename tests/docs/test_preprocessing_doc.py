"""docs/preprocessing.md documents every preset and every spec field (issue 15 item 8)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from trtcal.workers.preprocess import PRESETS, PreprocessSpec

DOC = Path(__file__).resolve().parents[2] / "docs" / "preprocessing.md"


def test_every_preset_and_field_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    for name in PRESETS:
        assert f"`{name}`" in text, name
    for f in fields(PreprocessSpec):
        assert re.search(rf"^\| `{f.name}`", text, re.MULTILINE), f.name


def test_the_preset_table_shows_the_real_defaults() -> None:
    text = DOC.read_text(encoding="utf-8")
    rows: dict[str, str] = {}
    for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", text, re.MULTILINE):
        rows.setdefault(m.group(1), m.group(2))  # the presets table comes first
    assert rows["resize_shorter"].strip() == str(PRESETS["imagenet"].resize_shorter)
    assert rows["crop_size"].strip() == str(PRESETS["imagenet"].crop_size)
    assert rows["interpolation"].strip() == f'`"{PRESETS["imagenet"].interpolation}"`'
    assert PRESETS["efficientnet-lite"].mean == (127.0, 127.0, 127.0) and "[127, 127, 127]" in text


def test_readme_uses_the_efficientnet_lite_preset_and_the_real_store_path() -> None:
    readme = (DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    assert "efficientnet_lite0.onnx --data ./images/ --num-samples 500 --seed 0 --preprocess efficientnet-lite" in readme
    assert "$TRTCAL_CACHE_DIR/store" in readme and "~/.cache/trtcal/store" in readme
