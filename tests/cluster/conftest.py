"""The cluster path as a person types it: `stalwart` and `ray` commands as subprocesses, each test
with a fresh STALWART_HOME, Ray's token auth on (as `stalwart up` starts it)."""

import pytest

from clitools import Cli


@pytest.fixture
def cli(tmp_path):
    from stalwart.orchestrator.cluster import ensure_ray_token

    ensure_ray_token()  # as `ray get-auth-token --generate` would: a hand-started `ray start` needs one
    c = Cli(tmp_path / "home")
    yield c
    c.close()
