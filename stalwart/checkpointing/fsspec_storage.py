"""Storage on any filesystem fsspec can open: `gs://`, `az://`, `abfs://`, `hf://`, `memory://`, ...

`open_storage` sends here every `scheme://` URI other than `s3://` and `file://` whose protocol
fsspec knows, and also any URI written `fsspec+<protocol>://...`: that prefix forces fsspec for a
protocol stalwart would otherwise serve itself, e.g. `fsspec+s3://bucket/prefix` (S3 through s3fs
instead of boto3) or `fsspec+file:///dir` (fsspec's local filesystem). The prefix stays in
`Storage.uri`, so the step URIs built from it (`<uri>/step-...`) come back to the same backend.

All or nothing, per filesystem. The `Storage` contract says a reader sees an object whole or not
at all. How that is obtained depends on when the filesystem makes a written file visible:

- Object stores whose upload publishes the object only when it completes: S3 (s3fs: a PutObject,
  or CompleteMultipartUpload), Google Cloud Storage (gcsfs: a simple or resumable upload, finalised
  by its last request), Azure Blob (adlfs: staged blocks, committed by one block list), and the
  Hugging Face Hub (each upload is one commit). They are written in place: a temporary key would
  cost a server-side copy plus a delete (these stores have no rename) and would be no safer. A write
  that fails is abandoned without finishing the upload (`discard()`; an aborted multipart upload),
  never closed, because closing an fsspec buffered file uploads what it holds as if it were whole.
- Every other filesystem is written to a temporary key beside the target (`.<name>.<random>.tmp`,
  which `list` hides, as FileStorage does) and then moved into place. The local filesystem renames
  (atomic on POSIX); the in-memory one replaces the entry in one assignment, and it needs the
  detour, since it publishes a file as soon as the file is opened for writing. On a filesystem
  this module knows nothing about, the move is the filesystem's own (a rename, or a copy and a
  delete), which is at worst slower, where writing in place could expose a half-written file.

Options. The filesystem is built from the storage options given to the constructor, laid over
fsspec's own configuration: `FSSPEC_<PROTOCOL>_<OPTION>` (or `FSSPEC_<PROTOCOL>` holding JSON)
environment variables, read when the filesystem is made (so a job's `env:` reaches the ranks), and
the files in `~/.config/fsspec` (or `FSSPEC_CONFIG_DIR`). The job spec has no section for fsspec
options: `open_storage` gets only `checkpoint.s3`, which configures `fsspec+s3://` the way it
configures `s3://` (endpoint, region, keys, part size; its secrets are masked like any
spec secret). For the other protocols, credentials come from the backend's usual places (the
Google or Azure credential chain, `HF_TOKEN`, ...) or fsspec's configuration, which must be present
wherever the storage is opened: the controller (it checks the storage at submit and lists
checkpoints) and every rank's node.

Errors. Every method raises `StorageError`. Missing keys, missing buckets, refused credentials, a
backend package that is not installed: permanent, at once. Connection failures, timeouts, 5xx and
throttling (as the backends report them: `ConnectionError`, `TimeoutError`, errnos such as EBUSY,
HTTP statuses >= 500 or 429): retried with jittered backoff for `retry_deadline_s` from the first
failure, then `transient=True`. Each backend also retries some requests itself; its timeouts are its
own (s3fs's `config_kwargs`, gcsfs's `timeout`, ...).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import tempfile
import threading
import uuid
import warnings
from typing import Iterable

from stalwart.checkpointing.storage import RemoteStorage, Source
from stalwart.errors import StorageError

PREFIX = "fsspec+"  # `fsspec+<protocol>://...` sends any protocol through fsspec

# Filesystems whose upload publishes the object only when it completes (see the module docstring),
# by the protocols their classes declare. Written in place; everything else goes through a temporary key.
_PUBLISH_ON_COMPLETE = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hf"})
# Filesystems with directories that must exist before a file is created in them.
_HAS_DIRECTORIES = frozenset({"file", "local", "memory", "sftp", "ssh", "ftp", "smb"})

_CHUNK = 16 << 20  # how much of a source is handed to the file at once
_RANGE_CHUNK = 64 << 20  # the largest ranged read: one request, and one temporary copy, each
_TRANSIENT_ERRNOS = {errno.EINTR, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH,
                     errno.ENETDOWN, getattr(errno, "EREMOTEIO", errno.EIO)}  # s3fs: InternalError, 500
_TRANSIENT_NAMES = ("Timeout", "ConnectionError", "ConnectionClosed", "ServerDisconnected", "ClientConnect",
                    "ClientPayload", "IncompleteRead", "Throttl", "SlowDown", "ServiceUnavailable")
_NO_CREDENTIAL_NAMES = ("NoCredentials", "DefaultCredentialsError", "CredentialUnavailable",
                        "ClientAuthenticationError", "LocalTokenNotFound")

# Where each protocol's credentials come from, for check()'s advice.
_CREDENTIAL_HINTS = {
    "s3": "set checkpoint.s3.access_key_id and secret_access_key, or give the AWS credential chain "
          "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role) to the controller and the ranks",
    "gs": "give Google credentials to the controller and the ranks (GOOGLE_APPLICATION_CREDENTIALS, "
          "`gcloud auth application-default login`, or a metadata server), or set FSSPEC_GCS_TOKEN",
    "az": "give Azure credentials to the controller and the ranks (AZURE_STORAGE_ACCOUNT_NAME with "
          "AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN or AZURE_STORAGE_CONNECTION_STRING, or an Azure "
          "identity), or set FSSPEC_AZ_<OPTION> variables",
    "hf": "set HF_TOKEN (a token that may write to the repository) for the controller and the ranks, or run "
          "`huggingface-cli login` on their nodes",
}
_CREDENTIAL_HINTS.update({"s3a": _CREDENTIAL_HINTS["s3"], "gcs": _CREDENTIAL_HINTS["gs"],
                          "abfs": _CREDENTIAL_HINTS["az"], "abfss": _CREDENTIAL_HINTS["az"]})


def split_uri(uri: str) -> tuple[str, str]:
    """(protocol, the URI fsspec is given): ("s3", "s3://b/p") for fsspec+s3://b/p; ("gs", "gs://b/p") for gs://b/p."""
    target = uri.removeprefix(PREFIX)
    protocol, sep, _ = target.partition("://")
    if not sep or not protocol:
        raise StorageError(f"{uri!r} is not a protocol://path URI", uri=uri)
    return protocol, target


