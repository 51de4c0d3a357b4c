"""Where checkpoint bytes live: a small protocol with `str` URIs and its backends.

Keys are '/'-separated paths relative to the storage's root URI. An object is either wholly
visible or absent: a reader never sees half of a write (the file backend renames into place,
S3 publishes an object only when its upload completes; fsspec_storage.py says how it does so on each
filesystem). The commit protocol builds on that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import io
import mmap
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, Iterable

from stalwart.errors import StorageError

Source = bytes | bytearray | memoryview | BinaryIO


class Storage(ABC):
    """A place to keep objects under string keys.

    Lifecycle: construct with `open_storage(uri)`, call `check()` once before relying on it (it
    raises a permanent `StorageError` naming what to fix), then use from any thread.
    Every method raises `StorageError`; `transient=True` means a later retry may succeed.
    `bytes_read` counts the bytes this instance has read (whole objects and ranges), so a restore's
    reads can be measured.
    """

    uri: str
    bytes_read: int = 0

    @abstractmethod
    def write(self, key: str, src: Source) -> int:
        """Store `src` (bytes or a readable binary file object) under `key`; return the size.

        The object appears atomically: readers see the old state or all of it.
        """

    @abstractmethod
    def read(self, key: str) -> bytes:
        """Return the whole object. Raises StorageError(transient=False) if it does not exist."""

    def read_private(self, key: str) -> bytearray | memoryview:
        """The whole object as a writable buffer that the caller owns (a checkpoint load parses tensors
        in place on it). By default a fresh bytearray; a local file is mapped copy-on-write instead."""
        blob = self.read(key)
        return blob if isinstance(blob, bytearray) else bytearray(blob)

    def read_into(self, key: str, offset: int, out: memoryview) -> None:
        """Fill `out` with the object's bytes [offset, offset + len(out)). Raises StorageError(transient=False)
        if the object does not exist or is shorter. By default the whole object is read (and counted):
        backends that can read a range override this."""
        blob = memoryview(self.read(key)).cast("B")
        if offset + out.nbytes > blob.nbytes:
            raise StorageError(f"{self.uri}/{key} has {blob.nbytes} bytes, fewer than the {offset + out.nbytes} "
                               "asked for", uri=self.uri)
        out[:] = blob[offset:offset + out.nbytes]

    def map_range(self, key: str, lo: int, hi: int) -> memoryview | None:
        """Bytes [lo, hi) of the object as a private view that copies nothing (a copy-on-write mapping
        of a local file), counted as read; None where the backend cannot map (then use read_into)."""
        return None

    def _count(self, n: int) -> None:
        with _COUNT_LOCK:
            self.bytes_read += n

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix`, relative to the root, sorted."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete these keys; missing keys are not an error."""

    @abstractmethod
    def check(self) -> None:
        """Prove the storage can be written, read and deleted, or raise a permanent StorageError."""

    def exists(self, key: str) -> bool:
        return key in self.list(key)

    def close(self) -> None:
        pass


_COUNT_LOCK = threading.Lock()  # bytes_read is bumped from the loaders' threads


class RemoteStorage(Storage):
    """What the backends that talk to a service share: a client made lazily and dropped on pickling
    (storages travel to Ray actors, which make their own), and retries until a deadline.

    Subclasses set `uri`, `retry_deadline_s` and `_dropped` (the attributes holding clients, sessions
    or sockets), create `self._lock` in `__init__`, and implement `_transient(exc)`: True (retry),
    False (permanent: a StorageError at once), or None (not a storage failure: raised as it is)."""

    retry_deadline_s: float = 60.0
    _dropped: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in self._dropped:
            state[name] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _transient(self, exc: BaseException) -> bool | None:
        return False

    def _describe(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}"

    def _retrying(self, what: str, op, deadline_s: float | None = None):
        """Run `op`, retrying transient failures with jittered exponential backoff until `deadline_s`
        (default `retry_deadline_s`) from the first failure, so that a long transfer failing late still
        gets its whole budget; map failures to StorageError (transient=True once the budget is spent)."""
        budget = self.retry_deadline_s if deadline_s is None else deadline_s
        first_failure = None
        attempt = 0
        while True:
            try:
                return op()
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - each backend classifies its own exceptions
                transient = self._transient(exc)
                if transient is None:
                    raise
                if not transient:
                    raise StorageError(f"{what} failed: {self._describe(exc)}", uri=self.uri) from exc
                error = exc
            attempt += 1
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            left = first_failure + budget - now
            if left <= 0:
                raise StorageError(f"{what} failed {attempt} time(s), retried for {now - first_failure:.1f}s: "
                                   f"{self._describe(error)}", uri=self.uri, transient=True) from error
            # Full jitter, so that ranks hitting the same outage spread their retries out; the last
            # sleep is cut short so that one attempt is made right at the deadline.
            time.sleep(min(left, random.uniform(0, min(10.0, 0.25 * 2 ** attempt))))


