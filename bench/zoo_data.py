"""Real inputs for the model-zoo bench (bench_zoo.py): photos, rendered text lines and pages.

Text is real English prose: the GPL-3 licence text calibrates and the Apache-2.0 licence text
evaluates (Debian's /usr/share/common-licenses; the docstrings of disjoint standard-library modules
where those files are missing). It is rendered with real TrueType fonts (DejaVu, or Pillow's
bundled font) onto lightened crops of real scikit-image photos. Calibration and evaluation use
disjoint texts, photos and seeds.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

CALIB_PHOTOS = ("astronaut", "rocket", "camera", "brick", "grass", "moon", "gravel", "hubble_deep_field")
EVAL_PHOTOS = ("coffee", "chelsea", "coins", "clock", "retina", "immunohistochemistry")
CALIB_TEXT = ("/usr/share/common-licenses/GPL-3", ("json", "textwrap", "argparse", "logging", "pathlib"))
EVAL_TEXT = ("/usr/share/common-licenses/Apache-2.0", ("csv", "shutil", "subprocess", "typing", "unittest"))
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif-Italic.ttf")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def photo(name: str) -> np.ndarray:
    from skimage import data

    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def text_lines(split: str, count: int, max_chars: int = 28) -> list[str]:
    """`count` real lines of prose, each at most `max_chars` long, cut at word boundaries."""
    path, modules = CALIB_TEXT if split == "calib" else EVAL_TEXT
    if Path(path).is_file():
        words = Path(path).read_text(encoding="utf-8", errors="replace").split()
    else:
        import importlib

        words = " ".join(importlib.import_module(m).__doc__ or "" for m in modules).split()
    words = [w for w in words if re.fullmatch(r"[\w.,;:()'\"-]+", w)]
    lines, current = [], ""
    for word in words:
        if len(current) + 1 + len(word) > max_chars and current:
            lines.append(current)
            current = word
            if len(lines) == count:
                break
        else:
            current = f"{current} {word}".strip()
    return lines


def font(k: int, size: int):
    from PIL import ImageFont

    path = FONT_DIR / FONTS[k % len(FONTS)]
    if path.is_file():
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)  # Pillow's bundled TrueType font


def background(photos: list[np.ndarray], rng: np.random.Generator, width: int, height: int, light: float = 0.75):
    """A lightened random crop of a real photo (paper-like background with real texture)."""
    from PIL import Image

    src = photos[int(rng.integers(len(photos)))]
    h, w = src.shape[:2]
    cw, ch = min(w, width), min(h, height)
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(src[top : top + ch, left : left + cw]).resize((width, height))
    arr = np.asarray(crop, dtype=np.float32)
    return Image.fromarray((light * 255 + (1 - light) * arr).clip(0, 255).astype(np.uint8))


def render_line(text: str, k: int, photos: list[np.ndarray], rng: np.random.Generator):
    """One text line, tightly cropped with a small margin, dark ink on a light photo background."""
    from PIL import ImageDraw

    f = font(k, int(rng.integers(26, 40)))
    left, top, right, bottom = f.getbbox(text)
    margin = int(rng.integers(4, 10))
    width, height = right - left + 2 * margin, bottom - top + 2 * margin
    image = background(photos, rng, width, height)
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    ImageDraw.Draw(image).text((margin - left, margin - top), text, fill=ink, font=f)
    return image


def _chw(image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return ((arr - mean) / std).transpose(2, 0, 1).astype(np.float32)


HALF = (np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32))
IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))


def line_batch(split: str, count: int, height: int, width: int, seed: int, flip_every: int = 0) -> np.ndarray:
    """Rendered lines, resized to `height` keeping the aspect (at most `width`), right-padded with
    zeros (PaddleOCR's recogniser/classifier input). With flip_every=k, every k-th line is rotated 180°."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [photo(n) for n in (CALIB_PHOTOS if split == "calib" else EVAL_PHOTOS)]
    out = np.zeros((count, 3, height, width), np.float32)
    for k, text in enumerate(text_lines(split, count)):
        image = render_line(text, k, photos, rng)
        if flip_every and k % flip_every == 1:
            image = image.transpose(Image.ROTATE_180)
        w = min(width, int(math.ceil(height * image.width / image.height)))
        out[k, :, :, :w] = _chw(image.resize((w, height), Image.BICUBIC), *HALF)
    return out


def page(split: str, k: int, rng: np.random.Generator, photos: list[np.ndarray], width: int, height: int, layout: bool):
    """A document page: a title, paragraphs of real text, and (layout=True) a figure and a table."""
    from PIL import Image, ImageDraw

    image = background(photos, rng, width, height, light=0.85)
    draw = ImageDraw.Draw(image)
    lines = text_lines(split, 400, max_chars=int(rng.integers(18, 40)))
    start = int(rng.integers(0, 300))
    y, cursor = int(rng.integers(8, 30)), start
    title = font(k + 3, int(rng.integers(30, 44)))
    draw.text((int(rng.integers(10, 40)), y), lines[cursor % len(lines)].upper()[:20], fill=(10, 10, 10), font=title)
    y += 60
    body = font(k, int(rng.integers(14, 22)) if layout else int(rng.integers(16, 30)))
    while y < height - 40:
        block = str(rng.choice(["text", "text", "figure", "table"])) if layout else "text"
        if block == "figure" and y < height - 200:
            src = photos[int(rng.integers(len(photos)))]
            fw, fh = int(rng.integers(width // 3, width - 60)), int(rng.integers(100, 180))
            image.paste(Image.fromarray(src).resize((fw, fh)), (int(rng.integers(10, width - fw - 10)), y))
            y += fh + 20
        elif block == "table" and y < height - 160:
            x0, rows, cols = 20, int(rng.integers(3, 6)), int(rng.integers(2, 5))
            cw, rh = (width - 40) // cols, 26
            for r in range(rows + 1):
                draw.line((x0, y + r * rh, x0 + cols * cw, y + r * rh), fill=(0, 0, 0), width=1)
            for c in range(cols + 1):
                draw.line((x0 + c * cw, y, x0 + c * cw, y + rows * rh), fill=(0, 0, 0), width=1)
            for r in range(rows):
                for c in range(cols):
                    cursor += 1
                    draw.text((x0 + c * cw + 4, y + r * rh + 4), lines[cursor % len(lines)][: max(3, cw // 9)],
                              fill=(0, 0, 0), font=font(k, 13))
            y += rows * rh + 24
        else:
            for _ in range(int(rng.integers(2, 6))):
                cursor += 1
                draw.text((int(rng.integers(10, 40)), y), lines[cursor % len(lines)], fill=(20, 20, 20), font=body)
                y += body.size + int(rng.integers(4, 12))
                if y > height - 40:
                    break
            y += 14
    return image


def page_batch(split: str, count: int, width: int, height: int, seed: int, norm, layout: bool = False,
               rotate: bool = False) -> np.ndarray:
    """Pages as CHW float32; rotate=True turns page i by (i mod 4) x 90° (orientation classifier)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [photo(n) for n in (CALIB_PHOTOS if split == "calib" else EVAL_PHOTOS)]
    out = np.empty((count, 3, height, width), np.float32)
    for k in range(count):
        image = page(split, k, rng, photos, width if not rotate else 480, height if not rotate else 480, layout)
        if rotate:
            image = image.rotate(90 * (k % 4), expand=True).resize((width, height), Image.BICUBIC)
        out[k] = _chw(image, *norm)
    return out
