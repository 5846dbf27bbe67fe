"""Shared fixtures: a real SeaweedFS S3 server and a real local Ray, both on 127.0.0.1.

The fixture modules live in tests/fixtures/; each starts its service lazily (only when a test asks)
and ends only the processes it started, by PID (never `ray stop`).
"""

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.ray", "tests.fixtures.data"]


import signal  # noqa: E402

import pytest  # noqa: E402

# A run started in the background by a non-interactive shell (`bash .ci/run &`) inherits SIGINT
# ignored, and so would every trtcal child the interrupt tests signal: give them the default back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def _isolated_trtcal_cache(tmp_path_factory):
    """Never touch the user's ~/.cache/trtcal: the default store and model cache live in a temp dir."""
    import os

    previous = os.environ.get("TRTCAL_CACHE_DIR")
    os.environ["TRTCAL_CACHE_DIR"] = str(tmp_path_factory.mktemp("trtcal-cache"))
    yield
    if previous is None:
        os.environ.pop("TRTCAL_CACHE_DIR", None)
    else:
        os.environ["TRTCAL_CACHE_DIR"] = previous
