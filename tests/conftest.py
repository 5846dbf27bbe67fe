"""Shared fixtures: a real SeaweedFS S3 server and a real local Ray, both on 127.0.0.1.

The fixture modules live in tests/fixtures/; each starts its service lazily (only when a test asks)
and ends only the processes it started, by PID (never `ray stop`).
"""

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.ray", "tests.fixtures.data"]
