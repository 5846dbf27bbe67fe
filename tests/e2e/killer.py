"""A preprocessing function (`--preprocess tests.e2e.killer:preprocess`) whose worker dies once, for real.

The efficientnet-lite preset's transform, except that the first call anywhere SIGKILLs its own
process (a Ray worker: the crash of a node or an OOM kill, not an exception). "First" is decided by
creating the marker file named by TRTCAL_TEST_KILL_MARKER with O_EXCL: exactly one caller wins,
writes its pid there and dies; every later call (Ray's retry included) transforms normally.
Without TRTCAL_TEST_KILL_MARKER it never kills.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np
import numpy.typing as npt

MARKER_ENV = "TRTCAL_TEST_KILL_MARKER"


def preprocess(image: Any) -> npt.NDArray[np.float32]:
    marker = os.environ.get(MARKER_ENV)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            os.write(fd, str(os.getpid()).encode())
            os.fsync(fd)
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    from trtcal.workers.preprocess import preset, transform_image

    return transform_image(image, preset("efficientnet-lite"))
