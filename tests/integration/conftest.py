"""Integration fixtures: a real local Ray instance, with stalwart's home in a temp dir."""

import pytest

from ray_fixtures import start_local_ray


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    home = tmp_path_factory.mktemp("stalwart-home")
    start_local_ray(home)
    return home


@pytest.fixture(scope="session")
def client(ray_local):
    from stalwart import Client

    return Client(home=ray_local)
