"""Real photos from skimage.data, encoded in memory or written to a folder for worker tests (never committed)."""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "moon", "coins", "cat")


@functools.cache
def photo(name: str) -> npt.NDArray[np.uint8]:
    """A scikit-image sample photo as uint8 (H, W, 3) or (H, W) for greyscale ones."""
    import skimage.data

    return np.ascontiguousarray(np.asarray(getattr(skimage.data, name)(), dtype=np.uint8))


def encode(image: Any, fmt: str, **params: Any) -> bytes:
    """A PIL image or an array encoded as JPEG/PNG/WEBP/BMP bytes."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def write_photo_folder(root: Path, *, classes: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """ImageNet-like class folders of real photos (JPEG and PNG); returns the relative paths."""
    classes = classes or {
        "n01": ("astronaut", "chelsea", "coffee"),
        "n02": ("rocket", "camera", "cat"),
        "n03": ("moon", "coins"),
    }
    written = []
    for cls, names in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            for ext, fmt, params in ((".JPEG", "JPEG", {"quality": 90}), (".png", "PNG", {})):
                rel = f"{cls}/{name}{ext}"
                (root / rel).write_bytes(encode(photo(name), fmt, **params))
                written.append(rel)
    return sorted(written)


def bomb_png(side: int = 12000) -> bytes:
    """A PNG of side x side pixels (144 M for the default) that is ~20 KB on disk."""
    from PIL import Image

    return encode(Image.new("1", (side, side)), "PNG")
