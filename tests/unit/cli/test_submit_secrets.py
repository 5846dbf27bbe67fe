"""Issue 15 item 9: `trtcal submit -- …` must never send a credential as job metadata, however the
job command spells it: abbreviated flags (argparse prefix matching), `--flag=value`, dotted keys,
JSON `client_kwargs`, URLs with a password. Found on the options as trtcal's parser reads them, and
by a word scan that does not depend on the flag's spelling (for commands this trtcal cannot parse)."""

from __future__ import annotations

import json
import socket

import pytest

from trtcal._secrets import credential_options, credential_words
from trtcal.cli import main
from trtcal.cli.cmd_submit import job_storage_options
from trtcal.errors import ConfigError
from trtcal.orchestrator.jobs import refuse_credentials

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzEXAMPLE"
BASE = ["calibrate", "m.onnx", "--data", "s3://b/photos/", "--store", "s3://b/cache"]

SPELLINGS = {
    "abbreviated flag": ["--storage", f"secret={SECRET}"],
    "abbreviated flag with =": [f"--storage-opt=secret={SECRET}"],
    "ambiguous prefix (--stor: --store or --storage-option)": ["--stor", f"secret={SECRET}"],
    "JSON client_kwargs": ["--storage-option", "client_kwargs=" + json.dumps({"aws_secret_access_key": SECRET})],
    "JSON client_kwargs, abbreviated, with =": ["--storage-o=client_kwargs=" + json.dumps({"aws_secret_access_key": SECRET})],
    "dotted key": ["--storage-option", f"client_kwargs.aws_secret_access_key={SECRET}"],
    "session token": ["--storage-option", f"token={SECRET}"],
    "password in a URL": ["--read-from", f"s3://AKIDEXAMPLE:{SECRET}@bucket/cache"],
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("words", SPELLINGS.values(), ids=SPELLINGS.keys())
def test_every_spelling_is_refused_by_name_without_the_value(words: list[str]) -> None:
    command = BASE + words
    with pytest.raises(ConfigError, match="credentials") as caught:
        refuse_credentials(command, None, job_storage_options(command))
    assert SECRET not in str(caught.value)
    assert "nothing was submitted" in str(caught.value)


@pytest.mark.parametrize("words", SPELLINGS.values(), ids=SPELLINGS.keys())
def test_the_cli_refuses_before_connecting(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # The address is closed: refusing must come before any connection attempt.
    rc = main(["submit", "--address", f"http://127.0.0.1:{_free_port()}", "--no-follow", "--", *BASE, *words])
    out = capsys.readouterr()
    assert rc == 2
    assert "credentials" in out.err and SECRET not in out.err + out.out


def test_parsed_options_resolve_abbreviations_and_json() -> None:
    options = job_storage_options(BASE + ["--storage", 'client_kwargs={"aws_secret_access_key": "x"}'])
    assert options == {"client_kwargs": {"aws_secret_access_key": "x"}}
    assert credential_options(options or {}) == ["client_kwargs.aws_secret_access_key"]
    assert job_storage_options(["calibrate", "--no-such-flag"]) is None  # the word scan still applies


@pytest.mark.parametrize(
    "words",
    [
        ["--storage-option", "anon=true"],
        ["--storage-opt", 'client_kwargs={"endpoint_url": "http://127.0.0.1:9000", "region_name": "x"}'],
        ["--storage-option", "config_kwargs.retries.max_attempts=2"],
        ["--data", "s3://b/tokenizer=v1/"],  # a path with `=` is not an option
        ["--inputs", '{"input_ids": {"length": 128}}'],
    ],
)
def test_options_without_credentials_pass(words: list[str]) -> None:
    command = BASE + words
    refuse_credentials(command, None, job_storage_options(command))
    assert credential_words(command) == []
