"""The cluster path as a person types it: `stalwart` and `ray` commands as subprocesses, each test
with a fresh STALWART_HOME, Ray's token auth on (as `stalwart up` starts it)."""

import pytest

from clitools import Cli


@pytest.fixture
def cli(tmp_path):
    c = Cli(tmp_path / "home")
    yield c
    c.close()
