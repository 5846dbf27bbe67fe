"""`--storage-option KEY=VALUE`: one parser for every subcommand that takes fsspec options.

Rules (the same for `calibrate`, `cache …` and `batch build|show`):

* dotted keys nest: `client_kwargs.region_name=eu-west-1` gives `{"client_kwargs": {"region_name": …}}`;
* `true`/`false` (any case) become booleans, JSON integers (`5242880`, `-1`) ints, JSON reals (`0.5`,
  `1e3`) floats, and a value starting with `{` or `[` is decoded as JSON; anything else stays text;
* credential options (`key`, `secret`, `token`, `password`, … as `trtcal._secrets` defines them)
  always stay text, so a numeric secret is not turned into an int;
* a key given twice: the last value wins; nested options merge.

Error messages name the option and never contain a value (a value may be a credential).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from trtcal.errors import ConfigError

__all__ = ["add_storage_option", "is_secret_option", "parse_storage_options", "show_config_defaults", "storage_option_secrets"]

FLAG = "--storage-option"
_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_REAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
# What a forgotten `=` usually leaves: an option name. Anything else is not echoed (it may be a secret).
_SHOWABLE = re.compile(r"[a-z][a-z0-9_.]{0,39}")


def add_storage_option(parser: Any, *, dest: str = "storage_option", what: str = "the store") -> None:
    """Add the repeatable `--storage-option KEY=VALUE` flag to a parser or argument group."""
    parser.add_argument(
        FLAG, action="append", dest=dest, default=None, metavar="KEY=VALUE",
        help=f"fsspec/s3fs option for {what}, repeatable (endpoint_url=…, anon=true, "
        "client_kwargs.region_name=…: dotted keys nest; true/false, numbers and JSON {…} are decoded)",
    )


def is_secret_option(name: str) -> bool:
    """Whether an option (a dotted key names its last part) holds a credential."""
    from trtcal._secrets import secret_values

    # secret_values() is the one definition of a credential option; ask it about a placeholder value.
    return bool(secret_values({name.rsplit(".", 1)[-1]: "placeholder"}, environ={}))


def _split(item: str) -> tuple[list[str], str]:
    name, sep, raw = item.partition("=")
    if not sep:
        showable = _SHOWABLE.fullmatch(item) and not is_secret_option(item)
        shown = repr(item) if showable else "a value without '=' (not shown)"
        raise ConfigError(f"{FLAG}: KEY=VALUE expected, got {shown}")
    if not name:
        raise ConfigError(f"{FLAG}: KEY=VALUE expected, got an empty KEY ('=…')")
    parts = name.split(".")
    if not all(parts):
        raise ConfigError(f"{FLAG} {name}: a dotted KEY needs a name between the dots (client_kwargs.region_name=…)")
    return parts, raw


def _decode(name: str, raw: str) -> Any:
    if is_secret_option(name):
        return raw
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if _INT.fullmatch(raw):
        return int(raw)
    if _REAL.fullmatch(raw):
        return float(raw)
    if raw[:1] in ("{", "["):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:  # exc.msg and the position only: never the value itself
            raise ConfigError(
                f"{FLAG} {name}: the value is not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
    return raw


def parse_storage_options(items: Iterable[str] | None) -> dict[str, Any]:
    """fsspec storage options from `--storage-option` values (see the module docstring for the rules).

    Raises:
        ConfigError: an item is not KEY=VALUE, has an empty dotted part, holds invalid JSON, or sets
            a key both to a plain value and to nested options. The message names the option only.
    """
    options: dict[str, Any] = {}
    for item in items or ():
        parts, raw = _split(item)
        name = ".".join(parts)
        value = _decode(name, raw)
        target = options
        for depth, part in enumerate(parts[:-1], start=1):
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(
                    f"{FLAG} {name}: {'.'.join(parts[:depth])} is already set to a plain value, "
                    "so it cannot hold nested options"
                )
        leaf = parts[-1]
        existing = target.get(leaf)
        if isinstance(existing, dict) and isinstance(value, dict):
            existing.update(value)
        elif isinstance(existing, dict):
            raise ConfigError(
                f"{FLAG} {name}: already holds nested options ({name}.…), so it cannot be a plain value"
            )
        else:
            target[leaf] = value
    return options


def storage_option_secrets(items: Iterable[str] | None) -> set[str]:
    """Every credential value in `--storage-option` items, nested JSON included. Never raises, so an
    error path can use it on items that do not parse."""
    from trtcal._secrets import secret_values

    found: set[str] = set()
    for item in items or ():
        name, sep, raw = str(item).partition("=")
        if not sep:
            continue
        if any(is_secret_option(part) for part in name.split(".") if part):
            found.add(raw)
        try:
            found |= secret_values(parse_storage_options([item]), environ={})
        except ConfigError:
            pass
    return {value for value in found if len(value) >= 4}  # as secret_values(): shorter ones would mask everything



# CLI option dest -> config field name, where they differ.
_FIELD_OF_OPTION = {"algorithm": "algorithms", "on_nonfinite": "nonfinite", "store": "url"}


def _shown(value: Any) -> str | None:
    from trtcal.workers.preprocess import PRESETS, PreprocessSpec

    if value is None or isinstance(value, bool) or value == {} or value == ():
        return None
    if isinstance(value, PreprocessSpec):
        return next((name for name, spec in PRESETS.items() if spec == value), None)
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    return str(value)


def show_config_defaults(parser: Any, *configs: Any, extra: dict[str, Any] | None = None) -> None:
    """Append "(default: X)" to the help of every option whose config field has a default.

    Options themselves default to None ("not given"), so the frozen config dataclasses stay the one
    source of defaults; this only shows them. `extra` gives values for options no config holds.
    """
    from dataclasses import fields

    values: dict[str, Any] = dict(extra or {})
    for config in configs:
        for f in fields(config):
            values.setdefault(f.name, getattr(config, f.name))
    for action in parser._actions:  # argparse keeps every option here, groups included
        if not action.help or action.help == "==SUPPRESS==" or "default" in action.help:
            continue
        shown = _shown(values.get(_FIELD_OF_OPTION.get(action.dest, action.dest)))
        if shown is not None:
            action.help = f"{action.help} (default: {shown})"
