"""`--storage-option KEY=VALUE` means the same for every subcommand that takes it.

Each subcommand runs through `trtcal.cli.main` for real; only the library call that receives the
options is replaced, so the test sees exactly what the subcommand would hand to fsspec.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from trtcal.cli import build_parser, main
from trtcal.cli._options import parse_storage_options, storage_option_secrets
from trtcal.errors import ConfigError, TrtcalError

ITEMS = [
    "endpoint_url=http://127.0.0.1:9000",
    "client_kwargs.region_name=eu-west-1",
    "anon=False",
    "use_ssl=true",
    "default_block_size=5242880",
    "config_kwargs.connect_timeout=2.5",
    'config_kwargs.retries={"max_attempts": 1}',
    "secret=0123",
    "key=true",
    "profile=007",
]
EXPECTED = {
    "endpoint_url": "http://127.0.0.1:9000",  # as given: s3fs takes it at the top level
    "client_kwargs": {"region_name": "eu-west-1"},
    "anon": False,
    "use_ssl": True,
    "default_block_size": 5242880,
    "config_kwargs": {"connect_timeout": 2.5, "retries": {"max_attempts": 1}},
    "secret": "0123",  # credentials stay text even when they look like numbers or booleans
    "key": "true",
    "profile": "007",  # not a JSON number (leading zero): text
}
PLANTED = "hunter2-Pl4nted-S3cret"


class _Captured(TrtcalError):
    """Stops the command once the options reached the library."""


def _options_flags(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--storage-option", item)]


def _capture(monkeypatch: pytest.MonkeyPatch, target: str, pick: Any) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def fake(*args: Any, **kwargs: Any) -> Any:
        seen["options"] = pick(args, kwargs)
        raise _Captured("captured")

    monkeypatch.setattr(target, fake)
    return seen


def _calibrate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[list[str], dict[str, Any]]:
    seen = _capture(monkeypatch, "trtcal.orchestrator.job.calibrate_dataset",
                    lambda a, kw: dict(kw["config"].storage_options))
    return ["calibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d")], seen


def _batch_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[list[str], dict[str, Any]]:
    seen = _capture(monkeypatch, "trtcal.workers.build.build_batch", lambda a, kw: kw["storage_options"])
    return ["batch", "build", "--data", str(tmp_path / "d"), "-o", str(tmp_path / "b.arrow"), "--no-progress"], seen


def _batch_show(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[list[str], dict[str, Any]]:
    seen = _capture(monkeypatch, "trtcal.batch.open_batch",
                    lambda a, kw: {k: v for k, v in kw.items() if k != "verify"})
    return ["batch", "show", str(tmp_path / "b.arrow")], seen


def _cache(action: list[str]) -> Any:
    def setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[list[str], dict[str, Any]]:
        store_kwargs = ("read_only", "namespace", "read_from", "on_corrupt")
        seen = _capture(monkeypatch, "trtcal.storage.CacheStore",
                        lambda a, kw: {k: v for k, v in kw.items() if k not in store_kwargs})
        (tmp_path / "inputs.json").write_text("{}")
        (tmp_path / "calibration.cache").write_text("x")
        extra = [a.replace("TMP", str(tmp_path)) for a in action[1:]]
        return ["cache", action[0], str(tmp_path / "store"), *extra], seen

    return setup


SUBCOMMANDS = {
    "calibrate": _calibrate,
    "batch build": _batch_build,
    "batch show": _batch_show,
    "cache ls": _cache(["ls"]),
    "cache show": _cache(["show", "a" * 64]),
    "cache get": _cache(["get", "a" * 64, "-o", "TMP/out"]),
    "cache put": _cache(["put", "--key-inputs", "TMP/inputs.json", "TMP/calibration.cache"]),
    "cache verify": _cache(["verify"]),
    "cache gc": _cache(["gc"]),
    "cache export": _cache(["export", "--key", "a" * 64, "--trt-version", "10.3.0", "-o", "TMP/x.cache"]),
}


def test_every_storage_option_flag_is_covered() -> None:
    """A new subcommand with --storage-option must be added to SUBCOMMANDS."""
    parser = build_parser()
    found: set[str] = set()

    def walk(p: Any, path: list[str]) -> None:
        for action in p._actions:
            if "--storage-option" in action.option_strings:
                found.add(" ".join(path))
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, [*path, name])

    walk(parser, [])
    assert found == set(SUBCOMMANDS)


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_each_subcommand_parses_options_identically(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, seen = SUBCOMMANDS[command](monkeypatch, tmp_path)
    rc = main([*argv, *_options_flags(ITEMS)])
    err = capsys.readouterr().err
    assert rc == 2 and "captured" in err, err
    assert seen["options"] == EXPECTED


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_each_subcommand_reports_a_bad_option_without_its_value(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, seen = SUBCOMMANDS[command](monkeypatch, tmp_path)
    rc = main([*argv, "--storage-option", "anon=true", "--storage-option", f"={PLANTED}"])
    out, err = capsys.readouterr()
    assert rc == 2 and "options" not in seen
    assert "trtcal: error: --storage-option: KEY=VALUE expected, got an empty KEY" in err
    assert PLANTED not in err + out


def test_parse_storage_options() -> None:
    assert parse_storage_options(ITEMS) == EXPECTED
    assert parse_storage_options(None) == {} and parse_storage_options([]) == {}
    # Last value wins; nested options merge whichever way they are given.
    assert parse_storage_options(["anon=true", "anon=false"]) == {"anon": False}
    assert parse_storage_options(['client_kwargs={"a": 1}', "client_kwargs.b=2"]) == {"client_kwargs": {"a": 1, "b": 2}}
    assert parse_storage_options(["client_kwargs.b=2", 'client_kwargs={"a": 1}']) == {"client_kwargs": {"a": 1, "b": 2}}
    # Values are split at the first '=' only; other text stays text.
    assert parse_storage_options(["endpoint_url=http://h/?a=b", "x=null", "y=1.2.3", "z=", "n=-7"]) == {
        "endpoint_url": "http://h/?a=b", "x": "null", "y": "1.2.3", "z": "", "n": -7
    }
    # Credential options nested anywhere stay text, JSON-looking or not.
    assert parse_storage_options(["client_kwargs.aws_secret_access_key=12345", "token={x"]) == {
        "client_kwargs": {"aws_secret_access_key": "12345"}, "token": "{x"
    }


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["anon"], "--storage-option: KEY=VALUE expected, got 'anon'"),
        ([PLANTED], "--storage-option: KEY=VALUE expected, got a value without '=' (not shown)"),
        ([f"={PLANTED}"], "--storage-option: KEY=VALUE expected, got an empty KEY"),
        (["client_kwargs..region_name=x"], "--storage-option client_kwargs..region_name: a dotted KEY needs a name"),
        (["client_kwargs.=x"], "--storage-option client_kwargs.: a dotted KEY needs a name"),
        ([f'config_kwargs={{"password": "{PLANTED}"'], "--storage-option config_kwargs: the value is not valid JSON"),
        (["client_kwargs=x", "client_kwargs.region_name=y"],
         "--storage-option client_kwargs.region_name: client_kwargs is already set to a plain value"),
        (["client_kwargs.region_name=y", "client_kwargs=x"], "--storage-option client_kwargs: already holds nested options"),
    ],
)
def test_errors_name_the_option_and_never_show_a_value(items: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_storage_options(items)
    assert str(info.value).startswith(expected), str(info.value)
    assert PLANTED not in str(info.value)


def test_secrets_are_found_even_in_items_that_do_not_parse() -> None:
    assert storage_option_secrets(
        ["secret=s3cr3t-one", "client_kwargs.aws_session_token=t0ken-two", f'config_kwargs={{"password": "{PLANTED}"}}',
         "key_prefix=not-a-secret", "endpoint_url=http://h", "password={broken", "noequals", "key=abc"]
    ) == {"s3cr3t-one", "t0ken-two", PLANTED, "{broken"}  # "abc": too short to mask safely


def test_help_describes_the_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["cache", "ls", "--help"])
    assert "dotted keys nest" in " ".join(capsys.readouterr().out.split())



def test_calibrate_help_shows_the_config_defaults(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15 item 8: `--help` shows the defaults the config dataclasses hold (options stay None)."""
    from trtcal.config import BatchConfig, CalibrationConfig, ClusterConfig

    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = capsys.readouterr().out
    for option, value in [
        ("--num-samples", BatchConfig().num_samples), ("--seed", BatchConfig().seed), ("--preprocess", "imagenet"),
        ("--micro-batch", CalibrationConfig().micro_batch), ("--trt-version", CalibrationConfig().trt_version),
        ("--algorithm", CalibrationConfig().algorithms[0]), ("--device", ClusterConfig().device),
    ]:
        lines = text.splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.strip().startswith(option))
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("-")), len(lines))
        entry = " ".join(lines[start:end])
        assert f"(default: {value})" in entry, entry
    assert "--store URL" in text and "/store)" in text
