"""Progress reporting through a callback; the library never prints.

The CLI plugs in a renderer (see `trtcal.cli.progress`); library code calls
`callback.start(stage, total)`, `callback.advance(stage, n)` and `callback.finish(stage)`.
"""

from __future__ import annotations

from typing import Protocol


class ProgressCallback(Protocol):
    def start(self, stage: str, total: int | None = None, unit: str = "") -> None: ...

    def advance(self, stage: str, n: int = 1) -> None: ...

    def finish(self, stage: str) -> None: ...


class NoProgress:
    """The default callback: does nothing."""

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        return None

    def advance(self, stage: str, n: int = 1) -> None:
        return None

    def finish(self, stage: str) -> None:
        return None


NO_PROGRESS = NoProgress()


class RecordingProgress:
    """Keeps every event; handy for tests and for timing stages."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int | None]] = []

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        self.events.append(("start", stage, total))

    def advance(self, stage: str, n: int = 1) -> None:
        self.events.append(("advance", stage, n))

    def finish(self, stage: str) -> None:
        self.events.append(("finish", stage, None))
