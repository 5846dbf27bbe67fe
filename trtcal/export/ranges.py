"""Range tables (ranges.json): method -> tensor -> amax, as `trtcal.calibrate` writes them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trtcal.errors import ConfigError

__all__ = ["read_ranges", "amax_for_method"]


def read_ranges(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """method -> tensor -> amax from a `ranges.json` written by `trtcal.calibrate`.

    Accepted layouts: ``{"tensors": {name: {"amax": {method: amax}}}}`` (also a list of objects
    with a "name"), ``{"methods" | "amax": {method: {name: amax}}}``, and a plain ``{name: amax}``
    (one unnamed method, labelled "ranges").

    Raises:
        ConfigError: the file is missing, not JSON, or in none of these layouts.
    """
    import json

    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"ranges file {str(source)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"ranges file {str(source)!r} is not readable JSON ({exc})") from None
    table: dict[str, dict[str, float]] = {}

    def put(method: str, tensor: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: amax of tensor {tensor!r} for method {method!r} is not a number: {value!r}")
        table.setdefault(str(method), {})[str(tensor)] = float(value)

    if isinstance(data, dict) and "tensors" in data:
        tensors = data["tensors"]
        items: list[tuple[str, Any]] = (
            [(str(k), v) for k, v in tensors.items()]
            if isinstance(tensors, dict)
            else [(str(t.get("name")), t) for t in tensors if isinstance(t, dict) and t.get("name")]
        )
        order = data.get("tensor_order")
        if isinstance(order, list):  # trtcal.calibrate writes sorted keys and the graph order apart
            rank = {name: k for k, name in enumerate(order)}
            items.sort(key=lambda item: rank.get(item[0], len(rank)))
        for name, entry in items:
            amax = entry.get("amax") if isinstance(entry, dict) else None
            if isinstance(amax, dict):
                for method, value in amax.items():
                    put(method, name, value)
            elif amax is not None:
                put(str(entry.get("method", data.get("method", "ranges"))), name, amax)
    elif isinstance(data, dict) and isinstance(data.get("methods", data.get("amax")), dict):
        by_method: dict[str, Any] = data["methods"] if isinstance(data.get("methods"), dict) else data["amax"]
        for method, by_tensor in by_method.items():
            if not isinstance(by_tensor, dict):
                raise ConfigError(f"{source}: method {method!r} must map tensor names to amax values")
            for name, value in by_tensor.items():
                put(method, name, value)
    elif isinstance(data, dict) and data and all(isinstance(v, (int, float)) for v in data.values()):
        for name, value in data.items():
            put("ranges", name, value)
    algorithms = data.get("algorithms") if isinstance(data, dict) else None
    if isinstance(algorithms, list):  # the order the methods were asked for
        rank = {str(m): k for k, m in enumerate(algorithms)}
        table = dict(sorted(table.items(), key=lambda item: rank.get(item[0], len(rank))))
    if not table:
        raise ConfigError(
            f"{source}: no ranges found; expected a trtcal ranges.json "
            '({"tensors": {name: {"amax": {method: value}}}}) or a plain {tensor: amax} object'
        )
    return table


def amax_for_method(ranges: Mapping[str, Mapping[str, float]], method: str | None, *, source: str = "ranges") -> dict[str, float]:
    """One method's table; `method` may be omitted when the file holds exactly one."""
    if method is None:
        if len(ranges) != 1:
            raise ConfigError(f"{source} holds the methods {sorted(ranges)}; choose one with --method")
        return dict(next(iter(ranges.values())))
    if method not in ranges:
        raise ConfigError(f"{source} has no method {method!r}; it holds {sorted(ranges)}")
    return dict(ranges[method])
