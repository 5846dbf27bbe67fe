#!/usr/bin/env python3
"""Inputs for a third real model in the TensorRT 8.5 parity runs: RapidOCR's PP-OCR models.

usage: make_views3.py OUT_DIR [--zoo DIR]
Writes into OUT_DIR (outside git; under 20 MB):
  cls.onnx, cls_views32_u8.npy  text-line direction classifier (ch_ppocr_mobile_v2.0_cls, rapidocr-
                                onnxruntime 1.4.4): 32 text lines of real prose in real fonts on
                                real-photo backgrounds, every second one turned 180°, resized to
                                48 x 192 as PaddleOCR does for lines at least 4x as wide as high
  det.onnx, det_views32_u8.npy  PP-OCRv4 DBNet text detector, same wheel: 32 pages of 320 x 320
The models come from bench_zoo.py's cache (the pinned, sha256-checked wheel; run bench_zoo.py
once, or pass --zoo). Both models normalise as PaddleOCR does, (x / 255 - 0.5) / 0.5, which is
given to both sides as float32 = (x - 127.5) * float32(1 / 127.5): trt_calibrate.py --offset 127.5
--scale 0.00784313725490196, and parity.py with the same two numbers, see the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import zoo_data as zd  # noqa: E402

HEIGHT, WIDTH, PAGE = 48, 192, 320
MODELS = {"cls": "ocr_cls-971d7d5f223a.onnx", "det": "ocr_det-971d7d5f223a.onnx"}


def line_views(count: int = 32, seed: int = 1) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [zd.photo(n) for n in zd.CALIB_PHOTOS]
    out = np.empty((count, 3, HEIGHT, WIDTH), np.uint8)
    for k, text in enumerate(zd.text_lines("calib", count)):
        image = zd.render_line(text, k, photos, rng).convert("RGB")
        if image.width < 4 * image.height:
            raise SystemExit(f"line {k} ({text!r}) is narrower than 4:1; PaddleOCR would pad it")
        if k % 2:
            image = image.transpose(Image.ROTATE_180)
        out[k] = np.asarray(image.resize((WIDTH, HEIGHT), Image.BICUBIC), np.uint8).transpose(2, 0, 1)
    return out


def page_views(count: int = 32, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    photos = [zd.photo(n) for n in zd.CALIB_PHOTOS]
    pages = [zd.page("calib", k, rng, photos, PAGE, PAGE, layout=False).convert("RGB") for k in range(count)]
    return np.ascontiguousarray(np.stack([np.asarray(p, np.uint8).transpose(2, 0, 1) for p in pages]))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--zoo", default=str(Path.home() / ".cache/trtcal/zoo/models"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for key, make in (("cls", line_views), ("det", page_views)):
        src = Path(a.zoo) / MODELS[key]
        if not src.is_file():
            raise SystemExit(f"{src} is missing: run bench/bench_zoo.py --models ocr_{key} once to fetch it")
        shutil.copyfile(src, out / f"{key}.onnx")
        views = make()
        np.save(out / f"{key}_views32_u8.npy", views)
        print(f"{key}: {views.shape} {views.dtype} mean {views.mean():.1f}; model sha256 {sha256(out / f'{key}.onnx')}")


if __name__ == "__main__":
    main()
