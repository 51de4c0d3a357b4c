"""Finding, starting and stopping the Ray cluster that runs stalwart.

Order: an already-connected Ray; an explicit address (argument or RAY_ADDRESS); the local cluster
that `stalwart up` started (recorded in STALWART_HOME/cluster.json); else start one, either inside
this process (`stalwart run`: it goes when the process ends) or in the background (`stalwart up`,
`submit`: it stays until `stalwart down`).

Ray's token authentication stays on. Ray turns it on for a local cluster when a token exists (and
`ray.init()` makes one), but a process that connects to an explicit address only presents its token
when RAY_AUTH_MODE=token is in its environment. So before connecting, stalwart sets that whenever a
token is available to Ray (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token), unless the
user set RAY_AUTH_MODE themselves. The token is Ray's own; stalwart never prints or stores it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from stalwart._net import free_port, port_open
from stalwart.errors import ClusterError, NoCluster

HOME_ENV = "STALWART_HOME"
NAMESPACE = "stalwart"  # the Ray namespace of the controller (and of every stalwart process's connection)
AUTH_MODE_ENV = "RAY_AUTH_MODE"
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_AGENT_PORT = 52365  # Ray's dashboard agent (HTTP), which Ray Jobs submits through
START_TIMEOUT_S = 180.0  # `ray start --head` on a loaded 2-core machine takes 5-20 s
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL what is left

NO_CLUSTER_HINT = "start one with `stalwart up`, or point at one with --address / RAY_ADDRESS"


def home_dir(home: str | os.PathLike | None = None) -> Path:
    path = Path(home or os.environ.get(HOME_ENV) or "~/.stalwart").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- Ray's auth token ---------------------------------------------------------------------
def ray_token_path() -> Path:
    """Where Ray reads its token from a file: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def ray_token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or ray_token_path().is_file()


def ensure_ray_token() -> bool:
    """Make sure Ray has a token to start a cluster with; returns whether one was created.

    Created the way `ray get-auth-token --generate` does (same file), but readable by its owner only.
    """
    if ray_token_available():
        return False
    path = ray_token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return True


def present_ray_token() -> None:
    """Have this process (and those it starts) present Ray's token when it connects by address."""
    if AUTH_MODE_ENV in os.environ or not ray_token_available():
        return  # the user chose a mode, or there is nothing to present
    os.environ[AUTH_MODE_ENV] = "token"
    try:  # Ray caches its config per process; refresh it as Ray itself does when it turns auth on
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass


# ---- addresses ----------------------------------------------------------------------------
def resolve_address(address: str) -> str:
    """The address ray.init takes for what a user typed: `host:port` (the GCS), `ray://host:port`
    (Ray Client), or a dashboard URL `http://host:8265` as Ray Jobs users have in RAY_ADDRESS."""
    address = address.strip()
    if address in ("auto", "local") or address.startswith("ray://"):
        return address
    if address.startswith(("http://", "https://")):
        return _gcs_behind_dashboard(address)
    if "://" in address:
        raise ClusterError(f"cannot use the address {address!r}: give host:port, ray://host:port or "
                           f"http://host:{DEFAULT_DASHBOARD_PORT} (the dashboard)")
    host, _, port = address.rpartition(":") if ":" in address else (address, "", str(DEFAULT_GCS_PORT))
    if not host or not port.isdigit():
        raise ClusterError(f"cannot use the address {address!r}: give host:port (for example "
                           f"127.0.0.1:{DEFAULT_GCS_PORT}), ray://host:port or http://host:{DEFAULT_DASHBOARD_PORT}")
    return f"{host}:{port}"


def _gcs_behind_dashboard(url: str) -> str:
    """The GCS address of the cluster whose dashboard is at `url`.

    The dashboard's node summary lists its processes' command lines, which name the GCS address.
    If that cannot be read, the same host's Ray Client port is the next best guess.
    """
    parsed = urlparse(url)
    host = parsed.hostname or "127.0.0.1"
    request = urllib.request.Request(f"{parsed.scheme}://{parsed.netloc}/nodes?view=summary")
    token = _ray_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ClusterError(f"the Ray dashboard at {url} refused this machine's Ray token: "
                               f"{_TOKEN_HINT}") from None
        body = ""
    except (urllib.error.URLError, OSError) as exc:
        raise NoCluster(f"no Ray dashboard answers at {url} ({getattr(exc, 'reason', exc)}): {NO_CLUSTER_HINT}") from None
    found = re.search(r"--gcs-address=([\w.\-\[\]]+):(\d+)", body)
    if found:
        return f"{host}:{found.group(2)}"
    return f"ray://{host}:{DEFAULT_CLIENT_PORT}"


