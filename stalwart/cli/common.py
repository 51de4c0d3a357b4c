"""What every command shares: the Typer app, the consoles, options, how a command reaches the
cluster (or, to read, the state dir), errors as one line, and small formatters."""

from __future__ import annotations

import atexit
import json
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from stalwart.errors import NoCluster, StalwartError
from stalwart.orchestrator.states import TERMINAL_STATES as TERMINAL
from stalwart.spec import JobSpec

# Every environment variable stalwart reads, named once: `stalwart --help` lists them (the options that
# take one also say so next to the option).
ENVIRONMENT = {
    "STALWART_HOME": "state dir: the controller's records, job logs, default checkpoints (default ~/.stalwart)",
    "STALWART_SERVER": "the REST API to run the job commands over (as --server)",
    "STALWART_API_TOKEN": "the REST API's bearer token (default: $STALWART_HOME/api-token)",
    "STALWART_API_PORT": "the REST API's port for `up` and `serve` (default 8642)",
    "STALWART_METRICS_PORT": "the controller's Prometheus port (default 9464; 0: any free one)",
    "STALWART_MAX_PACKAGE_MB": "the most a job's code package sent over --server may weigh (default 100)",
    "STALWART_DEBUG": "1: show the traceback of an unexpected error",
    "RAY_ADDRESS": "the Ray cluster (as --address)",
    "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH": "Ray's token (default ~/.ray/auth_token); RAY_AUTH_MODE, if set, wins",
    "AWS_ENDPOINT_URL": "S3-compatible endpoint for checkpoints (with the AWS credential chain)",
    "STALWART_GANG_START_TIMEOUT_S": "how long a gang's workers may take to start (default 120)",
    "STALWART_CHECKPOINT_WAIT_TIMEOUT_S": "how long a rank waits for a save in flight (default 1800)",
    "STALWART_RESTORE_PREFETCH_TIMEOUT_S": "how long a restore waits for its read-ahead (default 1800)",
    "STALWART_COLLECTIVE_TIMEOUT_S": "torch.distributed's timeout in the ranks (default 1800)",
    "STALWART_RESTORE_RANGED, STALWART_RESTORE_EXCHANGE": "0: restores read whole shards / read without the exchange",
    "STALWART_CHECKPOINT_CHUNK_BYTES": "the checksum chunk of new saves (default 1 MiB)",
    "STALWART_TRACKERS_CLOSE_TIMEOUT_S": "how long a job's end waits for its experiment trackers to close",
    "STALWART_DEEPSPEED_SHM": "1: keep DeepSpeed's shared-memory op build on CPU",
    "STALWART_SURVIVOR_WAIT_S": "with in-memory snapshots: how long the ranks that outlive a dead one may take to "
                                "end their calls and be kept (default 5)",
    "STALWART_MEMORY_REPLICATION_TIMEOUT_S": "how long a snapshot waits for the previous one's replica to be sent (default 300)",
    "STALWART_REJOIN_WAIT_S": "with checkpoint.memory_in_loop: how long a rank that outlived a dead one waits in "
                              "its training loop for the next attempt (default 60)",
}


def _environment_help() -> str:
    # Rich markup mode: one paragraph per line.
    return "[bold]Environment[/]\n\n" + "\n\n".join(f"[cyan]{name}[/]  {what}" for name, what in ENVIRONMENT.items())


app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich",
                  help="Run sharded PyTorch training jobs on Ray and keep them alive.", epilog=_environment_help())
console = Console()
err = Console(stderr=True, soft_wrap=True)  # messages stay one line each (logs, grep), whatever their length

AddressOpt = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                          help="Ray cluster: host:port, ray://host:10001 or http://host:8265 (default: the local one)")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")
InjectOpt = typer.Option(None, "--inject", help="inject a fault to rehearse recovery, e.g. kill:rank=1,step=40 "
                         "(kinds: kill, nan, hang, spike, slow, error)")
STATE_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow", "RUNNING": "cyan",
               "RESTARTING": "magenta", "PENDING": "white"}
# The REST API that the job commands speak to instead of Ray, when `--server` (or STALWART_SERVER) names one.
_server: dict[str, Optional[str]] = {"url": None}


def _print_version(value: bool) -> None:
    if value:
        from stalwart import __version__

        console.print(f"stalwart {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(server: Optional[str] = typer.Option(
        None, "--server", envvar="STALWART_SERVER", metavar="URL",
        help="run the job commands over stalwart's REST API at URL (e.g. http://head:8642) instead of Ray; the "
             "token comes from STALWART_API_TOKEN or $STALWART_HOME/api-token"),
        version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                     help="print stalwart's version and exit")):
    _server["url"] = server or None


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and exit `code`: 1 for errors, 2 for usage errors (Typer's own)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def print_json(data) -> None:
    """--json output: one JSON document on stdout (non-JSON values as strings)."""
    console.print_json(json.dumps(data, default=str))


def say(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/]", highlight=False)


def _quiet_sigterm():
    """After ray.init: a SIGTERM (`timeout`, `kill`, a supervisor) ends the command with exit code 143
    and no dump from Ray's native signal handler (which ray.init puts in front of its own Python one).
    Commands with their own meaning for it (`run`) install theirs afterwards."""
    if threading.current_thread() is threading.main_thread():
        def terminated(signum, frame):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: `timeout` sends it to the process group too
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, terminated)
        # Once the command is done and the interpreter winds down, a SIGTERM just ends the process.
        atexit.register(signal.signal, signal.SIGTERM, signal.SIG_DFL)


