"""Finding or starting the Ray cluster that runs stalwart.

Order: an already-connected Ray; an explicit address (argument or RAY_ADDRESS); the local cluster
that `stalwart up` started (recorded in STALWART_HOME/cluster.json); else start one, either inside
this process (`stalwart run`: it goes when the process ends) or in the background (`stalwart up`,
`submit`: it stays until `stalwart down`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from stalwart.errors import ClusterError

HOME_ENV = "STALWART_HOME"


def home_dir(home: str | os.PathLike | None = None) -> Path:
    path = Path(home or os.environ.get(HOME_ENV) or "~/.stalwart").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _record_path(home: Path) -> Path:
    return home / "cluster.json"


def local_cluster(home: Path) -> dict | None:
    """The recorded local cluster if its head still answers, else None (and the stale record goes)."""
    path = _record_path(home)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        host, port = record["address"].rsplit(":", 1)
    except (ValueError, KeyError):
        path.unlink(missing_ok=True)
        return None
    if not _port_open(host, int(port)):
        path.unlink(missing_ok=True)
        return None
    return record


def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def start_background(home: Path, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Start a local Ray head that outlives this process; record how to reach it."""
    port = _free_port()
    cmd = [_ray_bin(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
           "--include-dashboard=false", "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise ClusterError(f"`ray start --head` failed:\n{proc.stderr.strip() or proc.stdout.strip()}")
    record = {"address": f"127.0.0.1:{port}", "started_at": time.time()}
    _record_path(home).write_text(json.dumps(record))
    return record


def stop_background(home: Path) -> bool:
    """Stop the local cluster `start_background` made. Returns whether there was one."""
    record = local_cluster(home)
    _record_path(home).unlink(missing_ok=True)
    if record is None:
        return False
    subprocess.run([_ray_bin(), "stop", "--force"], capture_output=True, text=True, timeout=120)
    return True


def connect(address: str | None, home: Path, *, start: str = "background", say=lambda msg: None) -> str:
    """Connect this process to Ray. `start` is 'background', 'inprocess' or 'never'.

    Returns how the cluster was reached: 'connected', 'address', 'local', 'started-background',
    'started-inprocess'.
    """
    import ray

    if ray.is_initialized():
        return "connected"
    common = dict(namespace="stalwart", log_to_driver=False, logging_level="WARNING")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"cannot connect to the Ray cluster at {address}: {exc}; check --address / "
                               "RAY_ADDRESS, or leave both unset to use a local cluster") from None
        return "address"
    record = local_cluster(home)
    if record is not None:
        ray.init(address=record["address"], **common)
        return "local"
    if start == "never":
        raise ClusterError("no Ray cluster is running: start one with `stalwart up`, or pass --address")
    if start == "inprocess":
        say("starting a local Ray instance in this process")
        ray.init(address="local", include_dashboard=False, **common)
        return "started-inprocess"
    say("no cluster running: starting a local Ray head in the background (stop it with `stalwart down`)")
    record = start_background(home)
    ray.init(address=record["address"], **common)
    return "started-background"