def map_private(path: str | os.PathLike) -> memoryview | None:
    """A local file mapped copy-on-write (MAP_PRIVATE): a writable view that uses the page cache in
    place, copies nothing until written, and never writes back. None where it cannot be mapped.

    Safe for checkpoint objects because they are never changed in place (a write goes to a
    temporary file that then replaces the key), and an unlinked file stays valid while mapped.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return memoryview(bytearray())
        try:
            return memoryview(mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                                        prot=mmap.PROT_READ | mmap.PROT_WRITE))
        except (OSError, ValueError, AttributeError):  # a filesystem or platform that cannot map
            return None


class FileStorage(Storage):
    """A local (or shared-filesystem) directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"key {key!r} escapes the storage root", uri=self.uri)
        return path

    def write(self, key: str, src: Source) -> int:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb", buffering=0) as f:
                out = _WritebackAhead(f)
                if isinstance(src, (bytes, bytearray, memoryview)):
                    out.write(memoryview(src))
                elif hasattr(src, "views"):  # a shard stream: write its buffers as they are, no copy
                    for view in src.views():
                        out.write(view)
                else:
                    while chunk := src.read(8 << 20):
                        out.write(memoryview(chunk))
                os.fsync(f.fileno())  # what the writeback ahead left, and the metadata
                size = out.offset
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            return size
        except OSError as exc:
            _unlink_quietly(locals().get("tmp"))
            raise StorageError(f"cannot write {self.uri}/{key}: {exc.strerror or exc}", uri=self.uri,
                               transient=exc.errno in _TRANSIENT_ERRNOS) from exc
        except BaseException:
            # A source that fails halfway (or an interrupt) must not leave its partial temporary file:
            # list() hides temporary files, so nothing would ever delete it, and it holds disk space.
            _unlink_quietly(locals().get("tmp"))
            raise

    def read(self, key: str) -> bytes:
        # A bytearray, read straight into: a checkpoint load parses it in place (no second copy).
        try:
            with open(self._path(key), "rb") as f:
                buf = bytearray(os.fstat(f.fileno()).st_size)
                with memoryview(buf) as view:
                    got = 0
                    while got < len(buf):
                        n = f.readinto(view[got:])
                        if not n:
                            break
                        got += n
                if got < len(buf):
                    del buf[got:]
                self._count(len(buf))
                return buf
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key} does not exist", uri=self.uri) from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri}/{key}: {exc.strerror or exc}", uri=self.uri) from exc

    def read_private(self, key: str) -> bytearray | memoryview:
        try:
            mapped = map_private(self._path(key))
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key} does not exist", uri=self.uri) from None
        except OSError:
            mapped = None
        if mapped is None:
            return super().read_private(key)
        self._count(mapped.nbytes)  # mapped, not yet paged in: a load touches every byte (it checksums them)
        return mapped

    def map_range(self, key: str, lo: int, hi: int) -> memoryview | None:
        try:
            mapped = map_private(self._path(key))
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key} does not exist", uri=self.uri) from None
        except OSError:
            return None
        if mapped is None:
            return None
        if hi > mapped.nbytes:
            raise StorageError(f"{self.uri}/{key} ends before byte {hi}", uri=self.uri)
        self._count(hi - lo)  # mapped, paged in as the caller touches it (a restore checksums every byte)
        return mapped[lo:hi]

    def read_into(self, key: str, offset: int, out: memoryview) -> None:
        try:
            with open(self._path(key), "rb") as f:
                pread_exactly(f.fileno(), offset, out)
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key} does not exist", uri=self.uri) from None
        except EOFError:
            raise StorageError(f"{self.uri}/{key} ends before byte {offset + out.nbytes}", uri=self.uri) from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri}/{key}: {exc.strerror or exc}", uri=self.uri) from exc
        self._count(out.nbytes)

    def list(self, prefix: str = "") -> list[str]:
        base = self.root
        if not base.exists():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # a write in progress
                key = os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/")
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, keys: Iterable[str]) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            _unlink_quietly(path)
            parents.add(path.parent)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            try:
                if parent != self.root:
                    parent.rmdir()  # only if empty
            except OSError:
                pass

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-", suffix=".tmp"):
                pass
        except OSError as exc:
            raise StorageError(
                f"checkpoint directory {self.root} is not writable ({exc.strerror or exc}); "
                "fix its permissions or set checkpoint.uri to another place", uri=self.uri) from exc


