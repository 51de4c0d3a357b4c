"""Job commands: run, submit, list, status, logs, events, cancel, validate. Thin over `Client`."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Column, Table
from rich.text import Text

from stalwart.cli.common import (STATE_STYLE, TERMINAL, AddressOpt, InjectOpt, JsonOpt, app, clock, connect, console, err, fail,
                                 fmt, fmt_time, goodput_line, interval_line, job_handle, load_spec, print_json, reader,
                                 restore_line, stale_note, styled_state)
from stalwart.errors import StalwartError

InitFromOpt = typer.Option(None, "--init-from", help="start from these weights (a torch.distributed.checkpoint folder "
                           "or safetensors), at step 0 with a fresh optimizer (checkpoint.init_from)")


@app.command()
def run(spec_path: Path = typer.Argument(..., help="job spec (YAML)"),
        address: Optional[str] = AddressOpt,
        resume_from: Optional[str] = typer.Option(None, "--resume-from", help="start from this committed checkpoint"),
        init_from: Optional[str] = InitFromOpt,
        inject: Optional[list[str]] = InjectOpt,
        as_json: bool = JsonOpt):
    """Submit a job, show its progress live, and wait for it. Ctrl-C or SIGTERM (`ray job stop`) cancels it."""
    spec = load_spec(spec_path, resume_from, inject, init_from)
    client = connect(address, start="inprocess")
    stops = _StopRequests().install()  # after connecting: ray.init sets a SIGTERM handler of its own
    try:
        try:
            job = client.submit(spec)
        except StalwartError as exc:
            fail(str(exc))
        status = job.status()
        err.print(f"job [bold]{job.id}[/]: logs {status['log_path']}, checkpoints {status['checkpoint_uri']}")
        status = _watch(job, stops)
        if as_json:
            console.print_json(json.dumps(status, default=str))
        else:
            _summary(job, status)
    finally:
        stops.restore()
        client.close()
    raise typer.Exit({"SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 130}.get(status["state"], 1))


class _StopRequests:
    """While `run` waits: SIGINT (Ctrl-C) and SIGTERM (`ray job stop` of a `stalwart run` driver, `kill`,
    a container stop) ask to cancel the job, which the wait loop does and then waits for the cleanup.
    A second Ctrl-C stops waiting; a second SIGTERM changes nothing (the sender's SIGKILL will come)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.reason: Optional[str] = None
        self._previous: dict = {}

    def install(self) -> "_StopRequests":
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = ("cancelled from the terminal (Ctrl-C)" if signum == signal.SIGINT else
                           "cancelled: the `stalwart run` process received SIGTERM (ray job stop, kill)")
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt


def _watch(job, stops: _StopRequests) -> dict:
    """Show progress until the job ends; a stop request cancels it and waits for the cleanup."""
    sent = False
    seen_events: list[dict] = []
    since = 0
    live = Live(console=err, refresh_per_second=4, transient=False) if err.is_terminal else None
    try:
        if live:
            live.start()
        last_line = 0.0
        while True:
            if stops.reason is not None and not sent:
                job.cancel(stops.reason)
                sent = True
            status = job.status()
            new = job.events(since)
            if new:
                since = new[-1]["seq"]
                seen_events.extend(new)
                if not live:
                    for e in new:
                        err.print(f"[dim]{clock(e['ts'])}[/] {escape(e['message'])}", highlight=False)
            if live:
                live.update(_progress_view(job.id, status, seen_events[-6:], stops.reason is not None))
            elif time.time() - last_line > 10 and status["state"] == "RUNNING":
                err.print(_progress_line(status), highlight=False)
                last_line = time.time()
            if status["state"] in TERMINAL:
                if live:
                    live.stop()
                return status
            time.sleep(0.5)
    finally:
        if live:
            live.stop()



def _progress_line(s: dict) -> str:
    total = f"/{s['max_steps']}" if s.get("max_steps") else ""
    tps = s.get("tokens_per_s")
    return (f"step {s.get('step', 0)}{total}  loss {fmt(s.get('loss'))}  "
            f"tokens/s {tps:,.0f}  ETA {fmt_time(s.get('eta_s'))}" if tps else
            f"step {s.get('step', 0)}{total}  loss {fmt(s.get('loss'))}")


def _progress_view(job_id: str, s: dict, events: list[dict], cancelling: bool):
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    state = s["state"] + (" (cancelling...)" if cancelling and s["state"] not in TERMINAL else "")
    grid.add_row("state", styled_state(state))
    if s.get("reason") and s["state"] in ("PENDING", "RESTARTING", "FAILED"):
        grid.add_row("", Text(s["reason"], style="dim"))
    total = s.get("max_steps")
    step = s.get("step") or 0
    bar = ""
    if total:
        filled = int(30 * min(step, total) / total)
        bar = "  " + "█" * filled + "░" * (30 - filled)
    grid.add_row("step", f"{step}{'/' + str(total) if total else ''}{bar}")
    grid.add_row("loss", fmt(s.get("loss")))
    tps = s.get("tokens_per_s")
    grid.add_row("tokens/s", f"{tps:,.0f}" if tps else "-")
    if s["state"] not in TERMINAL:
        grid.add_row("ETA", fmt_time(s.get("eta_s")))
    restarts = s.get("restarts") or {}
    grid.add_row("attempt", f"{s.get('attempt', 1)}" + (
        "  restarts: " + ", ".join(f"{cause} {n}" for cause, n in restarts.items()) if restarts else ""))
    ck = s.get("last_checkpoint_step")
    grid.add_row("checkpoint", f"step {ck}" if ck is not None else "-")
    if s.get("checkpoint_warning"):
        grid.add_row("", Text(s["checkpoint_warning"], style="bold yellow"))
    if auto := interval_line(s.get("checkpoint_interval")):
        grid.add_row("auto", auto)
    if restore := restore_line(s.get("restore")):
        grid.add_row("restoring", restore)
    if goodput := goodput_line(s.get("goodput")):
        grid.add_row("goodput", goodput)
    lines = [Text(f"{clock(e['ts'])} {e['message']}", style="dim") for e in events]
    return Panel(Group(grid, Text(""), *lines), title=f"stalwart · {job_id}", border_style="blue")


def _summary(job, s: dict) -> None:
    state = s["state"]
    table = Table(Column(no_wrap=True), Column(overflow="fold"),  # URIs and paths whole, to copy
                  show_header=False, box=None, padding=(0, 2))
    table.add_row("job", job.id)
    table.add_row("state", styled_state(state))
    if s.get("reason") and state != "SUCCEEDED":
        table.add_row("reason", s["reason"])
    table.add_row("steps", str(s.get("step", 0)))
    table.add_row("final loss", fmt(s.get("loss")))
    attempts = s.get("attempts") or []
    if attempts:
        table.add_row("duration", fmt_time((attempts[-1].get("ended") or time.time()) - attempts[0]["started"]))
    table.add_row("attempts", str(len(attempts)))
    if s.get("restarts"):
        table.add_row("restarts", ", ".join(f"{k}: {v}" for k, v in s["restarts"].items()))
    if s.get("last_checkpoint"):
        table.add_row("last checkpoint", s["last_checkpoint"])
    if s.get("checkpoint_warning"):  # the run's last saves did not commit: its newest state is not durable
        table.add_row("warning", Text(s["checkpoint_warning"], style="bold yellow"))
    if goodput := goodput_line(s.get("goodput")):
        table.add_row("goodput", goodput)
    table.add_row("logs", s.get("log_path", "-"))
    console.print(Panel(table, title="summary", border_style=STATE_STYLE.get(state, "white")))
    if state == "FAILED" and s.get("traceback"):
        console.print(Panel(Text(s["traceback"].rstrip()), title=f"rank {s.get('rank')} traceback", border_style="red"))


# ---- submit and friends --------------------------------------------------------------------
@app.command()
def submit(spec_path: Path = typer.Argument(..., help="job spec (YAML)"), address: Optional[str] = AddressOpt,
           resume_from: Optional[str] = typer.Option(None, "--resume-from"),
           init_from: Optional[str] = InitFromOpt,
           inject: Optional[list[str]] = InjectOpt, as_json: bool = JsonOpt):
    """Submit a job and print its id at once."""
    spec = load_spec(spec_path, resume_from, inject, init_from)
    client = connect(address, start="never")
    try:
        job = client.submit(spec)
    except StalwartError as exc:
        fail(str(exc))
    if as_json:
        console.print_json(json.dumps({"id": job.id}))
    else:
        console.print(job.id)


@app.command("list")
def list_jobs(address: Optional[str] = AddressOpt, as_json: bool = JsonOpt):
    """All jobs this controller knows."""
    jobs = reader(address).jobs()
    if as_json:
        console.print_json(json.dumps(jobs, default=str))
        return
    if any(j.get("stale") for j in jobs):
        stale_note({"stale": True})
    # The id is what a user copies into the next command, and the state what they look for: never
    # shortened; the other columns give way.
    def whole(name: str, key: str) -> Column:
        return Column(name, no_wrap=True, min_width=max((len(j[key]) for j in jobs), default=len(name)))

    table = Table(whole("id", "id"), whole("state", "state"), "step", "loss", "tokens/s", "attempt", "submitted",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)  # no rules between columns: 80 fit
    for j in jobs:
        steps = f"{j.get('step', '-')}" + (f"/{j['max_steps']}" if j.get("max_steps") else "")
        tps = j.get("tokens_per_s")
        table.add_row(j["id"], styled_state(j["state"]), steps, fmt(j.get("loss")), f"{tps:,.0f}" if tps else "-",
                      str(j.get("attempt", "-")), clock(j["created"]))
    console.print(table)


@app.command()
def status(job_id: str, address: Optional[str] = AddressOpt, as_json: bool = JsonOpt):
    """One job's state, progress, attempts and (if it failed) the failing rank's traceback."""
    job = job_handle(reader(address), job_id)
    s = job.status()
    if as_json:
        console.print_json(json.dumps(s, default=str))
        return
    stale_note(s)
    console.print(_progress_view(job_id, s, [], False))
    if s.get("attempts"):
        table = Table("attempt", "ranks", "started", "ended", "cause", "error")
        for a in s["attempts"]:
            table.add_row(str(a["attempt"]), str(a["world_size"]), clock(a["started"]),
                          clock(a["ended"]) if a["ended"] else "-", a["cause"] or "-", Text((a["error"] or "")[:80]))
        console.print(table)
    console.print(f"logs: {s['log_path']}\ncheckpoints: {s['checkpoint_uri']}")
    if s["state"] == "FAILED" and s.get("traceback"):
        console.print(Panel(Text(s["traceback"].rstrip()), title=f"rank {s.get('rank')} traceback", border_style="red"))


@app.command()
def logs(job_id: str, follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
         tail: Optional[int] = typer.Option(None, "--tail", "-n", min=0, help="only the last N lines (then, with "
                                            "--follow, what comes)"),
         rank: Optional[int] = typer.Option(None, "--rank", "-r", min=0, help="only what rank R printed"),
         address: Optional[str] = AddressOpt):
    """What the job's ranks printed (each line starts with [rank R])."""
    job = job_handle(reader(address), job_id)
    lines = LogLines(rank)
    text = job.logs()
    shown = lines.feed(text) + lines.flush_partial(final=not follow)
    if tail is not None:
        shown = shown[len(shown) - tail:] if tail else []
    sys.stdout.write("".join(shown))
    sys.stdout.flush()
    if follow:
        skip = len(text)  # the stream starts at the beginning of the log: what was shown is skipped
        for chunk in job.follow_logs():
            if skip:
                chunk, skip = chunk[skip:], max(0, skip - len(chunk))
            sys.stdout.write("".join(lines.feed(chunk)))
            sys.stdout.flush()
        sys.stdout.write("".join(lines.flush_partial(final=True)))


class LogLines:
    """Whole lines of a job log as it arrives in chunks, only those of `rank` if given (a rank's lines
    start with "[rank R] "). A partial last line waits for the rest of it."""

    def __init__(self, rank: Optional[int] = None):
        self.prefix = None if rank is None else f"[rank {rank}] "
        self._partial = ""

    def feed(self, chunk: str) -> list[str]:
        text = self._partial + chunk
        *whole, self._partial = text.split("\n")
        return [line + "\n" for line in whole if self._keep(line)]

    def flush_partial(self, final: bool) -> list[str]:
        """The partial last line, once no more will come (`final`)."""
        if not final or not self._partial:
            return []
        line, self._partial = self._partial, ""
        return [line + "\n"] if self._keep(line) else []

    def _keep(self, line: str) -> bool:
        return self.prefix is None or line.startswith(self.prefix)


@app.command()
def events(job_id: str, address: Optional[str] = AddressOpt, as_json: bool = JsonOpt):
    """The job's events: state changes, attempts, faults, checkpoints."""
    evs = job_handle(reader(address), job_id).events()
    if as_json:
        console.print_json(json.dumps(evs, default=str))
        return
    table = Table("time", "attempt", "kind", "message")
    for e in evs:
        table.add_row(clock(e["ts"]), str(e["attempt"] or "-"), e["kind"], Text(e["message"]))
    console.print(table)


@app.command()
def cancel(job_id: str, address: Optional[str] = AddressOpt,
           wait: bool = typer.Option(True, help="wait until the job is CANCELLED"), as_json: bool = JsonOpt):
    """Cancel a job: its workers stop and its resources are released."""
    job = job_handle(connect(address, start="never"), job_id)
    try:
        result = job.cancel()
    except StalwartError as exc:
        fail(str(exc))
    if wait and result not in TERMINAL:
        s = job.wait(timeout=120, raise_on_failure=False)
        result = s["state"]
    if as_json:
        print_json({"id": job_id, "state": result})
    else:
        console.print(f"{job_id}: {result}")


@app.command()
def validate(spec_path: Path = typer.Argument(..., help="job spec (YAML)"), as_json: bool = JsonOpt):
    """Check a spec without running it."""
    spec = load_spec(spec_path)
    if as_json:
        console.print_json(json.dumps(spec.to_dict()))
    else:
        console.print(f"[green]ok[/]: {spec_path} is a valid job spec ({spec.name}, {spec.resources.workers} "
                      f"x {spec.strategy.name} ranks, entrypoint {spec.entrypoint})", soft_wrap=True)