def known_protocol(protocol: str) -> bool:
    """Whether the installed fsspec knows `protocol` (its backend package may still be missing)."""
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:
        return False
    return protocol in registry or protocol in known_implementations


def uri_problem(uri: str) -> str | None:
    """Why `uri` cannot be served through fsspec here, without importing any backend; None when it can.
    For the job spec's validation (stalwart.spec), so the message starts with "unsupported URI scheme"."""
    try:
        protocol, target = split_uri(uri)
    except StorageError:
        return f"unsupported URI scheme in {uri!r}"
    if importlib.util.find_spec("fsspec") is None:
        return (f"unsupported URI scheme in {uri!r}: {protocol}:// is served through fsspec, which is not "
                "installed here: pip install 'stalwart[fsspec]'")
    if not known_protocol(protocol):
        return (f"unsupported URI scheme in {uri!r}; use file:///path, a plain path, s3://bucket/prefix, or a "
                "protocol fsspec knows (gs://, az://, abfs://, hf://, memory://, fsspec+s3:// for S3 through s3fs)")
    from fsspec.registry import known_implementations, registry

    if protocol not in registry:
        module = known_implementations[protocol]["class"].split(".")[0]
        if importlib.util.find_spec(module) is None:
            package = _pip_name(module)
            return (f"unsupported URI scheme in {uri!r} here: fsspec serves {protocol}:// through {package}, "
                    f"which is not installed: pip install {package}")
    if not target.partition("://")[2].strip("/"):
        return f"{uri!r} names no bucket or path; use {protocol}://bucket/prefix"
    if protocol == "memory":
        return (f"{uri!r}: memory:// lives inside one process, and a job's controller and ranks are separate "
                "processes (each would see its own, empty); use a shared filesystem or an object store")
    return None


