"""What the REST API's two ends agree on: where it listens, its token, its limits, and a job's code package.

Standard library and stalwart's errors only: the CLI with --server and `HttpClient` import this and
nothing of Ray or the web stack, so a client machine starts them fast.

The token is the API's own, not Ray's: whoever holds it can submit code to the cluster, so it lives
in a file that only its owner can read ($STALWART_HOME/api-token, mode 0600) or in STALWART_API_TOKEN.
The server keeps only its SHA-256 (`token_digest`), so neither the server's memory nor Ray's records of
the server actor hold the token itself.

A code package is a zip of the job's folder, made on the client (`pack`) and checked on the server
(`check_package`) before Ray's nodes unpack it as the ranks' runtime_env working_dir. The same folder
always packs to the same bytes (sorted entries, fixed timestamps), so its URI names its content.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import secrets
import stat
import zipfile
from pathlib import Path

from stalwart.errors import ClusterError, SpecError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8642
PORT_ENV = "STALWART_API_PORT"
TOKEN_ENV = "STALWART_API_TOKEN"
SERVER_ENV = "STALWART_SERVER"
TOKEN_FILE = "api-token"

MAX_BODY_BYTES = 1 << 20  # a spec, as JSON or YAML (or the spec part of a multipart body)
PACKAGE_LIMIT_ENV = "STALWART_MAX_PACKAGE_MB"
DEFAULT_PACKAGE_MB = 100  # Ray's own ceiling for a package in its GCS is 512 MiB (one gRPC message)
# A package may unpack to at most this many times its limit: a zip bomb is refused before a node unpacks it.
UNPACKED_FACTOR = 10
MAX_ENTRIES = 100_000
# Content-addressed, under the prefix Ray gives the packages it uploads itself.
PACKAGE_URI_PREFIX = "gcs://_ray_pkg_"
# Left out of a package: caches, virtual environments, version control and other hidden folders.
SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "venv"})
SKIPPED_SUFFIXES = (".pyc", ".pyo")


class TooLarge(SpecError):
    """A request body or a code package over its limit (HTTP 413). `problems` names which."""

    def __reduce__(self):
        return (TooLarge, (self.problems, self.source))


def default_port() -> int:
    """STALWART_API_PORT, else 8642. Raises ClusterError when the variable is not a port number."""
    text = os.environ.get(PORT_ENV, "").strip()
    if not text:
        return DEFAULT_PORT
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ClusterError(f"{PORT_ENV}={text!r} is not a port number (1-65535)")
    return int(text)


def package_limit() -> int:
    """The largest code package accepted, in bytes: STALWART_MAX_PACKAGE_MB, else 100 MB."""
    text = os.environ.get(PACKAGE_LIMIT_ENV, "").strip()
    try:
        mb = float(text) if text else DEFAULT_PACKAGE_MB
    except ValueError:
        raise ClusterError(f"{PACKAGE_LIMIT_ENV}={text!r} is not a number of megabytes") from None
    return int(mb * (1 << 20))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


# ---- the token ---------------------------------------------------------------------------
def token_path(home: Path) -> Path:
    return Path(home) / TOKEN_FILE


def read_token(home: Path | None) -> str | None:
    """The token a client presents: STALWART_API_TOKEN, else the token file in `home`, else None."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip()
    if home is None:
        return None
    try:
        return token_path(home).read_text().strip() or None
    except OSError:
        return None


def ensure_token(home: Path) -> tuple[str, Path | None]:
    """The server's token and the file it is in (None when it comes from STALWART_API_TOKEN).

    On first use, a new random token is written to $home/api-token, readable by its owner only.
    """
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if from_env:
        return from_env, None
    path = token_path(home)
    existing = read_token_file(path)
    if existing:
        return existing, path
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another `stalwart up` wrote it a moment ago, or it is empty
        existing = read_token_file(path)
        if existing:
            return existing, path
        raise ClusterError(f"{path} is empty: delete it, and a new token is made on the next `stalwart up`") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return read_token_file(path), path


def read_token_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def token_digest(token: str) -> bytes:
    """What the server compares: the SHA-256 of the token (the token itself is never handed to it)."""
    return hashlib.sha256(token.encode()).digest()


# ---- code packages -----------------------------------------------------------------------
def pack(folder: str | os.PathLike, limit: int | None = None) -> bytes:
    """The zip of `folder`'s files, for a job's runtime_env working_dir. Hidden folders, caches and
    virtual environments are left out. Raises SpecError (field `workdir`) when `folder` is not a folder,
    and TooLarge as soon as the zip passes `limit` bytes (default: `package_limit()`)."""
    root = Path(folder)
    if not root.is_dir():
        raise SpecError([("workdir", f"{root} is not a folder, so there is no code to send")])
    limit = package_limit() if limit is None else limit
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in _files(root):
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | (path.stat().st_mode & 0o777)) << 16
            zf.writestr(info, path.read_bytes())
            if buffer.tell() > limit:
                raise _too_large("workdir", f"the code folder {root}", buffer.tell(), limit)
    data = buffer.getvalue()
    if len(data) > limit:
        raise _too_large("workdir", f"the code folder {root}", len(data), limit)
    return data


def _files(root: Path) -> list[Path]:
    found = []
    for here, dirs, files in os.walk(root):  # symlinked folders are not followed: no loops, no surprises
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        for name in sorted(files):
            path = Path(here) / name
            if not name.endswith(SKIPPED_SUFFIXES) and path.is_file():
                found.append(path)
    return found


def package_uri(data: bytes) -> str:
    """The package's content address, in Ray's GCS naming (as Ray names the packages it uploads)."""
    return f"{PACKAGE_URI_PREFIX}{hashlib.sha1(data).hexdigest()}.zip"


def check_package(data: bytes, limit: int) -> None:
    """Refuse a package that a node should not unpack. Raises TooLarge (over `limit`, or unpacking to
    more than UNPACKED_FACTOR times it) and SpecError (field `package`: not a zip, an entry that would
    land outside its folder: an absolute path, `..`, a NUL)."""
    if len(data) > limit:
        raise _too_large("package", "the code package", len(data), limit)
    try:
        entries = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise SpecError([("package", f"not a zip archive ({exc})")]) from None
    if len(entries) > MAX_ENTRIES:
        raise SpecError([("package", f"{len(entries)} entries; at most {MAX_ENTRIES} are accepted")])
    unpacked = 0
    for info in entries:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if "\x00" in name or name.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts:
            raise SpecError([("package", f"entry {name!r} would land outside the job's folder")])
        unpacked += info.file_size
    if unpacked > UNPACKED_FACTOR * limit:
        raise _too_large("package", "the unpacked code package", unpacked, UNPACKED_FACTOR * limit)


def _too_large(field: str, what: str, size: int, limit: int) -> TooLarge:
    return TooLarge([(field, f"{what} is over {_mb(limit)} (at least {_mb(size)}): leave data, checkpoints and "
                             f"environments out of it, or raise {PACKAGE_LIMIT_ENV} on the server")])


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"
