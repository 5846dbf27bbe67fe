"""`--preprocess tests.integration.slow_preprocess:preprocess`: the imagenet preset, 0.8 s per image, so a
test can kill a Ray node while the build's tasks run on it (tests/integration/test_multinode.py)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt

SECONDS_PER_IMAGE = 0.8


def preprocess(image: Any) -> npt.NDArray[np.float32]:
    from trtcal.workers.preprocess import preset, transform_image

    time.sleep(SECONDS_PER_IMAGE)
    return np.asarray(transform_image(image, preset("imagenet")), dtype=np.float32)
