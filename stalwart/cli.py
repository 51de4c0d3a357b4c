"""The `stalwart` command: a thin Typer + Rich layer over `stalwart.Client`."""

from __future__ import annotations

import json
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from stalwart.errors import StalwartError
from stalwart.spec import JobSpec

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run sharded PyTorch training jobs on Ray and keep them alive.")
console = Console()
err = Console(stderr=True)

AddressOpt = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster address (default: local)")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")
InjectOpt = typer.Option(None, "--inject", help="inject a fault to rehearse recovery, e.g. kill:rank=1,step=40 "
                         "(kinds: kill, nan, hang, spike, error)")
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
STATE_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow", "RUNNING": "cyan",
               "RESTARTING": "magenta", "PENDING": "white"}


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _client(address: Optional[str], start: str = "background"):
    from stalwart.client import Client

    try:
        return Client(address, start=start, say=lambda m: err.print(f"[dim]{m}[/]"))
    except StalwartError as exc:
        _fail(str(exc))


def _load(path: Path, resume_from: Optional[str] = None, inject: Optional[list[str]] = None) -> JobSpec:
    try:
        spec = JobSpec.from_yaml(path)
        if resume_from or inject:
            from stalwart.spec import Fault

            data = spec.to_dict()
            if resume_from:
                data["checkpoint"]["resume_from"] = resume_from
            data["faults"] += [Fault.parse(text).model_dump() for text in inject or []]
            spec = JobSpec.from_dict(data, source=str(path))
        return spec
    except StalwartError as exc:
        _fail(str(exc))


