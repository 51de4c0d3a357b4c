"""Jobs' code packages, kept where Ray's nodes fetch a rank's runtime_env working_dir from.

A package submitted over HTTP goes to two places: the head node's disk ($STALWART_HOME/packages,
the durable copy) and Ray's GCS under its content URI (gcs://_ray_pkg_<sha1>.zip), which is where a
node's runtime_env agent downloads a working_dir from, as it does for Ray Jobs.

Ray deletes a package from its GCS when nothing references it any more, and what it counts are jobs
(drivers) and detached actors, not the ranks that the controller starts. So this store pins each
package for PIN_S itself, and its keeper thread, every KEEP_EVERY_S, puts back (from disk) and pins again
the packages of every job that has not ended: a restart an hour later, on a node that never had the
package, still finds it, and so does a controller that resumes the job after a restart of the whole
cluster (once this server is up again). A package that no unfinished job uses is deleted from disk
PIN_S after its last use; its GCS copy goes when its last pin expires.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from stalwart.api.protocol import PACKAGE_URI_PREFIX, package_uri

log = logging.getLogger(__name__)

PIN_S = 600
KEEP_EVERY_S = 60.0


class PackageStore:
    """Lifecycle: construct with the controller's home (on the head node), `put` packages, and
    `start_keeper` once. Needs a Ray connection (the GCS). `put` raises OSError when the disk refuses."""

    def __init__(self, home: str | os.PathLike):
        self.root = Path(home) / "packages"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, uri: str) -> Path:
        return self.root / uri.rsplit("/", 1)[1]  # our own content hash: no path of the client's making

    def put(self, data: bytes) -> str:
        """Keep `data` (a checked zip) and publish it to the GCS; returns its URI."""
        uri = package_uri(data)
        path = self._path(uri)
        with self._lock:
            if path.exists():
                os.utime(path)  # in use again: the keeper must not delete it before the job is recorded
            else:
                partial = path.with_suffix(f".{os.getpid()}.partial")
                partial.write_bytes(data)
                partial.replace(path)
        self._publish(uri, data)
        return uri

    def _publish(self, uri: str, data: bytes | None = None) -> None:
        from ray.experimental.internal_kv import _internal_kv_exists, _internal_kv_put, _pin_runtime_env_uri

        if not _internal_kv_exists(uri):
            _internal_kv_put(uri, data if data is not None else self._path(uri).read_bytes())
        _pin_runtime_env_uri(uri, expiration_s=PIN_S)

    def keep(self, in_use: set[str], now: float | None = None) -> None:
        """Publish and pin the packages in `in_use` again; delete from disk those unused for PIN_S."""
        now = time.time() if now is None else now
        for uri in in_use:
            if self._path(uri).exists():
                self._publish(uri)
            else:
                log.warning("code package %s of an unfinished job is missing from %s", uri, self.root)
        with self._lock:
            for path in self.root.glob("*.zip"):
                if f"{PACKAGE_URI_PREFIX}{path.name[len('_ray_pkg_'):]}" in in_use:
                    os.utime(path)
                elif now - path.stat().st_mtime > PIN_S:
                    path.unlink(missing_ok=True)

    def start_keeper(self, in_use: Callable[[], set[str]], every_s: float = KEEP_EVERY_S) -> threading.Thread:
        """Run `keep(in_use())` now and every `every_s` seconds on a daemon thread, for the process's life."""

        def loop() -> None:
            while True:
                try:
                    self.keep(in_use())
                except Exception:  # noqa: BLE001 - the keeper must outlive a controller restart or a GCS hiccup
                    log.exception("keeping the code packages failed; trying again in %.0f s", every_s)
                time.sleep(every_s)

        thread = threading.Thread(target=loop, name="api-packages", daemon=True)
        thread.start()
        return thread


def packages_in_use(client) -> set[str]:
    """The package URIs of the jobs that have not ended (their specs' runtime_env working_dir). `client`:
    a `Client`, or (cheaper: no call to the controller per job) the controller's `Records`."""
    from stalwart.orchestrator.states import TERMINAL_STATES

    found = set()
    for job in client.jobs():
        if job["state"] in TERMINAL_STATES:
            continue
        working_dir = (client.job_spec(job["id"]).get("runtime_env") or {}).get("working_dir")
        if isinstance(working_dir, str) and working_dir.startswith(PACKAGE_URI_PREFIX):
            found.add(working_dir)
    return found
