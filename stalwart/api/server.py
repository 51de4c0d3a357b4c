"""Running the REST API: a detached Ray actor on the head node, next to the controller.

Why an actor and not a process of its own: the API must outlive the command that started it and come
back when it dies. Ray already does both for the controller (a detached actor with unlimited restarts),
so the API gets the same keeper instead of a second supervisor (which would need a supervisor of its
own, a pid file, and its own way to end with the cluster). As an actor it reaches the controller with
the same calls as any `Client`, goes when `stalwart down` ends the cluster's processes, and is placed on
the head node (hard affinity), whose address users already know. Its HTTP server, uvicorn, runs on a
thread of its own in the actor's process; if that thread ever ends, the process exits so that Ray starts
it again. A killed API process is back within seconds; jobs never notice, since they live in the
controller, and a client's retried submit carries the same submission id.

The actor is handed the SHA-256 of the token, never the token itself: Ray keeps an actor's arguments
(to restart it), and a digest there gives no way in.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import socket
import threading
import time

from stalwart.api import protocol
from stalwart.errors import ClusterError

log = logging.getLogger(__name__)

API_ACTOR = "stalwart-api"
START_TIMEOUT_S = 120.0  # a new worker process on a loaded 2-core head: imports alone take seconds
BIND_WAIT_S = 10.0  # how long a (re)started server waits for its port to be free
SERVE_WAIT_S = 30.0
KEEP_ALIVE_S = 75


@dataclasses.dataclass(frozen=True)
class ApiSettings:
    host: str = protocol.DEFAULT_HOST
    port: int = protocol.DEFAULT_PORT
    token_digest: str = ""  # hex SHA-256 of the token
    tls_cert: str | None = None
    tls_key: str | None = None
    max_package_bytes: int = protocol.DEFAULT_PACKAGE_MB << 20

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "[::1]" if self.host == "::" else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{'https' if self.tls_cert else 'http'}://{host}:{self.port}"


def _listen(host: str, port: int, wait_s: float) -> socket.socket:
    """A bound socket for host:port (uvicorn listens on it). A port that is taken is waited for, up to
    `wait_s` (a restarted server's predecessor may still hold it); raises ClusterError after that."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            return sock
        except OSError as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise ClusterError(f"the API cannot listen on {host}:{port}: {exc.strerror or exc}; choose another "
                                   f"port (--port, or {protocol.PORT_ENV})") from None
            time.sleep(0.2)


class ApiServer:
    """The API's process. Lifecycle: created by `start()` as a detached actor; serves until the cluster
    ends or `stop()`; restarted by Ray, with the same settings, whenever its process dies.

    Construction raises ClusterError when the port cannot be had, and whatever uvicorn raises for a
    TLS certificate or key it cannot load."""

    def __init__(self, home: str, settings: dict):
        import uvicorn

        from stalwart.api.app import create_app
        from stalwart.api.packages import PackageStore, packages_in_use
        from stalwart.client import Client, Records
        from stalwart.launchers.niceness import set_niceness

        # As the controller: at Ray's niceness 15, busy ranks would starve the API of CPU.
        set_niceness(0, all_threads=True)
        self.settings = ApiSettings(**settings)
        self.client = Client(home=home, start="never")  # this process is in the cluster: it finds the controller
        packages = PackageStore(self.client.controller_info["home"])
        app = create_app(self.client, token_digest=bytes.fromhex(self.settings.token_digest), packages=packages,
                         package_limit=self.settings.max_package_bytes)
        # No access log: it would only cost time (paths and queries only; a token is never logged anyway).
        # Idle connections are kept 75 s (Ray's dashboard, on aiohttp, keeps them an hour): at uvicorn's 5 s,
        # a client that polls every few seconds races the server's close and now and then sends on a closed
        # connection, which fails that request.
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                ssl_certfile=self.settings.tls_cert, ssl_keyfile=self.settings.tls_key,
                                timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=2)
        config.load()  # here, so that a certificate that cannot be loaded fails the start with its reason
        self._server = uvicorn.Server(config)
        self._stopping = False
        import ray

        # A first start fails at once on a taken port (the caller says so); a restart waits for it.
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        sock = _listen(self.settings.host, self.settings.port, BIND_WAIT_S if restarted else 0.0)
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="api-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + SERVE_WAIT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ClusterError(f"the API server did not start on {self.settings.url}")
            time.sleep(0.05)
        if not protocol.is_loopback(self.settings.host) and not self.settings.tls_cert:
            log.warning("the API listens on %s without TLS", self.settings.host)
        # The keeper reads the jobs' specs from the controller's store (on this node), not job by job over Ray.
        records = Records(self.client.controller_info["home"])
        packages.start_keeper(lambda: packages_in_use(records))
        # What the imports made lives as long as the process: out of the garbage collector's full passes,
        # which would otherwise stop every request now and then for tens of milliseconds.
        gc.collect()
        gc.freeze()

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._server.run(sockets=[sock])
        finally:
            if not self._stopping:
                # The HTTP server ended on its own: end the process, and Ray starts a new one.
                log.error("the API's HTTP server stopped; exiting so that Ray restarts the API")
                os._exit(1)

    def info(self) -> dict:
        return {"url": self.settings.url, "pid": os.getpid(), "settings": dataclasses.asdict(self.settings)}

    def shutdown(self) -> None:
        self._stopping = True
        self._server.should_exit = True
        self._thread.join(timeout=5)


def _existing():
    import ray

    from stalwart.orchestrator.cluster import NAMESPACE

    try:
        return ray.get_actor(API_ACTOR, namespace=NAMESPACE)
    except ValueError:
        return None


def running() -> dict | None:
    """The running API server's info (url, pid, settings) on the connected cluster, or None."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    actor = _existing()
    if actor is None:
        return None
    try:
        return ray.get(actor.info.remote(), timeout=START_TIMEOUT_S)
    except (RayActorError, GetTimeoutError):
        return None


def start(home: str, settings: ApiSettings) -> dict:
    """Serve the API on the connected cluster with `settings`, next to its controller (whose state dir
    is `home`), and return its info. A server that runs with the same settings is kept; one with other
    settings is replaced. Raises ClusterError when it cannot start (its port is taken, say)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from stalwart.orchestrator.cluster import NAMESPACE
    from stalwart.orchestrator.controller import _head_node_id

    current = running()
    if current is not None and current["settings"] == dataclasses.asdict(settings):
        return current
    stop()
    actor = ray.remote(ApiServer).options(
        name=API_ACTOR, namespace=NAMESPACE, lifetime="detached", max_restarts=-1, num_cpus=0, max_concurrency=4,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=_head_node_id(), soft=False),
    ).remote(home, dataclasses.asdict(settings))
    try:
        return ray.get(actor.info.remote(), timeout=START_TIMEOUT_S)
    except (RayActorError, GetTimeoutError) as exc:
        ray.kill(actor, no_restart=True)
        raise ClusterError(f"the API server did not start on {settings.url}: {_reason(exc)}") from None


def stop() -> bool:
    """Stop the API server of the connected cluster, if one runs; returns whether one did."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    actor = _existing()
    if actor is None:
        return False
    try:
        ray.get(actor.shutdown.remote(), timeout=10)  # closes its socket before the process goes
    except (RayActorError, GetTimeoutError):
        pass
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while _existing() is not None and time.monotonic() < deadline:  # the name is free once it is gone
        time.sleep(0.1)
    return True


def _reason(exc: BaseException) -> str:
    # An actor whose constructor raised carries that error; its message's last line says why.
    cause = getattr(exc, "cause", None) or getattr(exc, "creation_task_error", None) or exc
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