def s3fs_options(s3_options) -> dict:
    """s3fs storage options equivalent to a `stalwart.spec.S3Options` (for `fsspec+s3://`); {} for None."""
    if s3_options is None:
        return {}
    opts: dict = {"default_block_size": s3_options.multipart_chunk_mb << 20}
    if s3_options.endpoint_url:
        # As S3Storage does for S3-compatible servers: path-style addressing, no CRC trailers, a region for SigV4.
        opts["endpoint_url"] = s3_options.endpoint_url
        opts["config_kwargs"] = {"s3": {"addressing_style": "path"}, "request_checksum_calculation": "when_required",
                                 "response_checksum_validation": "when_required"}
    region = s3_options.region or ("us-east-1" if s3_options.endpoint_url else None)
    if region:
        opts["client_kwargs"] = {"region_name": region}
    if s3_options.access_key_id is not None:
        opts["key"] = s3_options.access_key_id.get_secret_value()
        opts["secret"] = s3_options.secret_access_key.get_secret_value()
    return opts


class FsspecStorage(RemoteStorage):
    """Objects under `<protocol>://<path>` (or `fsspec+<protocol>://<path>`), through fsspec.

    Lifecycle: construction does no I/O and imports no backend; the filesystem is made on first use
    (a missing backend package is then a permanent StorageError saying what to install) and shared by
    all threads. Pickling drops it, so the object can be sent to Ray actors, which make their own.
    `storage_options` go to the filesystem's constructor, over fsspec's configuration.
    """

    def __init__(self, uri: str, storage_options: dict | None = None, *, retry_deadline_s: float = 60.0):
        self.protocol, self._target = split_uri(uri)
        if not self._target.partition("://")[2].strip("/"):
            raise StorageError(f"{uri!r} names no bucket or path; use {self.protocol}://bucket/prefix", uri=uri)
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.retry_deadline_s = retry_deadline_s
        self._lock = threading.Lock()
        self._fs = None
        self._root: str | None = None
        self._in_place = False  # writes go straight to their key (see the module docstring)

    _dropped = ("_fs",)  # it holds sessions, sockets and event loops; each process makes its own

    # ---- the filesystem ----------------------------------------------------------------------

    @property
    def fs(self):
        """The fsspec filesystem, made on first use."""
        if self._fs is None:
            with self._lock:
                if self._fs is None:
                    self._fs = self._make_filesystem()
        return self._fs

    def _make_filesystem(self):
        cls = self._filesystem_class()
        protocols = _protocols(cls)
        options = {**_env_options(protocols), **self.storage_options}
        try:
            fs = cls(**options)
        except ImportError as exc:  # some backends import their dependencies when constructed
            raise StorageError(self._import_advice(exc), uri=self.uri) from exc
        except Exception as exc:  # noqa: BLE001 - a bad option, a malformed credential file, ...
            raise StorageError(
                f"cannot set up fsspec's {self.protocol}:// filesystem for {self.uri} ({_describe(exc)}); check its "
                f"options ({'checkpoint.s3, ' if self.protocol in ('s3', 's3a') else ''}FSSPEC_"
                f"{self.protocol.upper()}_* variables, ~/.config/fsspec)", uri=self.uri) from exc
        self._root = cls._strip_protocol(self._target).rstrip("/")
        self._in_place = bool(protocols & _PUBLISH_ON_COMPLETE)
        return fs

    def _filesystem_class(self):
        try:
            import fsspec
        except ImportError as exc:
            raise StorageError(f"{self.uri} needs fsspec, which is not installed: pip install 'stalwart[fsspec]'",
                               uri=self.uri) from exc
        try:
            return fsspec.get_filesystem_class(self.protocol)
        except ValueError as exc:
            raise StorageError(
                f"fsspec knows no protocol {self.protocol!r} (in {self.uri}); use file:///path, a plain path, "
                "s3://bucket/prefix, or a protocol fsspec knows (gs://, az://, abfs://, hf://, memory://), and install "
                "its package", uri=self.uri) from exc
        except ImportError as exc:
            raise StorageError(self._import_advice(exc), uri=self.uri) from exc

    def _import_advice(self, exc: ImportError) -> str:
        # fsspec re-raises a failed backend import as ImportError(<its hint>) from the real one.
        cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
        missing = getattr(cause, "name", None)
        if isinstance(cause, ModuleNotFoundError) and missing:
            package = _pip_name(missing)
            return (f"{package} is not installed: pip install {package} (fsspec serves {self.protocol}:// through "
                    f"it; needed for {self.uri} wherever the storage is opened: the controller and every rank)")
        return (f"fsspec's {self.protocol}:// backend failed to import ({_describe(cause)}); reinstall or upgrade "
                f"it and its dependencies (for {self.uri})")

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise StorageError(f"invalid key {key!r}: keys are non-empty relative paths without '.' or '..' parts",
                               uri=self.uri)
        self.fs  # noqa: B018 - sets _root
        return f"{self._root}/{key}"

    # ---- errors and retries ------------------------------------------------------------------

    def _transient(self, exc: BaseException) -> bool:
        return _is_transient(exc)  # every backend's exceptions are its own: all are storage failures here

    def _describe(self, exc: BaseException) -> str:
        return _describe(exc)

    def _missing(self, key: str, exc: StorageError) -> StorageError:
        if isinstance(exc.__cause__, FileNotFoundError):
            return StorageError(f"{self.uri}/{key} does not exist", uri=self.uri)
        return exc

    # ---- the contract --------------------------------------------------------------------------

    def write(self, key: str, src: Source) -> int:
        return self._write(key, src, None)

    def _write(self, key: str, src: Source, deadline_s: float | None) -> int:
        path = self._path(key)
        spool = None
        if isinstance(src, (bytes, bytearray, memoryview)):
            view = memoryview(src)
            view = view.cast("B") if view.format != "B" or view.ndim != 1 else view

            def chunks():
                for i in range(0, view.nbytes, _CHUNK):
                    yield view[i:i + _CHUNK]
        else:
            if not _seekable(src):
                # A retry must send the source again from its start, so a one-way stream is copied aside first.
                spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)
                shutil.copyfileobj(src, spool, 8 << 20)
                spool.seek(0)
                src = spool
            start = src.tell()

            def chunks():
                src.seek(start)
                if hasattr(src, "views"):  # a shard stream: its buffers as they are, no copy
                    yield from src.views()
                else:
                    while chunk := src.read(8 << 20):
                        yield memoryview(chunk)
        try:
            return self._retrying(f"writing {self.uri}/{key}", lambda: self._write_once(path, chunks()),
                                  deadline_s)
        finally:
            if spool is not None:
                spool.close()

    def _write_once(self, path: str, chunks: Iterable[memoryview]) -> int:
        fs = self.fs
        if self._in_place:
            return _write_file(fs, path, chunks)
        parent, _, name = path.rpartition("/")
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        if _protocols(type(fs)) & _HAS_DIRECTORIES:
            fs.makedirs(parent, exist_ok=True)
        try:
            size = _write_file(fs, tmp, chunks)
            fs.mv(tmp, path)
            return size
        except BaseException:
            # A failed or interrupted write must not leave its temporary file: list() hides it, so nothing
            # would ever delete it.
            _rm_quietly(fs, tmp)
            raise

    def read(self, key: str) -> bytes:
        path = self._path(key)
        try:
            blob = self._retrying(f"reading {self.uri}/{key}", lambda: self.fs.cat_file(path))
        except StorageError as exc:
            raise self._missing(key, exc) from exc.__cause__
        self._count(len(blob))
        return blob

    def read_private(self, key: str) -> bytearray:
        # Sized first, then read in ranges straight into the buffer: a large shard is not held twice.
        path = self._path(key)
        try:
            size = self._retrying(f"looking up {self.uri}/{key}", lambda: self.fs.size(path))
        except StorageError as exc:
            raise self._missing(key, exc) from exc.__cause__
        if size is None:  # a filesystem that cannot tell
            return super().read_private(key)
        buf = bytearray(size)
        self.read_into(key, 0, memoryview(buf))
        return buf

    def read_into(self, key: str, offset: int, out: memoryview) -> None:
        """Ranged reads (`cat_file(path, start, end)`, up to 64 MB each) copied into `out`."""
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        if out.nbytes == 0:
            return
        path, end = self._path(key), offset + out.nbytes
        what = f"reading bytes {offset}-{end - 1} of {self.uri}/{key}"
        done = 0
        while done < out.nbytes:
            lo, hi = offset + done, min(end, offset + done + _RANGE_CHUNK)
            try:
                got = self._retrying(what, lambda lo=lo, hi=hi: self.fs.cat_file(path, start=lo, end=hi))
            except StorageError as exc:
                if isinstance(exc.__cause__, FileNotFoundError):
                    raise self._missing(key, exc) from exc.__cause__
                if not exc.transient and self._shorter_than(path, end):
                    # Some stores refuse a range past the end (S3's InvalidRange) instead of clipping it.
                    raise StorageError(f"{self.uri}/{key} ends before byte {end}", uri=self.uri) from exc.__cause__
                raise
            n = len(got)
            out[done:done + min(n, hi - lo)] = memoryview(got)[:hi - lo]
            if n < hi - lo:
                raise StorageError(f"{self.uri}/{key} ends before byte {end} ({what}: it has {lo + n} bytes)",
                                   uri=self.uri)
            done += n
        self._count(out.nbytes)

    def _shorter_than(self, path: str, end: int) -> bool:
        try:
            size = self.fs.size(path)
        except Exception:  # noqa: BLE001 - only a hint for the message; the original error stands otherwise
            return False
        return size is not None and size < end

    def list(self, prefix: str = "") -> list[str]:
        fs = self.fs
        # Find under the prefix's folder, then keep what starts with the prefix ("a" matches "a/1" and "ab/3").
        folder = prefix.rpartition("/")[0]
        base = f"{self._root}/{folder}".rstrip("/")

        def listing() -> list[str]:
            fs.invalidate_cache(base)  # another process may have written since this one listed
            try:
                found = fs.find(base)
            except FileNotFoundError:
                return []
            strip = self._root + "/"
            keys = []
            for full in found:
                full = fs._strip_protocol(full)
                if not full.startswith(strip):
                    continue
                key = full[len(strip):]
                name = key.rpartition("/")[2]
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # a write in progress
                if key.startswith(prefix):
                    keys.append(key)
            return sorted(keys)

        return self._retrying(f"listing {self.uri}/{prefix}", listing)

    def exists(self, key: str) -> bool:
        path = self._path(key)

        def lookup() -> bool:
            self.fs.invalidate_cache(path)
            return self.fs.isfile(path)

        return self._retrying(f"looking up {self.uri}/{key}", lookup)

    def delete(self, keys: Iterable[str]) -> None:
        paths = [self._path(k) for k in keys]
        if not paths:
            return
        fs = self.fs

        def delete_all() -> None:
            try:
                fs.rm(paths)  # one batched request on object stores
            except FileNotFoundError:
                # Some filesystems refuse the whole batch for one missing key: go one by one.
                for path in paths:
                    try:
                        fs.rm_file(path)
                    except FileNotFoundError:
                        pass

        self._retrying(f"deleting from {self.uri}", delete_all)
        for path in paths:
            fs.invalidate_cache(path)
        if _protocols(type(fs)) & _HAS_DIRECTORIES:
            # Remove folders the deletes emptied (only empty ones: rmdir refuses the others), deepest first.
            parents = {p.rpartition("/")[0] for p in paths}
            for parent in sorted(parents, key=lambda p: p.count("/"), reverse=True):
                while parent.startswith(self._root + "/"):
                    try:
                        fs.rmdir(parent)
                    except Exception:  # noqa: BLE001 - not empty, or already gone
                        break
                    parent = parent.rpartition("/")[0]

    def check(self) -> None:
        """Write, read back and delete a probe object; raise a permanent StorageError saying what to fix.

        Nothing is retried: at startup a failure is far more likely a wrong setting than an outage.
        """
        probe = f".stalwart-probe-{uuid.uuid4().hex}"
        body = b"stalwart storage probe " + probe.encode()
        path = self._path(probe)  # makes the filesystem: a missing package fails here, with its advice
        try:
            self._write(probe, body, 0)
            got = self._retrying("probe read", lambda: self.fs.cat_file(path), 0)
            self._retrying("probe delete", lambda: self.fs.rm_file(path), 0)
        except StorageError as exc:
            if exc.__cause__ is None:
                raise
            raise StorageError(self._advice(exc.__cause__), uri=self.uri, transient=False) from exc.__cause__
        if got != body:
            raise StorageError(f"{self.uri} returned different bytes than were written to it; fsspec's "
                               f"{self.protocol}:// filesystem is not a working store here", uri=self.uri)

    def _advice(self, exc: BaseException) -> str:
        hint = _CREDENTIAL_HINTS.get(self.protocol, f"configure the {self.protocol}:// backend's credentials "
                                     f"(FSSPEC_{self.protocol.upper()}_<OPTION> variables or ~/.config/fsspec)")
        path = self._target.partition("://")[2].strip("/").split("/")
        # The bucket or container: the first part of the path; on the Hub, the repository ([kind/]owner/name).
        where = "/".join(path[:3 if path[0] in ("datasets", "spaces", "models") else 2] if self.protocol == "hf"
                         else path[:1])
        if self.protocol in ("file", "local") and isinstance(exc, OSError) and not _is_transient(exc):
            return (f"checkpoint directory {self._root} is not writable ({_describe(exc)}); fix its permissions "
                    "or set checkpoint.uri to another place")
        if _named(exc, _NO_CREDENTIAL_NAMES):
            return f"no credentials for {self.protocol}:// were found ({_describe(exc)}); {hint}"
        if isinstance(exc, PermissionError):
            return (f"the credentials in use may not write, read and delete objects under {self.uri} "
                    f"({_describe(exc)}); {hint}, and grant them write, read, list and delete there, or use "
                    "another checkpoint.uri")
        if isinstance(exc, FileNotFoundError):
            if self._in_place:
                return (f"bucket (or container, or repository) {where!r} of {self.uri} does not exist "
                        f"({_describe(exc)}); create it, or fix checkpoint.uri")
            return f"{self.uri} cannot be written ({_describe(exc)}); create it, or fix checkpoint.uri"
        if _is_transient(exc):
            endpoint = (" (checkpoint.s3.endpoint_url, or the endpoint_url option)"
                        if self.protocol in ("s3", "s3a") else "")
            return (f"cannot reach the {self.protocol}:// service for {self.uri} ({_describe(exc)}); check that "
                    f"it is up and that its endpoint{endpoint} is right")
        return f"{self.uri} failed its storage check: {_describe(exc)}"


