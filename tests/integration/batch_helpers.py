"""A preprocessing function for the worker-kill test, imported by name inside Ray workers.

`kill_once_then_imagenet` SIGKILLs its own worker process the first time it runs after the marker
file named by TRTCAL_TEST_KILL_MARKER appears (the file is removed first, so only one worker dies,
and the dead PID is written next to it); otherwise it applies the `imagenet` transform.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from trtcal.workers.preprocess import PRESETS, transform_image

MARKER_ENV = "TRTCAL_TEST_KILL_MARKER"


def kill_once_then_imagenet(image: Any) -> Any:
    marker = os.environ.get(MARKER_ENV)
    if marker:
        try:
            os.remove(marker)
        except FileNotFoundError:
            pass
        else:
            with open(marker + ".pid", "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
    return transform_image(image, PRESETS["imagenet"])
