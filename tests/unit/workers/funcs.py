"""Preprocessing functions loaded by import path in tests (`tests.unit.workers.funcs:<name>`)."""

from __future__ import annotations

from typing import Any

import numpy as np

NOT_CALLABLE = 3


def small_gray(image: Any) -> np.ndarray:
    """A 32x32 greyscale thumbnail in [0, 1], CHW."""
    thumb = image.convert("L").resize((32, 32))
    return (np.asarray(thumb, dtype=np.float64) / 255.0)[None]


def two_inputs(image: Any) -> dict[str, np.ndarray]:
    arr = np.asarray(image.resize((8, 8)), dtype=np.float32)
    return {"pixels": arr, "mean_rgb": arr.mean(axis=(0, 1))}


def returns_nan(image: Any) -> np.ndarray:
    return np.full((2, 2), np.nan, dtype=np.float32)


def raises(image: Any) -> np.ndarray:
    raise RuntimeError("boom")


def scale_rows(array: np.ndarray) -> np.ndarray:
    return array * 2


def word_ids(text: str) -> dict[str, list[int]]:
    """A text tokenizer by import path: one id per word (a stable hash of the lower-cased word, 1..999)."""
    import zlib

    ids = [1 + zlib.crc32(word.lower().encode("utf-8")) % 999 for word in text.split()]
    return {"input_ids": [101, *ids, 102], "token_type_ids": [0] * (len(ids) + 2)}