# ---- helpers ----------------------------------------------------------------------------------------

def _protocols(cls) -> frozenset[str]:
    proto = getattr(cls, "protocol", ())
    return frozenset([proto] if isinstance(proto, str) else proto)


def _env_options(protocols: Iterable[str]) -> dict:
    """The FSSPEC_<PROTOCOL>[_<OPTION>] variables of the environment as it is now (fsspec reads them only
    when it is imported, which may be before a rank applies its job's env)."""
    from fsspec import config

    found: dict = {}
    with warnings.catch_warnings():  # fsspec warns about FSSPEC_* variables it cannot use
        warnings.simplefilter("ignore")
        config.set_conf_env(found)
    options: dict = {}
    for proto in sorted(protocols):
        options.update(found.get(proto, {}))
    return options


def _pip_name(module: str) -> str:
    # Namespace packages ship as google-auth, azure-storage-blob, ...; the rest under their module name.
    if module.split(".")[0] in ("google", "azure"):
        return module.replace(".", "-").replace("_", "-")
    return module.split(".")[0]


def _write_file(fs, path: str, chunks: Iterable[memoryview]) -> int:
    """Write `chunks` to a new file at `path`; return the size. On failure nothing is committed."""
    from fsspec.spec import AbstractBufferedFile

    f = fs.open(path, "wb")
    size = 0
    try:
        for chunk in chunks:
            f.write(chunk)
            size += chunk.nbytes
        if _protocols(type(fs)) & {"file", "local"}:
            f.flush()
            os.fsync(f.fileno())  # as durable as FileStorage's writes
    except BaseException:
        if isinstance(f, AbstractBufferedFile):
            # close() would upload the buffer as a finished object: abort the upload instead.
            try:
                f.discard()
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            f.closed = True
        else:
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass
        raise
    f.close()  # completes the upload (object stores) or the file
    return size


def _rm_quietly(fs, path: str) -> None:
    try:
        fs.rm_file(path)
    except Exception:  # noqa: BLE001 - cleanup after a failure that is being raised
        pass


def _seekable(f) -> bool:
    try:
        return bool(f.seekable()) and f.tell() >= 0
    except (AttributeError, OSError, ValueError):
        return False


def _named(exc: BaseException, names: Iterable[str]) -> bool:
    """Whether `exc`, or what it was raised from (backends translate errors: s3fs raises an OSError from
    botocore's), is of a class whose name contains one of `names`."""
    seen = 0
    while exc is not None and seen < 4:
        if any(n in cls.__name__ for cls in type(exc).__mro__ for n in names):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError, ImportError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    for attr in ("status", "status_code", "code"):
        status = getattr(exc, attr, None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
    return _named(exc, _TRANSIENT_NAMES)


def _describe(exc: BaseException | None) -> str:
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text}"


__all__ = ["PREFIX", "FsspecStorage", "known_protocol", "s3fs_options", "split_uri", "uri_problem"]
