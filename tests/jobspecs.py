"""Spec builders shared by the integration tests."""

import contextlib
import os
import signal
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOBS = Path(__file__).resolve().parent / "jobs"


def job_spec(entrypoint: str, config: dict | None = None, workers: int = 2, **sections) -> dict:
    spec = {"name": "t", "entrypoint": entrypoint, "config": config or {}, "workdir": str(JOBS),
            "resources": {"workers": workers, "cpus_per_worker": 1}}
    spec.update(sections)
    return spec


def tiny_gpt_spec(steps: int = 60, **sections) -> dict:
    spec = {"name": "tiny-gpt", "entrypoint": "train:main", "workdir": str(REPO / "examples" / "tiny_gpt"),
            "config": {"steps": steps, "dim": 96, "layers": 2, "heads": 4, "context": 32, "batch_size": 16,
                       "corpus_bytes": 400_000, "warmup": 5, "lr": 0.003},
            "resources": {"workers": 2, "cpus_per_worker": 1},
            "checkpoint": {"every_steps": 20}}
    spec.update(sections)
    return spec


def wait_for(predicate, timeout: float = 120, poll: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; return that, or fail after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what} not met within {timeout} s")


def lose_node(cluster, nodes, node_id: str, ranks: list[dict]) -> None:
    """Remove a node of a ray.cluster_utils.Cluster the way a machine is lost: its processes die with it."""
    import os
    import signal

    cluster.remove_node(next(n for n in nodes if n.node_id == node_id), allow_graceful=False)
    for rank in ranks:
        if rank["node_id"] == node_id:
            try:
                os.kill(rank["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass  # it went with its raylet already


@contextlib.contextmanager
def stopped(pid: int):
    """SIGSTOP `pid` for the block (a hung process: alive, its connections open), SIGCONT after."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def deepspeed_mark():
    """A skip mark for tests that need DeepSpeed, naming why it cannot be imported."""
    import pytest

    from stalwart.launchers.strategies import deepspeed_missing

    missing = deepspeed_missing()
    return pytest.mark.skipif(missing is not None, reason=f"deepspeed is not importable ({missing}); "
                              "pip install 'stalwart[deepspeed]'")
