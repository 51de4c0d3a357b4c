"""Integration fixtures: one real local Ray instance for the session, with stalwart's home in a temp dir."""

import os
from pathlib import Path

import pytest





@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    import ray

    home = tmp_path_factory.mktemp("stalwart-home")
    os.environ["STALWART_HOME"] = str(home)
    ray.init(num_cpus=2, include_dashboard=False, namespace="stalwart", log_to_driver=False,
             logging_level="WARNING")
    yield home
    ray.shutdown()


@pytest.fixture(scope="session")
def client(ray_local):
    from stalwart import Client

    c = Client(home=ray_local)
    yield c
