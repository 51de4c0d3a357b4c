"""One real local Ray instance per test process, shared by the integration and chaos suites."""

import os

import ray


def start_local_ray(home) -> None:
    if ray.is_initialized():
        return
    os.environ["STALWART_HOME"] = str(home)
    ray.init(num_cpus=2, include_dashboard=False, namespace="stalwart", log_to_driver=False,
             logging_level="WARNING")
