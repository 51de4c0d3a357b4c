"""Running `stalwart` and `ray` as a user's shell does, and small spec files, for the cluster tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from stalwart._net import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class Cli:
    """Runs `stalwart ...` and `ray ...` with one state dir, as a user's shell would."""

    def __init__(self, home: Path):
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        self.env["STALWART_HOME"] = str(home)
        self.env["COLUMNS"] = "200"
        # `stalwart up` serves the REST API too: on a port of its own, not the 8642 another cluster may hold.
        self.env["STALWART_API_PORT"] = str(free_port())
        self.env.pop("STALWART_API_TOKEN", None)
        self.env.pop("STALWART_SERVER", None)
        self.started: list[subprocess.Popen] = []

    def __call__(self, *args: str, timeout: float = 240, check: bool = True, env: dict | None = None):
        proc = subprocess.run([str(BIN / "stalwart"), *args], capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(env or {})}, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"stalwart {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def json(self, *args: str, timeout: float = 120):
        return json.loads(self(*args, "--json", timeout=timeout).stdout)

    def background(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([str(BIN / "stalwart"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=self.env, cwd=REPO)
        self.started.append(proc)
        return proc

    def ray(self, *args: str, timeout: float = 180, env: dict | None = None):
        return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(env or {})}, cwd=REPO)

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        self("down", check=False, timeout=120)


def small_job(tmp_path: Path, steps: int = 30, **sections) -> Path:
    """A spec file for a small tiny-GPT run (seconds on 2 CPUs), next to nothing: its code is named by workdir."""
    from jobspecs import tiny_gpt_spec

    spec = tiny_gpt_spec(steps, **{"checkpoint": {"every_steps": 10}, **sections})
    spec["config"].update(dim=64, layers=1, batch_size=8, corpus_bytes=200_000)  # smaller still: seconds
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    """Poll `predicate` until it returns something true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} not within {timeout} s")