_TRANSIENT_ERRNOS = {4, 11, 16, 110}  # EINTR, EAGAIN, EBUSY, ETIMEDOUT


def pread_exactly(fd: int, offset: int, out: memoryview) -> None:
    """Read len(out) bytes at `offset` of `fd` straight into `out`; EOFError if the file is shorter."""
    out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
    got = 0
    while got < out.nbytes:
        n = os.preadv(fd, [out[got:]], offset + got)
        if n == 0:
            raise EOFError(f"end of file at byte {offset + got}")
        got += n


def _unlink_quietly(path) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass


def _load_sync_file_range():
    """libc's sync_file_range (Linux), or None where it is missing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class _WritebackAhead:
    """Writes to an unbuffered file and starts the disk writeback of each chunk as soon as it is in
    the page cache (sync_file_range, which does not wait), so the final fsync finds little left to do
    and the disk works while the rest is still being written. Measured here on 2 x 192 MB written at
    once: 0.16 s against 0.22 s for write + fsync."""

    CHUNK = 16 << 20

    def __init__(self, f):
        self.f = f
        self.fd = f.fileno()
        self.offset = 0
        self._started = 0  # bytes whose writeback has been started

    def write(self, view: memoryview) -> None:
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        while len(view):
            n = self.f.write(view[: self.CHUNK])
            view = view[n:]
            self.offset += n
            if _SYNC_FILE_RANGE is not None and self.offset - self._started >= self.CHUNK:
                _SYNC_FILE_RANGE(self.fd, self._started, self.offset - self._started, _SYNC_FILE_RANGE_WRITE)
                self._started = self.offset


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_storage(uri: str, s3_options=None) -> Storage:
    """Open the backend that serves `uri`.

    `s3://bucket/prefix`: boto3 (S3Storage). `file:///dir` or a plain path: FileStorage. Any other
    `protocol://...` that the installed fsspec knows (gs://, az://, abfs://, hf://, memory://, ...), and
    any `fsspec+protocol://...` (e.g. `fsspec+s3://bucket/prefix` for S3 through s3fs): FsspecStorage.
    `s3_options` is a `stalwart.spec.S3Options` (endpoint, region, credentials) or None; it configures
    `s3://` and `fsspec+s3://`.
    """
    if uri.startswith("s3://"):
        from stalwart.checkpointing.s3 import S3Storage

        deadline = getattr(s3_options, "retry_deadline_s", None)
        return S3Storage(uri, s3_options, **({"retry_deadline_s": deadline} if deadline else {}))
    if uri.startswith("file://"):
        return FileStorage(uri[len("file://"):])
    if "://" in uri:
        from stalwart.checkpointing import fsspec_storage

        protocol = uri.removeprefix(fsspec_storage.PREFIX).partition("://")[0]
        if protocol and fsspec_storage.known_protocol(protocol):
            options, deadline = {}, None
            if protocol in ("s3", "s3a"):
                options = fsspec_storage.s3fs_options(s3_options)
                deadline = getattr(s3_options, "retry_deadline_s", None)
            return fsspec_storage.FsspecStorage(uri, options, **({"retry_deadline_s": deadline} if deadline else {}))
        why = ("fsspec knows no such protocol" if importlib.util.find_spec("fsspec") is not None
               else "other protocols go through fsspec, which is not installed: pip install 'stalwart[fsspec]'")
        raise StorageError(f"unsupported storage URI {uri!r} ({why}); use file:///path, a plain path, "
                           "s3://bucket/prefix, or a protocol fsspec knows (gs://, az://, hf://, memory://, "
                           "fsspec+s3://bucket/prefix for S3 through s3fs)", uri=uri)
    return FileStorage(uri)


def read_all(src: Source) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    buf = io.BytesIO()
    shutil.copyfileobj(src, buf)
    return buf.getvalue()
