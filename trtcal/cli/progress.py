"""CLI renderer for the library's ProgressCallback: one tqdm bar per stage on stderr."""

from __future__ import annotations

import sys
import time
from typing import Any


class TqdmProgress:
    """Renders stages as progress bars (rate and ETA when a total is known)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bars: dict[str, Any] = {}
        self.stage_seconds: dict[str, float] = {}
        self._t0: dict[str, float] = {}

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        self._t0[stage] = time.perf_counter()
        if self.enabled:
            from tqdm import tqdm

            self._bars[stage] = tqdm(total=total, desc=stage, unit=unit or "it", file=sys.stderr, leave=True)

    def advance(self, stage: str, n: int = 1) -> None:
        bar = self._bars.get(stage)
        if bar is not None:
            bar.update(n)

    def finish(self, stage: str) -> None:
        if stage in self._t0:
            self.stage_seconds[stage] = time.perf_counter() - self._t0.pop(stage)
        bar = self._bars.pop(stage, None)
        if bar is not None:
            bar.close()
