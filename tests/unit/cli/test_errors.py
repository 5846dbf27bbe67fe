"""How `trtcal` reports failures: exit codes, one paragraph on stderr, tracebacks only with -v,
credentials never printed.

A bug in trtcal (an exception that is not a TrtcalError) cannot be caused for real, so a real
subcommand (`cache ls` on a local store) is made to fail by replacing the library call it makes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trtcal.cli import EXIT_ERROR, EXIT_INTERNAL_ERROR, main
from trtcal.errors import InternalError, StorageError
from trtcal.storage import CacheStore

PLANTED_OPTION = "Pl4nted-option-S3cret"
PLANTED_ENV = "Pl4nted-env-S3cret"


def _ls_fails_with(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def broken_ls(self: CacheStore, *args: object, **kwargs: object) -> list[object]:
        raise exc

    monkeypatch.setattr(CacheStore, "ls", broken_ls)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_ENV)
    (tmp_path / "store").mkdir()  # an empty store: `cache ls` refuses a missing one
    return str(tmp_path / "store")


def _leaky_bug() -> RuntimeError:
    return RuntimeError(
        f"boom: option {PLANTED_OPTION}, env {PLANTED_ENV},\nurl s3://AKIA:{PLANTED_OPTION}@host/bucket"
    )


def test_a_bug_is_one_paragraph_with_its_own_exit_code(
    store: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _ls_fails_with(monkeypatch, _leaky_bug())
    rc, out, err = _run(capsys, "cache", "ls", store, "--storage-option", f"secret={PLANTED_OPTION}")
    assert rc == EXIT_INTERNAL_ERROR == 70
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("trtcal: internal error: RuntimeError: boom: option ***, env ***, url ")
    assert err.rstrip().endswith("(this is a bug in trtcal; rerun with -v for the traceback and report it)")
    assert "Traceback" not in err
    assert PLANTED_OPTION not in err and PLANTED_ENV not in err


def test_verbose_shows_the_traceback_masked(
    store: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _ls_fails_with(monkeypatch, _leaky_bug())
    rc, _, err = _run(
        capsys, "-v", "cache", "ls", store, "--storage-option", f"client_kwargs.aws_secret_access_key={PLANTED_OPTION}"
    )
    assert rc == EXIT_INTERNAL_ERROR
    assert "Traceback (most recent call last)" in err and "broken_ls" in err and "cmd_ls" in err
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("trtcal: internal error: RuntimeError: boom") and "report it with the traceback above" in last
    assert PLANTED_OPTION not in err and PLANTED_ENV not in err


def test_verbose_after_the_subcommand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`calibrate … -v` (the subcommand's own -v) shows the traceback too."""
    def broken(*args: object, **kwargs: object) -> None:
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr("trtcal.orchestrator.job.calibrate_dataset", broken)
    argv = ["calibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d")]
    rc, _, err = _run(capsys, *argv)
    assert rc == EXIT_INTERNAL_ERROR and "Traceback" not in err
    assert err == (
        "trtcal: internal error: AttributeError: 'NoneType' object has no attribute 'shape' "
        "(this is a bug in trtcal; rerun with -v for the traceback and report it)\n"
    )
    rc, _, err = _run(capsys, *argv, "-v")
    assert rc == EXIT_INTERNAL_ERROR and "Traceback" in err and "in broken" in err


def test_calibrate_json_reports_a_bug_on_stdout_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError(PLANTED_OPTION)

    monkeypatch.setattr("trtcal.orchestrator.job.calibrate_dataset", broken)
    rc, out, err = _run(
        capsys, "calibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d"), "--json",
        "--storage-option", f"token={PLANTED_OPTION}",
    )
    assert rc == EXIT_INTERNAL_ERROR
    assert json.loads(out) == {"error": {"type": "KeyError", "message": "'***'", "internal": True}}
    assert err.startswith("trtcal: internal error: KeyError: '***' (this is a bug") and PLANTED_OPTION not in err


def test_internal_error_class_is_a_bug_too(
    store: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _ls_fails_with(monkeypatch, InternalError("plan does not match the graph"))
    rc, _, err = _run(capsys, "cache", "ls", store)
    assert rc == EXIT_INTERNAL_ERROR and err.startswith("trtcal: internal error: InternalError: plan does not match")


def test_an_exception_without_a_message(
    store: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _ls_fails_with(monkeypatch, ZeroDivisionError())
    rc, _, err = _run(capsys, "cache", "ls", store)
    assert rc == EXIT_INTERNAL_ERROR
    assert err == "trtcal: internal error: ZeroDivisionError (this is a bug in trtcal; rerun with -v for the traceback and report it)\n"


def test_user_errors_keep_exit_code_2_and_interrupts_130(
    store: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _ls_fails_with(monkeypatch, StorageError("cannot list the store: permission denied"))
    rc, _, err = _run(capsys, "cache", "ls", store)
    assert rc == EXIT_ERROR == 2
    assert err == "trtcal: error: cannot list the store: permission denied\n"
    rc, _, err = _run(capsys, "-v", "cache", "ls", store)
    assert rc == 2 and "Traceback" in err and err.rstrip().endswith("trtcal: error: cannot list the store: permission denied")

    _ls_fails_with(monkeypatch, KeyboardInterrupt())
    rc, _, err = _run(capsys, "cache", "ls", store)
    assert rc == 130 and "interrupted" in err and "internal error" not in err


def test_a_reader_that_closes_the_pipe_is_not_an_error(tmp_path: Path) -> None:
    """`trtcal cache ls | head`: a real closed pipe (its read end closed before trtcal writes)."""
    import os
    import subprocess
    import sys

    (tmp_path / "store").mkdir()
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "trtcal", "cache", "ls", str(tmp_path / "store"), "--json"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""