def connect(address: Optional[str], start: str = "background"):
    """A Client for a command that needs the cluster (a job command, `up`, `down`); with --server,
    an HttpClient (the server wins over an address)."""
    from stalwart.client import Client, HttpClient

    try:
        if _server["url"]:
            return HttpClient(_server["url"])
        client = Client(address, start=start, say=say)
        _quiet_sigterm()
        return client
    except StalwartError as exc:
        fail(str(exc))


def reader(address: Optional[str]):
    """A Client, or, when no cluster runs (and none was named), the state dir's `Records`, for the
    commands that only read: they work after `stalwart run` ended or with the cluster down. With
    --server, the server's answers (no fallback: the server was named)."""
    from stalwart.client import Client, HttpClient, Records

    try:
        if _server["url"]:
            return HttpClient(_server["url"])
        client = Client(address, start="never", say=say)
        _quiet_sigterm()
        return client
    except NoCluster as exc:
        if address:
            fail(str(exc))
        return Records()
    except StalwartError as exc:
        fail(str(exc))


def job_handle(client, job_id: str):
    try:
        return client.job(job_id)
    except StalwartError as exc:
        fail(str(exc))


def load_spec(path: Path, resume_from: Optional[str] = None, inject: Optional[list[str]] = None,
              init_from: Optional[str] = None) -> JobSpec:
    try:
        spec = JobSpec.from_yaml(path)
        if resume_from or inject or init_from:
            from stalwart.spec import Fault

            data = spec.to_dict(reveal_secrets=True)
            if resume_from:
                data["checkpoint"]["resume_from"] = resume_from
            if init_from:
                data["checkpoint"]["init_from"] = init_from
            data["faults"] += [Fault.parse(text).model_dump() for text in inject or []]
            spec = JobSpec.from_dict(data, source=str(path))
        return spec
    except StalwartError as exc:
        fail(str(exc))


def stale_note(s: dict) -> None:
    if s.get("stale"):
        err.print("[yellow]no cluster is running: this is the job's last recorded state[/]", highlight=False)


# ---- formatting --------------------------------------------------------------------------
def fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def need_matplotlib(what: str) -> None:
    """Exit with what to install when matplotlib (the `plot` extra) is missing; `what` names the command."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        fail(f"{what} draws with matplotlib, which is not installed: pip install 'stalwart[plot]'")


def fmt_bytes(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def restore_line(r: dict | None) -> str | None:
    """'step 20: 45.1 MB of 96.2 MB read (12.0 MB/s), ranks 0, 1' from status()["restore"]."""
    if not r:
        return None
    total = f" of {fmt_bytes(r['bytes_total'])}" if r.get("bytes_total") else ""
    rate = f" ({fmt_bytes(r['bytes_per_s'])}/s)" if r.get("bytes_per_s") else ""
    ranks = ", ".join(str(x) for x in r.get("ranks_reading") or [])
    return f"step {r.get('step')}: {fmt_bytes(r.get('bytes_read'))}{total} read{rate}, rank(s) {ranks}"


def interval_line(intervals: dict | None) -> str | None:
    """status()["checkpoint_interval"] (every_steps: auto) as the events say it, one tier after the other."""
    if not intervals:
        return None
    from stalwart.checkpointing.interval import describe

    return "; ".join(describe(tier, c) for tier, c in sorted(intervals.items()))


def goodput_line(g: dict | None) -> str | None:
    """'96.2%  (lost: restart 5.2 s, restore 2.1 s)' from status()["goodput"] (monitoring.goodput)."""
    if not g or g.get("ratio") is None:
        return None
    lost = ", ".join(f"{k} {v:.1f} s" for k, v in (g.get("lost_s") or {}).items() if v >= 0.05)
    return f"{g['ratio']:.1%}" + (f"  (lost: {lost})" if lost else "") + ("  [in a restart now]" if g.get("in_gap") else "")


def fmt(x, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return format(x, spec)


def styled_state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


__all__ = ["app", "console", "err", "TERMINAL", "ENVIRONMENT", "AddressOpt", "JsonOpt", "InjectOpt", "STATE_STYLE", "fail",
           "say", "print_json",
           "connect", "reader", "job_handle", "load_spec", "stale_note", "fmt_time", "fmt", "styled_state", "clock"]