def _ray_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    try:
        return ray_token_path().read_text().strip() or None
    except OSError:
        return None


_TOKEN_HINT = ("copy the head node's token (`ray get-auth-token` there) to ~/.ray/auth_token on this machine, "
               "or set RAY_AUTH_TOKEN")


def _explain(exc: BaseException, address: str) -> ClusterError:
    text = f"{type(exc).__name__}: {exc}"
    if "AuthToken" in text or "Authentication" in text or "UNAUTHENTICATED" in text:
        if not ray_token_available():
            return ClusterError(f"the Ray cluster at {address} requires Ray's auth token and this machine has none: "
                                f"{_TOKEN_HINT}")
        return ClusterError(f"the Ray cluster at {address} refused this machine's Ray token (a different "
                            f"cluster's?): {_TOKEN_HINT}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if os.environ.get(AUTH_MODE_ENV) == "token":
        # A refused token looks like any failed connection from here (Ray retries, then gives up).
        return ClusterError(f"cannot connect to the Ray cluster at {address}: {first}. If it answers at that "
                            f"address, it may have refused this machine's Ray token: {_TOKEN_HINT}")
    return NoCluster(f"cannot connect to the Ray cluster at {address}: {first}; check --address / RAY_ADDRESS, "
                     f"or {NO_CLUSTER_HINT.split(', or ')[0]}")


def _reachable(address: str) -> bool:
    """A quick TCP check of host:port before ray.init, which retries for a minute when nothing is there."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    if address in ("auto", "local") or ":" not in target:
        return True
    host, _, port = target.rpartition(":")
    return port_open(host.strip("[]"), int(port), timeout=3.0)


# ---- the local background cluster (`stalwart up`) -------------------------------------------------
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
    if not port_open(host, int(port)):
        path.unlink(missing_ok=True)
        return None
    return record


def _ray_bin() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def start_background(home: Path, *, num_cpus: int | None = None, num_gpus: int | None = None,
                     host: str = "127.0.0.1", port: int | None = None,
                     dashboard_port: int | None = None) -> dict:
    """Start a Ray head that outlives this process, with token auth and the dashboard on; record it.

    Binds to `host` (loopback unless asked). A start that fails leaves nothing running.
    """
    ensure_ray_token()
    port = port or free_port()
    if dashboard_port is None:
        dashboard_port = DEFAULT_DASHBOARD_PORT if not port_open("127.0.0.1", DEFAULT_DASHBOARD_PORT) else free_port()
    client_port = free_port()  # outside Ray's worker port range (10002-19999), unlike its default
    # Ray's default for the dashboard's agent is a fixed port: a second cluster on the machine would get
    # no agent, and Ray Jobs there would answer "No available agent" to every submission.
    agent_port = DEFAULT_AGENT_PORT if not port_open("127.0.0.1", DEFAULT_AGENT_PORT) else free_port()
    cmd = [_ray_bin(), "start", "--head", f"--port={port}", f"--node-ip-address={host}",
           f"--dashboard-host={host}", f"--dashboard-port={dashboard_port}",
           f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
           "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    env = dict(os.environ)
    env.setdefault(AUTH_MODE_ENV, "token")
    env[HOME_ENV] = str(home)  # the controller on this head keeps its state here
    # Every Ray process inherits this environment, the job's ranks included: not the REST API's token.
    env.pop("STALWART_API_TOKEN", None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        _stop_session(_session_of_port(port), port)
        raise ClusterError(f"`ray start --head` did not finish within {START_TIMEOUT_S:.0f} s; nothing was left running")
    if proc.returncode != 0:
        _stop_session(_session_of_port(port), port)
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise ClusterError(f"`ray start --head` failed: {lines[-1]}")
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    record = {"address": f"{connect_host}:{port}", "client_address": f"ray://{connect_host}:{client_port}",
              "dashboard": f"http://{connect_host}:{dashboard_port}", "host": host,
              "session_dir": _session_of_port(port), "started_at": time.time()}
    _record_path(home).write_text(json.dumps(record))
    return record


def stop_background(home: Path) -> bool:
    """Stop the local cluster `start_background` made, and only it. Returns whether there was one.

    `ray stop` would end every Ray process of this user on the machine (a cluster started by hand,
    another `stalwart run`'s in-process Ray); this ends the processes of this cluster's session.
    """
    path = _record_path(home)
    if not path.exists():
        return False
    try:
        record = json.loads(path.read_text())
    except ValueError:
        record = {}
    port = int(record["address"].rsplit(":", 1)[1]) if record.get("address") else None
    session = record.get("session_dir") or (_session_of_port(port) if port else None)
    found = _stop_session(session, port)
    path.unlink(missing_ok=True)
    return found


def _session_of_port(port: int) -> str | None:
    """The session directory of the GCS server listening on `port`, from its command line."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].endswith("gcs_server") and f"--gcs_server_port={port}" in cmd:
            for arg in cmd:
                if arg.startswith("--session-dir="):
                    return arg.split("=", 1)[1]
    return None


def _stop_session(session_dir: str | None, port: int | None = None) -> bool:
    """End every process of one Ray session: those naming its directory (or, like Ray Client's
    server, its GCS port as their --address), and their descendants."""
    import psutil

    if not session_dir and not port:
        return False
    gcs_arg = re.compile(rf"^--(gcs-)?address=[^:]+:{port}$") if port else None
    mine = psutil.Process()
    roots = []
    for proc in psutil.process_iter(["cmdline", "pid"]):
        if proc.info["pid"] == mine.pid:
            continue
        cmd = proc.info["cmdline"] or []
        if any((session_dir and session_dir in arg) or (gcs_arg and gcs_arg.match(arg)) for arg in cmd):
            roots.append(proc)
    procs = {p.pid: p for p in roots}
    for root in roots:
        try:
            procs.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    procs.pop(mine.pid, None)
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=STOP_GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return bool(procs)


# ---- connecting -------------------------------------------------------------------------
def connect(address: str | None, home: Path, *, start: str = "background", say=lambda msg: None) -> str:
    """Connect this process to Ray. `start` is 'background', 'inprocess' or 'never'.

    Returns how the cluster was reached: 'connected', 'address', 'local', 'started-background',
    'started-inprocess'. Raises NoCluster when none runs and none may be started, ClusterError when
    one cannot be used (a refused token, a bad address).
    """
    loaded = sys.modules.get("ray")  # Ray is imported (about 2 s) only when there is a cluster to reach
    if loaded is not None and loaded.is_initialized():
        return "connected"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _init(resolve_address(address), shown=address)
        return "address"
    record = local_cluster(home)
    if record is not None:
        _init(record["address"], shown=record["address"])
        return "local"
    if start == "never":
        raise NoCluster(f"no Ray cluster is running: {NO_CLUSTER_HINT}")
    if start == "inprocess":
        import ray

        say("starting a local Ray instance in this process")
        ray.init(address="local", include_dashboard=False, **_INIT_OPTIONS)
        return "started-inprocess"
    say("no cluster running: starting a local Ray head in the background (stop it with `stalwart down`)")
    record = start_background(home)
    try:
        _init(record["address"], shown=record["address"])
    except ClusterError:
        stop_background(home)  # a start that cannot be used leaves nothing running
        raise
    return "started-background"


_INIT_OPTIONS = dict(namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")


def _init(address: str, shown: str) -> None:
    import ray

    if not _reachable(address):
        raise NoCluster(f"no Ray cluster answers at {shown}: {NO_CLUSTER_HINT}")
    present_ray_token()
    try:
        ray.init(address=address, **_INIT_OPTIONS)
    except Exception as exc:  # noqa: BLE001 - Ray raises many types here; each becomes one clear line
        if ray.is_initialized():
            ray.shutdown()
        raise _explain(exc, shown) from None
