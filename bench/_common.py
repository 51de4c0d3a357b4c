"""Helpers shared by the benchmarks (not a benchmark itself)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # s3server.py


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return None if a is None or not b else a / b


def rnd(x, digits=4):
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: rnd(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rnd(v, digits) for v in x]
    return x


_LOAD_AT_START = os.getloadavg()


def machine() -> dict:
    """The machine the figures come from: cores, and the 1-minute load average (other tenants
    included) when the script started and when it ended."""
    import torch

    return {"cpus": os.cpu_count(), "gpu": torch.cuda.is_available(), "loadavg_1m_start": _LOAD_AT_START[0],
            "loadavg_1m_end": os.getloadavg()[0]}


def emit(line: dict) -> None:
    """The benchmark's one JSON line, on stdout (with the machine and its load appended)."""
    print(json.dumps(rnd({**line, "machine": machine()}), sort_keys=False), flush=True)


def note(msg: str) -> None:
    """Progress, on stderr (stdout carries only the JSON line)."""
    print(msg, file=sys.stderr, flush=True)


def start_local_ray(num_cpus: int = 2, num_gpus: int = 0) -> Path:
    """A fresh in-process local Ray instance (as the integration tests start it) and a stalwart home.

    Returns the home directory. The controller is created by `stalwart.Client(home=...)`.
    """
    import ray

    home = Path(tempfile.mkdtemp(prefix="stalwart-bench-home-"))
    os.environ["STALWART_HOME"] = str(home)
    os.environ.pop("RAY_ADDRESS", None)
    # address="local": always a new instance, never a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, namespace="stalwart",
             log_to_driver=False, logging_level="WARNING")
    return home
