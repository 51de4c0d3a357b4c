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


# ---- checkpoints ---------------------------------------------------------------------------
ckpt_app = typer.Typer(no_args_is_help=True, help="List, inspect, verify and delete committed checkpoints.")
app.add_typer(ckpt_app, name="checkpoints")
WhereArg = typer.Argument(..., help="a job id, or a checkpoint URI (file:///dir, a path, s3://bucket/prefix)")
EndpointOpt = typer.Option(None, "--endpoint-url", envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint")


def _storage(where: str, address: Optional[str], endpoint_url: Optional[str]):
    from stalwart.checkpointing.engine import resolve
    from stalwart.spec import S3Options

    options = S3Options(endpoint_url=endpoint_url) if endpoint_url else None
    if "://" not in where and "/" not in where:  # a job id: ask the controller where its checkpoints are
        status = _job(address, where).status()
        where = status["checkpoint_uri"]
        spec = _job(address, status["id"]).client._call("job_spec", status["id"])
        options = options or S3Options.model_validate(spec["checkpoint"]["s3"])
    try:
        return resolve(where, options)
    except StalwartError as exc:
        _fail(str(exc))


@ckpt_app.command("list")
def checkpoints_list(where: str = WhereArg, address: Optional[str] = AddressOpt,
                     endpoint_url: Optional[str] = EndpointOpt, as_json: bool = JsonOpt):
    """Saved checkpoints, newest first; only committed ones (with a manifest) can be loaded."""
    from stalwart.checkpointing.engine import describe

    storage, _ = _storage(where, address, endpoint_url)
    try:
        rows = describe(storage)
    except StalwartError as exc:
        _fail(str(exc))
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    table = Table("step", "committed", "ranks", "size", "created", "loss", "uri")
    for r in rows:
        table.add_row(str(r["step"]), Text("yes", "green") if r["committed"] else Text(r.get("problem", "no"), "red"),
                      str(r.get("world_size", "-")), f"{r['bytes'] / 1e6:.1f} MB" if "bytes" in r else "-",
                      _clock(r["created_at"]) if "created_at" in r else "-", _fmt(r.get("loss")), r["uri"])
    console.print(table)


@ckpt_app.command("show")
def checkpoints_show(where: str = WhereArg, step: Optional[int] = typer.Argument(None, help="default: newest"),
                     address: Optional[str] = AddressOpt, endpoint_url: Optional[str] = EndpointOpt):
    """Print a checkpoint's manifest."""
    from stalwart.checkpointing.engine import committed_steps, read_manifest

    storage, named = _storage(where, address, endpoint_url)
    try:
        step = step if step is not None else named if named is not None else (committed_steps(storage) or [None])[0]
        if step is None:
            _fail(f"no committed checkpoint under {storage.uri}")
        console.print_json(json.dumps(read_manifest(storage, step), default=str))
    except StalwartError as exc:
        _fail(str(exc))


@ckpt_app.command("verify")
def checkpoints_verify(where: str = WhereArg, step: Optional[int] = typer.Argument(None, help="default: all"),
                       address: Optional[str] = AddressOpt, endpoint_url: Optional[str] = EndpointOpt):
    """Read every shard and check sizes and checksums against the manifest. Exit 1 if any fails."""
    from stalwart.checkpointing.engine import committed_steps, load
    from stalwart.errors import CheckpointCorrupt

    storage, named = _storage(where, address, endpoint_url)
    steps = [step] if step is not None else [named] if named is not None else committed_steps(storage)
    bad = 0
    for s in steps:
        try:
            load(storage, s, 0)
            console.print(f"[green]ok[/]      step {s}")
        except CheckpointCorrupt as exc:
            bad += 1
            console.print(f"[red]corrupt[/] step {s}: {exc.reason}")
        except StalwartError as exc:
            _fail(str(exc))
    if not steps:
        console.print(f"no committed checkpoint under {storage.uri}")
    raise typer.Exit(1 if bad else 0)


@ckpt_app.command("delete")
def checkpoints_delete(where: str = WhereArg, step: int = typer.Argument(...),
                       yes: bool = typer.Option(False, "--yes", help="do not ask"),
                       address: Optional[str] = AddressOpt, endpoint_url: Optional[str] = EndpointOpt):
    """Delete one checkpoint (manifest first, then its shards)."""
    from stalwart.checkpointing.engine import delete_checkpoint, step_dir

    storage, _ = _storage(where, address, endpoint_url)
    if not yes and not typer.confirm(f"delete {storage.uri}/{step_dir(step)}?"):
        raise typer.Exit(1)
    try:
        n = delete_checkpoint(storage, step)
    except StalwartError as exc:
        _fail(str(exc))
    console.print(f"deleted {n} object(s) of step {step}" if n else f"nothing saved at step {step}")


# ---- monitoring: Prometheus config, Grafana dashboard, top, watch, report -----------------------
monitoring_app = typer.Typer(no_args_is_help=True,
                             help="Prometheus and Grafana: the controller's scrape config and the dashboard.")
app.add_typer(monitoring_app, name="monitoring")

SPARK = "▁▂▃▄▅▆▇█"


@monitoring_app.command("dashboard")
def monitoring_dashboard():
    """Print the Grafana dashboard (JSON): import it as-is and pick your Prometheus data source."""
    from importlib.resources import files

    sys.stdout.write(files("stalwart.monitoring").joinpath("dashboard.json").read_text())


@monitoring_app.command("prometheus-config")
def monitoring_prometheus_config(address: Optional[str] = AddressOpt,
                                 interval: str = typer.Option("15s", help="scrape interval")):
    """Print a Prometheus config that scrapes the controller's metrics endpoint."""
    from urllib.parse import urlparse

    client = _client(address)
    try:
        endpoint = client._call("metrics_endpoint")
    except StalwartError as exc:
        _fail(str(exc))
    if not endpoint:
        _fail("the controller serves no metrics endpoint (its port could not be bound; see the controller's log)")
    url = urlparse(endpoint)
    sys.stdout.write(
        f"# Prometheus scrape config for the stalwart controller's metrics at {endpoint}\n"
        f"# (bound to 127.0.0.1 on the controller's node: run Prometheus there, or forward the port).\n"
        f"# Use as prometheus.yml, or copy the job under scrape_configs into yours.\n"
        f"global:\n"
        f"  scrape_interval: {interval}\n"
        f"scrape_configs:\n"
        f"  - job_name: stalwart\n"
        f"    scrape_interval: {interval}\n"
        f"    metrics_path: {url.path or '/metrics'}\n"
        f"    static_configs:\n"
        f"      - targets: ['{url.netloc}']\n")


def _sparkline(values: list, width: int = 16) -> Text:
    """The last `width` values as block characters, scaled between their min and max; × marks NaN/Inf."""
    vals = [_as_float(v) for v in values][-width:]
    finite = [v for v in vals if v is not None and v == v and abs(v) != float("inf")]
    text = Text()
    if not finite:
        return text
    lo, hi = min(finite), max(finite)
    for v in vals:
        if v is None:
            continue
        if v != v or abs(v) == float("inf"):
            text.append("×", style="bold red")
            continue
        i = 0 if hi == lo else round((v - lo) / (hi - lo) * (len(SPARK) - 1))
        text.append(SPARK[i], style="cyan")
    return text


def _as_float(x):
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _ago(ts) -> str:
    return "-" if not ts else _fmt_time(max(0.0, time.time() - ts))


def _attempt(s: dict):
    # A finished job's status says attempt 0; its attempts list still knows the last one.
    return s.get("attempt") or len(s.get("attempts") or []) or "-"


def _restarts(r: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((r or {}).items()) if v) or "0"


class _TopState:
    """What `stalwart top` remembers between frames: loss histories and finished jobs' status."""

    def __init__(self, client, history: int = 60):
        self.client = client
        self.losses: dict[str, list] = {}
        self.last_step: dict[str, int] = {}
        self.final: dict[str, dict] = {}
        self.history = history

    def status(self, job_id: str) -> dict:
        if job_id in self.final:
            return self.final[job_id]
        s = self.client._call("status", job_id)
        if s["state"] in TERMINAL:
            self.final[job_id] = s
        if job_id not in self.losses:  # seed from the stored metrics once; later frames append
            self.losses[job_id] = [m.get("loss") for m in self.client._call("metrics", job_id)][-self.history:]
            self.last_step[job_id] = s.get("step") or 0
        elif (s.get("step") or 0) != self.last_step.get(job_id):
            self.losses[job_id] = (self.losses[job_id] + [s.get("loss")])[-self.history:]
            self.last_step[job_id] = s.get("step") or 0
        return s


def _top_frame(state: _TopState, limit: int):
    jobs = state.client.jobs()
    live = [j for j in jobs if j["state"] not in TERMINAL]
    done = [j for j in jobs if j["state"] in TERMINAL][-limit:] if limit else []
    hidden = len(jobs) - len(live) - len(done)
    table = Table(title=f"stalwart top · {_clock(time.time())}", title_justify="left", expand=False)
    table.add_column("job", no_wrap=True)
    for name in ("state", "step", "loss", "", "tokens/s", "ckpt age", "attempt"):
        table.add_column(name, no_wrap=True, justify="left" if name in ("state", "") else "right")
    table.add_column("restarts")
    for j in done + live:
        try:
            s = state.status(j["id"])
        except StalwartError:
            continue
        total = f"/{s['max_steps']}" if s.get("max_steps") else ""
        tps = s.get("tokens_per_s")
        table.add_row(j["id"], _state(s["state"]), f"{s.get('step') or 0}{total}", _fmt(s.get("loss")),
                      _sparkline(state.losses.get(j["id"], [])), f"{tps:,.0f}" if tps else "-",
                      _ago(s.get("last_checkpoint_at")), str(_attempt(s)), _restarts(s.get("restarts")))
    if hidden:
        table.caption = f"{hidden} older finished job(s) not shown (--limit)"
    if not jobs:
        table.caption = "no jobs yet"
    return table


@app.command()
def top(address: Optional[str] = AddressOpt,
        once: bool = typer.Option(False, "--once", help="print one frame and exit"),
        interval: float = typer.Option(2.0, help="seconds between frames"),
        limit: int = typer.Option(20, help="finished jobs to show (the most recent)")):
    """All jobs, live: state, step, loss with a sparkline, tokens/s, checkpoint age, restarts."""
    state = _TopState(_client(address))
    if once:
        console.print(_top_frame(state, limit))
        return
    try:
        with Live(_top_frame(state, limit), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(_top_frame(state, limit))
    except KeyboardInterrupt:
        pass


_BRAILLE_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [row % 4][col % 2]


def _braille_plot(points: list[tuple[float, float]], width: int = 64, height: int = 12,
                  marks: list[float] | None = None) -> Text:
    """A line chart of (x, y) points in braille dots (2x4 per character), with y labels and x range.

    `marks` are x positions flagged under the chart with ▲ (restarts)."""
    pts = [(x, y) for x, y in points if y is not None and y == y and abs(y) != float("inf")]
    if len(pts) < 2:
        return Text("(not enough data for a curve yet)", style="dim")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if x1 == x0:
        x1 = x0 + 1
    cols, rows = width * 2, height * 4
    grid = [[0] * width for _ in range(height)]

    def dot(c: int, r: int) -> None:
        if 0 <= c < cols and 0 <= r < rows:
            grid[r // 4][c // 2] |= _BRAILLE_BITS[r % 4][c % 2]

    def to(x: float, y: float) -> tuple[int, int]:
        return round((x - x0) / (x1 - x0) * (cols - 1)), round((y1 - y) / (y1 - y0) * (rows - 1))

    prev = None
    for x, y in pts:
        c, r = to(x, y)
        if prev is not None and c >= prev[0]:  # join the dots; a step backwards (a restart) starts a new line
            pc, pr = prev
            n = max(abs(c - pc), abs(r - pr), 1)
            for i in range(n + 1):
                dot(round(pc + (c - pc) * i / n), round(pr + (r - pr) * i / n))
        else:
            dot(c, r)
        prev = (c, r)
    label_w = max(len(f"{y1:.3g}"), len(f"{y0:.3g}"))
    out = Text()
    for i, row in enumerate(grid):
        label = f"{y1:.3g}" if i == 0 else f"{y0:.3g}" if i == height - 1 else (
            f"{(y0 + y1) / 2:.3g}" if i == height // 2 else "")
        out.append(f"{label:>{label_w}} ┤", style="dim")
        out.append("".join(chr(0x2800 + b) for b in row), style="cyan")
        out.append("\n")
    if marks:
        line = [" "] * width
        for m in marks:
            if x0 <= m <= x1:
                line[min(width - 1, round((m - x0) / (x1 - x0) * (width - 1)))] = "▲"
        out.append(" " * (label_w + 2) + "".join(line) + "\n", style="magenta")
    left, right = f"step {x0:g}", f"{x1:g}"
    out.append(" " * (label_w + 2) + left + " " * max(1, width - len(left) - len(right)) + right, style="dim")
    return out


def _curve(metrics: list[dict]) -> tuple[list[tuple[float, float]], list[float]]:
    """Loss points in report order, and the steps where a new attempt took over."""
    points, marks, attempt = [], [], None
    for m in metrics:
        if attempt is not None and m.get("attempt") != attempt:
            marks.append(m["step"])
        attempt = m.get("attempt")
        points.append((m["step"], _as_float(m.get("loss"))))
    return points, marks


def _watch_view(job_id: str, s: dict, metrics: list[dict], evs: list[dict], width: int):
    grid = Table.grid(padding=(0, 2))
    for _ in range(4):
        grid.add_column()
    total = f"/{s['max_steps']}" if s.get("max_steps") else ""
    tps = s.get("tokens_per_s")
    grid.add_row(Text("state", style="bold"), _state(s["state"]),
                 Text("step", style="bold"), f"{s.get('step') or 0}{total}  ETA {_fmt_time(s.get('eta_s'))}")
    grid.add_row(Text("loss", style="bold"), _fmt(s.get("loss")),
                 Text("tokens/s", style="bold"), f"{tps:,.0f}" if tps else "-")
    ck = s.get("last_checkpoint_step")
    grid.add_row(Text("attempt", style="bold"), f"{_attempt(s)} (restarts: {_restarts(s.get('restarts'))})",
                 Text("checkpoint", style="bold"),
                 f"step {ck}, {_ago(s.get('last_checkpoint_at'))} ago" if ck is not None else "-")
    points, marks = _curve(metrics)
    plot = _braille_plot(points, width=max(20, width - 16), marks=marks)
    shown: list[tuple[dict, int]] = []  # a run of checkpoint commits shows as its newest, with a count
    for e in evs:
        if e["kind"] == "checkpoint_committed" and shown and shown[-1][0]["kind"] == "checkpoint_committed":
            shown[-1] = (e, shown[-1][1] + 1)
        else:
            shown.append((e, 1))
    lines = [Text.assemble((f"{_clock(e['ts'])} ", "dim"), (f"{e['kind']:<22}", "bold"), e["message"],
                           (f"  (+{n - 1} earlier)" if n > 1 else "", "dim"))
             for e, n in shown[-10:]]
    return Group(Panel(grid, title=f"stalwart watch · {job_id}", border_style="blue"),
                 Panel(plot, title="loss (▲ = a new attempt)", border_style="cyan"),
                 Panel(Group(*lines) if lines else Text("no events yet", style="dim"), title="events",
                       border_style="dim"))


@app.command()
def watch(job_id: str, address: Optional[str] = AddressOpt,
          once: bool = typer.Option(False, "--once", help="print one frame and exit"),
          interval: float = typer.Option(2.0, help="seconds between frames")):
    """One job, live: its loss curve drawn in the terminal, and its events as they arrive."""
    job = _job(address, job_id)
    evs = job.events()
    s = job.status()
    width = min(console.width, 120)
    if once:
        console.print(_watch_view(job_id, s, job.metrics(), evs, width))
        return
    try:
        with Live(_watch_view(job_id, s, job.metrics(), evs, width), console=console, refresh_per_second=4) as live:
            while s["state"] not in TERMINAL:
                time.sleep(interval)
                s = job.status()
                evs += job.events(evs[-1]["seq"] if evs else 0)
                live.update(_watch_view(job_id, s, job.metrics(), evs, min(console.width, 120)))
    except KeyboardInterrupt:
        pass


@app.command()
def report(job_id: str, out: Path = typer.Option(Path("report.png"), "--out", "-o", help="PNG to write"),
           address: Optional[str] = AddressOpt):
    """Draw the run's story to a PNG: loss and grad norm over steps, with attempts, checkpoints and faults."""
    job = _job(address, job_id)
    path = _draw_report(job_id, job.status(), job.metrics(), job.events(), out)
    console.print(f"wrote {path}")


def _draw_report(job_id: str, s: dict, metrics: list[dict], evs: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    has_gn = any(_as_float(m.get("grad_norm")) is not None for m in metrics)
    fig, axes = plt.subplots(2 if has_gn else 1, 1, sharex=True, figsize=(12, 7.5 if has_gn else 5),
                             gridspec_kw={"height_ratios": [3, 2]} if has_gn else None, squeeze=False)
    ax, gax = axes[0][0], (axes[1][0] if has_gn else None)
    colors = plt.get_cmap("tab10").colors

    by_attempt: dict = {}
    for m in metrics:
        by_attempt.setdefault(m.get("attempt") or 1, []).append(m)
    n_attempts = len(by_attempt)
    for i, (attempt, ms) in enumerate(sorted(by_attempt.items())):
        steps = [m["step"] for m in ms]
        loss = [_as_float(m.get("loss")) for m in ms]
        color = colors[i % len(colors)]
        # Earlier attempts wide and pale underneath: where a restart retraces them, both stay visible.
        lw, alpha = (1.3, 1.0) if i == n_attempts - 1 else (3.5, 0.45)
        ax.plot(steps, [v if v is not None else float("nan") for v in loss], color=color, lw=lw, alpha=alpha,
                label=f"attempt {attempt}", zorder=2 + i)
        bad = [(st_, v) for st_, v in zip(steps, loss) if v is not None and (v != v or abs(v) == float("inf"))]
        for st_, _ in bad:
            ax.axvline(st_, color="red", lw=0.8, alpha=0.6)
        if gax is not None:
            gn = [_as_float(m.get("grad_norm")) for m in ms]
            gax.plot(steps, [v if v is not None else float("nan") for v in gn], color=color,
                     lw=1.0 if i == n_attempts - 1 else 3.0, alpha=alpha, zorder=2 + i)

    # Restarts: each attempt after the first starts at the step it restored from; shade the redone work.
    restored = {e["attempt"]: e["data"].get("step") for e in evs if e["kind"] == "restored"}
    faults = [e for e in evs if e["kind"] == "fault"]
    for i, (attempt, ms) in enumerate(sorted(by_attempt.items())):
        if i == 0:
            continue
        start = restored.get(attempt, ms[0]["step"] - 1) or 0
        prev = sorted(by_attempt.items())[i - 1][1]
        lost_to = max(m["step"] for m in prev)
        for a in (ax, gax):
            if a is None:
                continue
            a.axvline(start, color="magenta", ls="--", lw=1.2)
            if lost_to > start:
                a.axvspan(start, lost_to, color="magenta", alpha=0.08)
        ax.annotate(f"attempt {attempt}\nresumes from step {start}", xy=(start, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(4, -4), textcoords="offset points", va="top", fontsize=8, color="magenta")

    # Faults (rollbacks, skips, restarts, the final failure): a red cross on the loss curve where it happened.
    last_loss = {}
    for m in metrics:
        last_loss.setdefault(m.get("attempt") or 1, {})[m["step"]] = _as_float(m.get("loss"))
    for e in faults:
        step = e["data"].get("step")
        if step is None:
            continue
        y = last_loss.get(e["attempt"], {}).get(step)
        what = e["data"].get("cause") or "fault"
        rank = e["data"].get("rank")
        label = f"{what}" + (f" (rank {rank})" if rank is not None else "")
        label += "\nrestart" if e["data"].get("restart") else "\nno restart"
        if y is not None and y == y:
            ax.plot([step], [y], marker="X", color="red", ms=10, zorder=5)
            ax.annotate(label, xy=(step, y), xytext=(6, 10), textcoords="offset points", fontsize=8, color="red")
        else:
            ax.axvline(step, color="red", lw=1.0)
            ax.annotate(label, xy=(step, 0.5), xycoords=("data", "axes fraction"), fontsize=8, color="red")
    for e in evs:
        if e["kind"] == "checkpoint_skipped" and e["data"].get("step") is not None:
            ax.plot([e["data"]["step"]], [0.03], marker="x", color="orange", ms=8,
                    transform=ax.get_xaxis_transform(), clip_on=False)

    # Committed checkpoints: green ticks along the bottom of the loss axes.
    ckpts = sorted({e["data"].get("step") for e in evs if e["kind"] == "checkpoint_committed"} - {None})
    if ckpts:
        ax.plot(ckpts, [0.0] * len(ckpts), ls="none", marker="^", color="green", ms=7,
                transform=ax.get_xaxis_transform(), clip_on=False, zorder=6)

    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], ls="none", marker="^", color="green", label="checkpoint committed"),
                Line2D([], [], ls="none", marker="X", color="red", label="fault")]
    if len(by_attempt) > 1:
        handles += [Line2D([], [], ls="--", color="magenta", label="restart: resumed from checkpoint"),
                    Patch(color="magenta", alpha=0.15, label="work redone after a rollback")]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    if gax is not None:
        gax.set_ylabel("grad norm")
        gn_vals = [v for m in metrics if (v := _as_float(m.get("grad_norm"))) is not None and v > 0 and v == v]
        if gn_vals and max(gn_vals) / max(min(gn_vals), 1e-12) > 50:
            gax.set_yscale("log")
        gax.grid(alpha=0.3)
        gax.set_xlabel("step")
    else:
        ax.set_xlabel("step")

    attempts = s.get("attempts") or []
    duration = ""
    if attempts and attempts[0].get("started"):
        duration = f" · {_fmt_time((attempts[-1].get('ended') or time.time()) - attempts[0]['started'])}"
    final = _fmt(s.get("loss"))
    fig.suptitle(f"{job_id}: {s.get('state', '?')} at step {s.get('step') or 0}{duration} · "
                 f"{len(attempts) or len(by_attempt)} attempt(s), restarts: {_restarts(s.get('restarts'))} · "
                 f"final loss {final} · {len(ckpts)} checkpoint(s)", fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    app()


if __name__ == "__main__":
    main()
