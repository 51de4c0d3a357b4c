"""One real local Ray instance per test process, shared by the integration and chaos suites."""

import os

import ray


def start_local_ray(home) -> None:
    if ray.is_initialized():
        return
    os.environ["STALWART_HOME"] = str(home)
    # address="local": a new instance of our own even if `ray start` left a cluster running here.
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="stalwart", log_to_driver=False,
             logging_level="WARNING")
