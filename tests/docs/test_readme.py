"""README honesty: every `trtcal …` command line in README.md parses with the real CLI.

Each subcommand is also exercised for real by its own tests (cache: tests/unit/storage/test_cmd_cache.py,
export/eval/report: tests/unit/export/, batch: tests/integration/test_batch_build.py, submit/jobs:
tests/integration/test_jobs.py, calibrate/demo: tests/e2e/); `make test` and `make demo` are what
.ci/run runs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from trtcal.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands: list[str] = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("trtcal "):
                commands.append(line)
    return commands


def test_readme_has_commands() -> None:
    assert len(_commands()) >= 8


@pytest.mark.parametrize("command", _commands())
def test_readme_command_parses(command: str) -> None:
    argv = shlex.split(command)[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    assert callable(args.func)
    if argv[0] == "submit":
        inner = argv[argv.index("--") + 1 :]
        assert callable(parser.parse_args(inner).func)


def test_make_targets_exist() -> None:
    makefile = (README.parent / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci and "make demo" in ci