def _fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt(x, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return format(x, spec)


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


# ---- run ---------------------------------------------------------------------------------
@app.command()
def run(spec_path: Path = typer.Argument(..., help="job spec (YAML)"),
        address: Optional[str] = AddressOpt,
        resume_from: Optional[str] = typer.Option(None, "--resume-from", help="start from this committed checkpoint"),
        inject: Optional[list[str]] = InjectOpt,
        as_json: bool = JsonOpt):
    """Submit a job, show its progress live, and wait for it. Ctrl-C cancels it."""
    spec = _load(spec_path, resume_from, inject)
    client = _client(address, start="inprocess")
    try:
        try:
            job = client.submit(spec)
        except StalwartError as exc:
            _fail(str(exc))
        status = job.status()
        err.print(f"job [bold]{job.id}[/]: logs {status['log_path']}, checkpoints {status['checkpoint_uri']}")
        status = _watch(job)
        if as_json:
            console.print_json(json.dumps(status, default=str))
        else:
            _summary(job, status)
    finally:
        client.close()
    raise typer.Exit({"SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 130}.get(status["state"], 1))


def _watch(job) -> dict:
    """Show progress until the job ends; the first Ctrl-C cancels it and waits for the cleanup."""
    cancelled = {"at": None}

    def on_sigint(signum, frame):
        if cancelled["at"] is None:
            cancelled["at"] = time.time()
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    seen_events: list[dict] = []
    since = 0
    try:
        live = Live(console=err, refresh_per_second=4, transient=False) if err.is_terminal else None
        if live:
            live.start()
        last_line = 0.0
        while True:
            if cancelled["at"] is not None and cancelled.get("sent") is None:
                job.cancel("cancelled from the terminal (Ctrl-C)")
                cancelled["sent"] = True
            status = job.status()
            new = job.events(since)
            if new:
                since = new[-1]["seq"]
                seen_events.extend(new)
                if not live:
                    for e in new:
                        err.print(f"[dim]{_clock(e['ts'])}[/] {e['message']}", highlight=False)
            if live:
                live.update(_progress_view(job.id, status, seen_events[-6:], cancelled["at"] is not None))
            elif time.time() - last_line > 10 and status["state"] == "RUNNING":
                err.print(_progress_line(status), highlight=False)
                last_line = time.time()
            if status["state"] in TERMINAL:
                if live:
                    live.stop()
                return status
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGINT, previous)


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def _progress_line(s: dict) -> str:
    total = f"/{s['max_steps']}" if s.get("max_steps") else ""
    tps = s.get("tokens_per_s")
    return (f"step {s.get('step', 0)}{total}  loss {_fmt(s.get('loss'))}  "
            f"tokens/s {tps:,.0f}  ETA {_fmt_time(s.get('eta_s'))}" if tps else
            f"step {s.get('step', 0)}{total}  loss {_fmt(s.get('loss'))}")


def _progress_view(job_id: str, s: dict, events: list[dict], cancelling: bool):
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    state = s["state"] + (" (cancelling...)" if cancelling and s["state"] not in TERMINAL else "")
    grid.add_row("state", _state(state))
    if s.get("reason") and s["state"] in ("PENDING", "RESTARTING", "FAILED"):
        grid.add_row("", Text(s["reason"], style="dim"))
    total = s.get("max_steps")
    step = s.get("step") or 0
    bar = ""
    if total:
        filled = int(30 * min(step, total) / total)
        bar = "  " + "█" * filled + "░" * (30 - filled)
    grid.add_row("step", f"{step}{'/' + str(total) if total else ''}{bar}")
    grid.add_row("loss", _fmt(s.get("loss")))
    tps = s.get("tokens_per_s")
    grid.add_row("tokens/s", f"{tps:,.0f}" if tps else "-")
    grid.add_row("ETA", _fmt_time(s.get("eta_s")))
    restarts = s.get("restarts") or {}
    grid.add_row("attempt", f"{s.get('attempt', 1)}" + (f"  restarts: {restarts}" if restarts else ""))
    ck = s.get("last_checkpoint_step")
    grid.add_row("checkpoint", f"step {ck}" if ck is not None else "-")
    lines = [Text(f"{_clock(e['ts'])} {e['message']}", style="dim") for e in events]
    return Panel(Group(grid, Text(""), *lines), title=f"stalwart · {job_id}", border_style="blue")


def _summary(job, s: dict) -> None:
    state = s["state"]
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("job", job.id)
    table.add_row("state", _state(state))
    if s.get("reason") and state != "SUCCEEDED":
        table.add_row("reason", s["reason"])
    table.add_row("steps", str(s.get("step", 0)))
    table.add_row("final loss", _fmt(s.get("loss")))
    attempts = s.get("attempts") or []
    if attempts:
        table.add_row("duration", _fmt_time((attempts[-1].get("ended") or time.time()) - attempts[0]["started"]))
    table.add_row("attempts", str(len(attempts)))
    if s.get("restarts"):
        table.add_row("restarts", ", ".join(f"{k}: {v}" for k, v in s["restarts"].items()))
    if s.get("last_checkpoint"):
        table.add_row("last checkpoint", s["last_checkpoint"])
    table.add_row("logs", s.get("log_path", "-"))
    console.print(Panel(table, title="summary", border_style=STATE_STYLE.get(state, "white")))
    if state == "FAILED" and s.get("traceback"):
        console.print(Panel(Text(s["traceback"].rstrip()), title=f"rank {s.get('rank')} traceback", border_style="red"))


# ---- submit and friends --------------------------------------------------------------------
@app.command()
def submit(spec_path: Path = typer.Argument(..., help="job spec (YAML)"), address: Optional[str] = AddressOpt,
           resume_from: Optional[str] = typer.Option(None, "--resume-from"),
           inject: Optional[list[str]] = InjectOpt, as_json: bool = JsonOpt):
    """Submit a job and print its id at once."""
    spec = _load(spec_path, resume_from, inject)
    client = _client(address)
    try:
        job = client.submit(spec)
    except StalwartError as exc:
        _fail(str(exc))
    if as_json:
        console.print_json(json.dumps({"id": job.id}))
    else:
        console.print(job.id)


@app.command("list")
def list_jobs(address: Optional[str] = AddressOpt, as_json: bool = JsonOpt):
    """All jobs this controller knows."""
    jobs = _client(address).jobs()
    if as_json:
        console.print_json(json.dumps(jobs, default=str))
        return
    table = Table("id", "state", "step", "loss", "tokens/s", "attempt", "submitted")
    for j in jobs:
        steps = f"{j.get('step', '-')}" + (f"/{j['max_steps']}" if j.get("max_steps") else "")
        tps = j.get("tokens_per_s")
        table.add_row(j["id"], _state(j["state"]), steps, _fmt(j.get("loss")), f"{tps:,.0f}" if tps else "-",
                      str(j.get("attempt", "-")), _clock(j["created"]))
    console.print(table)


def _job(address, job_id):
    client = _client(address)
    try:
        return client.job(job_id)
    except StalwartError as exc:
        _fail(str(exc))


@app.command()
def status(job_id: str, address: Optional[str] = AddressOpt, as_json: bool = JsonOpt):
    """One job's state, progress, attempts and (if it failed) the failing rank's traceback."""
    job = _job(address, job_id)
    s = job.status()
    if as_json:
        console.print_json(json.dumps(s, default=str))
        return
    console.print(_progress_view(job_id, s, [], False))
    if s.get("attempts"):
        table = Table("attempt", "ranks", "started", "ended", "cause", "error")
        for a in s["attempts"]:
            table.add_row(str(a["attempt"]), str(a["world_size"]), _clock(a["started"]),
                          _clock(a["ended"]) if a["ended"] else "-", a["cause"] or "-", (a["error"] or "")[:80])
        console.print(table)
    console.print(f"logs: {s['log_path']}\ncheckpoints: {s['checkpoint_uri']}")
    if s["state"] == "FAILED" and s.get("traceback"):
        console.print(Panel(Text(s["traceback"].rstrip()), title=f"rank {s.get('rank')} traceback", border_style="red"))


@app.command()
def logs(job_id: str, follow: bool = typer.Option(False, "--follow", "-f"), address: Optional[str] = AddressOpt):
    """What the job's ranks printed."""
    job = _job(address, job_id)
    if follow:
        for chunk in job.follow_logs():
            sys.stdout.write(chunk)
            sys.stdout.flush()
    else:
        sys.stdout.write(job.logs())


@app.command()
def events(job_id: str, address: Optional[str] = AddressOpt, as_json: bool = JsonOpt):
    """The job's events: state changes, attempts, faults, checkpoints."""
    evs = _job(address, job_id).events()
    if as_json:
        console.print_json(json.dumps(evs, default=str))
        return
    table = Table("time", "attempt", "kind", "message")
    for e in evs:
        table.add_row(_clock(e["ts"]), str(e["attempt"] or "-"), e["kind"], e["message"])
    console.print(table)


@app.command()
def cancel(job_id: str, address: Optional[str] = AddressOpt,
           wait: bool = typer.Option(True, help="wait until the job is CANCELLED")):
    """Cancel a job: its workers stop and its resources are released."""
    job = _job(address, job_id)
    result = job.cancel()
    if wait and result not in TERMINAL:
        s = job.wait(timeout=120, raise_on_failure=False)
        result = s["state"]
    console.print(f"{job_id}: {result}")


@app.command()
def validate(spec_path: Path = typer.Argument(..., help="job spec (YAML)"), as_json: bool = JsonOpt):
    """Check a spec without running it."""
    spec = _load(spec_path)
    if as_json:
        console.print_json(json.dumps(spec.to_dict()))
    else:
        console.print(f"[green]ok[/]: {spec_path} is a valid job spec ({spec.name}, {spec.resources.workers} "
                      f"x {spec.strategy.name} ranks, entrypoint {spec.entrypoint})")


@app.command()
def up(num_cpus: Optional[int] = typer.Option(None, help="CPUs to offer (default: all)")):
    """Start a local Ray head and the controller in the background."""
    from stalwart.client import Client
    from stalwart.orchestrator import cluster

    home = cluster.home_dir()
    record = cluster.local_cluster(home)
    if record is None:
        record = cluster.start_background(home, num_cpus=num_cpus)
        err.print(f"started a local Ray head at {record['address']}")
    else:
        err.print(f"a local cluster is already running at {record['address']}")
    client = Client(record["address"], start="never")
    console.print(f"controller ready (state in {client.controller_info['home']}).\n"
                  f"Use it: `stalwart submit job.yaml`, or `--address {record['address']}` / "
                  f"RAY_ADDRESS={record['address']}. Stop it: `stalwart down`.")


@app.command()
def down():
    """Cancel running jobs and stop the local cluster that `stalwart up` (or `submit`) started."""
    from stalwart.client import Client
    from stalwart.orchestrator import cluster

    home = cluster.home_dir()
    record = cluster.local_cluster(home)
    if record is None:
        console.print("no local cluster is running")
        return
    try:
        client = Client(record["address"], start="never")
        ids = client._call("cancel_all", "the local cluster is going down", timeout=120)
        if ids:
            console.print(f"cancelled {len(ids)} job(s): {', '.join(ids)}")
        client.close()
    except StalwartError as exc:
        err.print(f"[yellow]could not reach the controller ({exc}); stopping Ray anyway[/]")
    cluster.stop_background(home)
    console.print("local cluster stopped")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
