#!/usr/bin/env python3
"""The 32 real photo views of tests/tensorrt (8 scikit-image photos x 4 crops) as uint8 NCHW.

The model input is float32 (x - 127) / 128, which equals (x - 127) * 0.0078125 exactly, so the GPU
side (trt_calibrate.py --offset 127 --scale 0.0078125) and ONNX Runtime here see the same bytes.
usage: make_views.py OUT.npy
"""
import sys

import numpy as np
import skimage.data
from PIL import Image

NAMES = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel"]


def views() -> np.ndarray:
    out = []
    for name in NAMES:
        image = Image.fromarray(getattr(skimage.data, name)()[..., :3])
        for scale, flip in ((256, False), (256, True), (320, False), (288, True)):
            w, h = image.size
            factor = scale / min(w, h)
            resized = image.resize((round(w * factor), round(h * factor)), Image.BICUBIC)
            if flip:
                resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
            left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
            out.append(np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.uint8).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out))


if __name__ == "__main__":
    v = views()
    np.save(sys.argv[1], v)
    print(v.shape, v.dtype, "->", sys.argv[1])
