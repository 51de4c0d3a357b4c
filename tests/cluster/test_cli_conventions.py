"""CLI conventions, as a user's shell meets them: `--version`, shell completion, the environment named in
`--help`, `--json` on every command that prints data, `logs --tail/--rank`. Subprocesses with a fresh
STALWART_HOME; the job's records are written by the real store (no cluster needed to read them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import stalwart
from clitools import Cli

REPO = Path(__file__).resolve().parents[2]
JOB_ID = "tiny-gpt-c0ffee"

# Commands that print data but no --json, and why.
NO_JSON = {
    "logs": "prints the ranks' own text",
    "checkpoints show": "prints a manifest, which is JSON already",
    "monitoring dashboard": "prints the Grafana dashboard, which is JSON already",
    "monitoring prometheus-config": "prints a Prometheus config file to save as it is",
}


@pytest.fixture
def shell(tmp_path) -> Cli:
    return Cli(tmp_path / "home")  # no cluster: nothing to stop afterwards


@pytest.fixture
def recorded(shell, tmp_path) -> dict:
    """A finished two-rank job in the state dir, with logs from both ranks and two committed checkpoints."""
    from stalwart.checkpointing import engine
    from stalwart.checkpointing.storage import open_storage
    from stalwart.orchestrator.store import JobRecord, Store
    from stalwart.spec import JobSpec

    ckpt = tmp_path / "ckpt"
    storage = open_storage(str(ckpt))
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1, keep_last=5)
    for step in (10, 20):
        eng.save(step, {"w": torch.full((64,), float(step))})
        assert eng.wait().committed
    spec = JobSpec.from_dict({"name": "tiny-gpt", "entrypoint": "train:main", "workdir": str(tmp_path),
                              "checkpoint": {"uri": str(ckpt)}})
    shell.home.mkdir(parents=True, exist_ok=True)
    store = Store(shell.home)
    store.add_job(JOB_ID, "tiny-gpt", spec.to_dict(), "SUCCEEDED",
                  {"checkpoint_uri": str(ckpt), "stats": {"step": 20, "loss": 2.0, "last_checkpoint_step": 20}})
    record = JobRecord(store, JOB_ID)
    record.logs([f"[rank {r}] step {s}: loss {3 - s / 10:.1f}\n" for s in range(1, 6) for r in (0, 1)])
    record.event("state", "SUCCEEDED", 1, state="SUCCEEDED")
    record.metrics([{"step": s, "ts": 1000.0 + s, "loss": 3 - s / 10, "attempt": 1} for s in range(1, 6)])
    store.close() if hasattr(store, "close") else None
    return {"ckpt": ckpt}


def test_version(shell):
    proc = shell("--version")
    assert proc.stdout.strip() == f"stalwart {stalwart.__version__}"


def test_shell_completion_is_on(shell):
    assert "--install-completion" in shell("--help").stdout
    script = shell("--show-completion", "bash").stdout
    assert "complete" in script and "_STALWART_COMPLETE" in script
    # What the installed script asks the command for, as bash does on <TAB>.
    words = shell("", env={"_STALWART_COMPLETE": "complete_bash", "COMP_WORDS": "stalwart chec", "COMP_CWORD": "1"})
    assert words.stdout.split() == ["checkpoints"]
    words = shell("", env={"_STALWART_COMPLETE": "complete_bash", "COMP_WORDS": "stalwart logs x --ta",
                           "COMP_CWORD": "3"})
    assert words.stdout.split() == ["--tail"]


def environment_read_by_stalwart() -> set[str]:
    """Every STALWART_*/RAY_*/AWS_* variable stalwart's code reads (by name in its sources)."""
    names = set()
    for path in (REPO / "stalwart").rglob("*.py"):
        names |= set(re.findall(r'"((?:STALWART|RAY|AWS)_[A-Z0-9_]+)"', path.read_text()))
    # Set by stalwart for the user's code in each rank (documented with TrainContext), not read from the user.
    return names - {"STALWART_JOB_ID", "STALWART_ATTEMPT"}


def test_help_names_every_environment_variable(shell):
    text = " ".join(shell("--help", env={"COLUMNS": "200"}).stdout.split())
    missing = sorted(name for name in environment_read_by_stalwart() if name not in text)
    assert not missing, f"not named in `stalwart --help`: {missing}"
    # Options that take a variable say so next to the option.
    assert "[env var: RAY_ADDRESS]" in " ".join(shell("submit", "--help", env={"COLUMNS": "200"}).stdout.split())


def test_every_command_that_prints_data_takes_json():
    import typer.main

    from stalwart.cli import app

    def walk(command, prefix=""):
        for name, sub in getattr(command, "commands", {}).items():
            path = f"{prefix} {name}".strip()
            if getattr(sub, "commands", None):
                yield from walk(sub, path)
            else:
                yield path, sub

    without = sorted(path for path, cmd in walk(typer.main.get_command(app))
                     if not any("--json" in p.opts for p in cmd.params) and path not in NO_JSON)
    assert not without, f"commands without --json: {without}"


def test_logs_tail_and_rank(shell, recorded):
    every = shell("logs", JOB_ID).stdout.splitlines()
    assert len(every) == 10
    assert shell("logs", JOB_ID, "--rank", "1").stdout.splitlines() == [
        f"[rank 1] step {s}: loss {3 - s / 10:.1f}" for s in range(1, 6)]
    assert shell("logs", JOB_ID, "--rank", "0", "--tail", "2").stdout.splitlines() == [
        "[rank 0] step 4: loss 2.6", "[rank 0] step 5: loss 2.5"]
    assert shell("logs", JOB_ID, "-n", "3").stdout.splitlines() == every[-3:]
    assert shell("logs", JOB_ID, "--tail", "0").stdout == ""
    # --follow of a finished job: the tail, then nothing more.
    assert shell("logs", JOB_ID, "--follow", "--rank", "1", "--tail", "1").stdout.splitlines() == [
        "[rank 1] step 5: loss 2.5"]
    bad = shell("logs", JOB_ID, "--tail", "-1", check=False)
    assert bad.returncode == 2 and "--tail" in bad.stderr


def test_json_of_top_watch_and_checkpoints(shell, recorded):
    rows = shell.json("top")
    assert [(r["id"], r["state"]) for r in rows] == [(JOB_ID, "SUCCEEDED")]
    frame = shell.json("watch", JOB_ID)
    assert frame["status"]["state"] == "SUCCEEDED" and len(frame["metrics"]) == 5 and frame["events"]

    assert [(r["step"], r["ok"]) for r in shell.json("checkpoints", "verify", JOB_ID)] == [(20, True), (10, True)]
    shard = next((recorded["ckpt"] / "step-000000020").glob("shard-*"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = shell("checkpoints", "verify", JOB_ID, "--json", check=False)
    assert proc.returncode == 1
    results = {r["step"]: r for r in json.loads(proc.stdout)}
    assert not results[20]["ok"] and results[20]["problem"] and results[10]["ok"]
    deleted = shell.json("checkpoints", "delete", JOB_ID, "20", "--yes")
    assert deleted["step"] == 20 and deleted["deleted_objects"] >= 2
