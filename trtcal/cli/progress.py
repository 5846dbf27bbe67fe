"""CLI renderers for the library's ProgressCallback on stderr: tqdm bars on a terminal, and one
line per finished stage with its time elsewhere (CI logs, `trtcal jobs logs`), where bars are noise
and silence looks like a hang."""

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


class LineProgress:
    """One line per stage when it ends: `trtcal: <stage> 3.21 s (500 images)`; nothing in between."""

    def __init__(self, enabled: bool = True, stream: Any = None) -> None:
        self.enabled = enabled
        self.stream = stream
        self.stage_seconds: dict[str, float] = {}
        self._t0: dict[str, float] = {}
        self._count: dict[str, tuple[int, int | None, str]] = {}

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        self._t0[stage] = time.perf_counter()
        self._count[stage] = (0, total, unit)

    def advance(self, stage: str, n: int = 1) -> None:
        done, total, unit = self._count.get(stage, (0, None, ""))
        self._count[stage] = (done + n, total, unit)

    def finish(self, stage: str) -> None:
        if stage not in self._t0:
            return
        seconds = time.perf_counter() - self._t0.pop(stage)
        self.stage_seconds[stage] = seconds
        done, total, unit = self._count.pop(stage, (0, None, ""))
        if not self.enabled:
            return
        what = f" ({done} {unit})" if unit and unit != "step" and (done or total) else ""
        print(f"trtcal: {stage} {seconds:.2f} s{what}", file=self.stream or sys.stderr, flush=True)


def stage_progress(*, quiet: bool = False) -> Any:
    """Bars on a terminal, lines elsewhere; nothing with --quiet."""
    if sys.stderr.isatty():
        return TqdmProgress(enabled=not quiet)
    return LineProgress(enabled=not quiet)
