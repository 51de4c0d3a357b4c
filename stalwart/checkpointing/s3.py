"""`s3://bucket/prefix` storage through boto3, for AWS and S3-compatible servers (MinIO, rclone, ...).

Objects become visible only when their upload completes (PutObject, or CompleteMultipartUpload
for large ones), which gives the all-or-nothing guarantee `Storage` promises. An upload cut short
can leave an incomplete multipart upload behind on the server: it is invisible, but on AWS it is
billed until a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes it.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
import os
import shutil
import tempfile
import threading
import uuid
from typing import Iterable

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError, HTTPClientError, IncompleteReadError,
                                 NoCredentialsError, SSLError)
from s3transfer.exceptions import RetriesExceededError

from stalwart.checkpointing.storage import RemoteStorage, Source
from stalwart.errors import StorageError


# Errors where the same request may succeed later. Everything else (auth, missing bucket, bad
# request) fails the same way every time, so it is raised at once.
_TRANSIENT_EXC = (ConnectionError, HTTPClientError, IncompleteReadError, RetriesExceededError)
_TRANSIENT_CODES = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "RequestTimeoutException",
                    "RequestLimitExceeded", "TooManyRequestsException", "InternalError", "ServiceUnavailable",
                    "PriorRequestNotComplete", "OperationAborted"}
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403", "Forbidden"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_DELETE_BATCH = 1000  # the DeleteObjects limit


class S3Storage(RemoteStorage):
    """Objects under `s3://bucket/prefix`.

    Lifecycle: construction does no I/O; the boto3 client is made on first use and shared by all
    threads (boto3 clients are thread-safe). Pickling drops the client, so the object can be sent
    to Ray actors, which make their own. Every method raises `StorageError`: permanent errors
    (credentials, permissions, missing bucket or key) at once; transient ones (throttling, 5xx,
    connection failures, timeouts) after retrying with jittered exponential backoff for
    `retry_deadline_s` (default: `options.retry_deadline_s`, else 60) from the first failure,
    with `transient=True`. The deadline decides whether
    another attempt starts; an attempt in progress is bounded by the timeouts (and botocore's own
    3 tries per request, which save a large upload from restarting because one part failed).
    """

    _dropped = ("_client", "_probe")  # they hold sockets and locks; each process makes its own

    def __init__(self, uri: str, options=None, *, retry_deadline_s: float | None = None,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 10.0):
        from stalwart.spec import S3Options  # spec imports pydantic; keep this module light to import

        if not uri.startswith("s3://"):
            raise StorageError(f"{uri!r} is not an s3:// URI", uri=uri)
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise StorageError(f"{uri!r} names no bucket; use s3://bucket/prefix", uri=uri)
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.options = options if options is not None else S3Options()
        self.endpoint_url = self.options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        # The argument wins; then the spec's checkpoint.s3.retry_deadline_s, where the spec has it.
        self.retry_deadline_s = (retry_deadline_s if retry_deadline_s is not None
                                 else getattr(self.options, "retry_deadline_s", 60.0))
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._lock = threading.Lock()
        self._client = self._probe = None

    @property
    def client(self):
        """The shared botocore S3 client, made on first use."""
        return self._lazy("_client", self.read_timeout_s, 3)

    def _probe_client(self):
        # check() must answer in seconds even from a server that accepts connections but never
        # replies, so it gets a client with a shorter read timeout and fewer tries.
        return self._lazy("_probe", min(self.read_timeout_s, 5.0), 2)

    def _lazy(self, attr: str, read_timeout_s: float, attempts: int):
        if getattr(self, attr) is None:
            with self._lock:
                if getattr(self, attr) is None:
                    setattr(self, attr, self._make_client(read_timeout_s, attempts))
        return getattr(self, attr)

    def _make_client(self, read_timeout_s: float, attempts: int):
        opts = self.options
        # A Session per storage: boto3's default session is not thread-safe to create clients from.
        key_id = None if opts.access_key_id is None else opts.access_key_id.get_secret_value()
        secret = None if opts.secret_access_key is None else opts.secret_access_key.get_secret_value()
        session = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret,
                                        region_name=opts.region)
        extra = {}
        if self.endpoint_url:
            # Path-style URLs work on every S3-compatible server (bucket-in-hostname needs DNS),
            # and many of them reject the CRC trailers botocore sends by default since 1.36.
            extra = dict(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                         response_checksum_validation="when_required")
        # total_max_attempts counts the first try (plain max_attempts would not).
        config = Config(connect_timeout=self.connect_timeout_s, read_timeout=read_timeout_s,
                        retries={"mode": "standard", "total_max_attempts": attempts}, tcp_keepalive=True,
                        max_pool_connections=max(10, 2 * opts.max_concurrency), **extra)
        region = None if session.region_name or not self.endpoint_url else "us-east-1"  # SigV4 needs one
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=region, config=config)

    def _transfer_config(self) -> TransferConfig:
        chunk = self.options.multipart_chunk_mb << 20
        return TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk,
                              max_concurrency=self.options.max_concurrency, use_threads=True)

    def _key(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise StorageError(f"invalid key {key!r}: keys are non-empty relative paths", uri=self.uri)
        return self.prefix + key

    def _transient(self, exc: BaseException) -> bool | None:
        if isinstance(exc, SSLError):  # a certificate problem does not heal by itself
            return False
        if isinstance(exc, _TRANSIENT_EXC):
            return True
        if isinstance(exc, ClientError):
            return _is_transient(exc)
        if isinstance(exc, BotoCoreError):  # e.g. NoCredentialsError, ParamValidationError
            return False
        return None  # not the service's: raised as it is

    def _describe(self, exc: BaseException) -> str:
        return _describe(exc)

    def _error(self, what: str, exc: Exception) -> StorageError:
        return StorageError(f"{what} failed: {_describe(exc)}", uri=self.uri, transient=False)

    def write(self, key: str, src: Source) -> int:
        full = self._key(key)
        if isinstance(src, (bytes, bytearray, memoryview)):
            view = memoryview(src).cast("B")
            size = view.nbytes
            opener, spool = (lambda: _ViewReader(view)), None
        else:
            spool = None
            if not _seekable(src):
                # A retry must resend from the start, so a one-way stream is copied aside first.
                spool = tempfile.SpooledTemporaryFile(max_size=self.options.multipart_chunk_mb << 20)
                shutil.copyfileobj(src, spool, 8 << 20)
                spool.seek(0)
                src = spool
            start = src.tell()
            size = src.seek(0, io.SEEK_END) - start

            def opener():
                src.seek(start)
                return src
        try:
            self._retrying(f"writing {self.uri}/{key}", lambda: self.client.upload_fileobj(
                opener(), self.bucket, full, Config=self._transfer_config()))
        finally:
            if spool is not None:
                spool.close()
        return size

    def read(self, key: str) -> bytearray:
        """The whole object, read straight into one buffer of its size (bytes-like, owned by the caller):
        a first ranged GET of up to one part also says the object's size; the other parts follow in
        parallel (`max_concurrency`), each into its place. Peak memory is the object plus a 1 MB
        network chunk per request, where reading into a growing stream and copying it out took three
        times the object."""
        full, part = self._key(key), self.options.multipart_chunk_mb << 20
        what = f"reading {self.uri}/{key}"

        def first() -> tuple[bytearray, int]:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes=0-{part - 1}")
            except ClientError as exc:
                if _code(exc) != "InvalidRange":
                    raise
                # An empty object has no byte 0 to range over: the plain GET answers it.
                response = self.client.get_object(Bucket=self.bucket, Key=full)
            size = _object_size(response)
            buf = bytearray(size)
            got = _fill(response["Body"], memoryview(buf))
            return buf, got

        try:
            buf, got = self._retrying(what, first)
        except StorageError as exc:
            if _code(exc.__cause__) in _MISSING_CODES:
                raise StorageError(f"{self.uri}/{key} does not exist", uri=self.uri) from exc.__cause__
            raise
        self._count(got)
        view = memoryview(buf)
        rest = [(lo, min(lo + part, len(buf))) for lo in range(got, len(buf), part)]
        if len(rest) == 1:
            self.read_into(key, rest[0][0], view[rest[0][0]:rest[0][1]])
        elif rest:
            with ThreadPoolExecutor(max_workers=min(len(rest), self.options.max_concurrency)) as pool:
                for done in [pool.submit(self.read_into, key, lo, view[lo:hi]) for lo, hi in rest]:
                    done.result()
        return buf

    def read_private(self, key: str) -> bytearray:
        return self.read(key)

    def read_into(self, key: str, offset: int, out: memoryview) -> None:
        """One ranged GET (`Range: bytes=a-b`), streamed straight into `out`. The caller splits a large
        range into parts (one request each) when it wants them in parallel."""
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        if out.nbytes == 0:
            return
        full, last = self._key(key), offset + out.nbytes - 1
        what = f"reading bytes {offset}-{last} of {self.uri}/{key}"

        def download() -> None:
            body = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={offset}-{last}")["Body"]
            got = _fill(body, out)  # each attempt starts over at the range's start
            if got < out.nbytes:
                # A short body is an object shorter than the range (the server clips a range to the
                # object): the same request would get the same answer, so it is not retried.
                raise _ShortRange(got)

        try:
            self._retrying(what, download)
        except _ShortRange as exc:
            raise StorageError(f"{self.uri}/{key} ends before byte {offset + out.nbytes} ({what}: got "
                               f"{exc.got} bytes)", uri=self.uri) from None
        except StorageError as exc:
            if _code(exc.__cause__) in _MISSING_CODES:
                raise StorageError(f"{self.uri}/{key} does not exist", uri=self.uri) from exc.__cause__
            if _code(exc.__cause__) == "InvalidRange":
                raise StorageError(f"{self.uri}/{key} ends before byte {offset}", uri=self.uri) from exc.__cause__
            raise
        self._count(out.nbytes)

    def list(self, prefix: str = "") -> list[str]:
        def listing() -> list[str]:
            keys = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.prefix + prefix)
            for page in pages:
                keys += [obj["Key"][len(self.prefix):] for obj in page.get("Contents", ())]
            return sorted(keys)

        return self._retrying(f"listing {self.uri}/{prefix}", listing)

    def exists(self, key: str) -> bool:
        try:
            self._retrying(f"looking up {self.uri}/{key}",
                           lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
            return True
        except StorageError as exc:
            if _code(exc.__cause__) in _MISSING_CODES:
                return False
            raise

    def delete(self, keys: Iterable[str]) -> None:
        full = [self._key(k) for k in keys]
        for i in range(0, len(full), _DELETE_BATCH):
            batch = {"Objects": [{"Key": k} for k in full[i:i + _DELETE_BATCH]], "Quiet": True}

            def delete_batch() -> None:
                errors = self.client.delete_objects(Bucket=self.bucket, Delete=batch).get("Errors", [])
                # Per-key failures arrive in a 200 response; raise the first so that it is
                # classified (and retried) like any other error. Deleting again is harmless.
                if errors:
                    first = errors[0]
                    raise ClientError({"Error": {"Code": first.get("Code", ""), "Message": (
                        f"{first.get('Message', '')} (key {first.get('Key')}; {len(errors)} key(s) failed)")}},
                        "DeleteObjects")

            self._retrying(f"deleting from {self.uri}", delete_batch)

    def check(self) -> None:
        """Write, read back and delete a probe object; raise a permanent StorageError saying what to fix.

        Transient failures are not retried beyond botocore's own two tries per request: at
        startup an unreachable endpoint is far more likely a wrong setting than an outage. So a
        refused connection fails in about a second, and a silent server within about
        2 x (connect timeout + 5 s) per step.
        """
        probe = f".stalwart-probe-{uuid.uuid4().hex}"
        body = b"stalwart storage probe " + probe.encode()
        client, key = self._probe_client(), self._key(probe)
        try:
            self._retrying("probe write", lambda: client.put_object(Bucket=self.bucket, Key=key, Body=body), 0)
            got = self._retrying("probe read", lambda: client.get_object(Bucket=self.bucket, Key=key)["Body"].read(), 0)
            self._retrying("probe delete", lambda: client.delete_object(Bucket=self.bucket, Key=key), 0)
        except StorageError as exc:
            raise StorageError(self._advice(exc.__cause__), uri=self.uri, transient=False) from exc.__cause__
        if got != body:
            raise StorageError(f"{self.uri} returned different bytes than were written to it; the endpoint "
                               f"{self.endpoint_url or 'AWS'} is not a working S3 server", uri=self.uri)

    def _advice(self, exc: BaseException | None) -> str:
        endpoint = self.endpoint_url or "AWS S3 (no endpoint_url set)"
        code = _code(exc)
        if isinstance(exc, (ConnectionError, HTTPClientError)):
            return (f"cannot reach the S3 endpoint {endpoint} ({_describe(exc)}); check that the server is up, "
                    "or set checkpoint.s3.endpoint_url (or AWS_ENDPOINT_URL) to the right address")
        if code in ("404", "NotFound", "405", "MethodNotAllowed"):
            return (f"{endpoint} answered {code} to an object upload, so it does not look like an S3 server; "
                    "set checkpoint.s3.endpoint_url (or AWS_ENDPOINT_URL) to the S3 endpoint")
        if isinstance(exc, NoCredentialsError):
            return ("no S3 credentials found; configure the standard AWS credential chain (AWS_ACCESS_KEY_ID/"
                    "AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role), or set checkpoint.s3.access_key_id and "
                    "secret_access_key")
        if code in _AUTH_CODES:
            return (f"{endpoint} rejected the S3 credentials ({code}); check checkpoint.s3.access_key_id and "
                    "secret_access_key (or the AWS credential chain) and that the key is valid for this endpoint")
        if code == "NoSuchBucket":
            return (f"bucket {self.bucket!r} does not exist at {endpoint}; create it, or fix the bucket "
                    "in checkpoint.uri")
        if code == "AccessDenied":
            return (f"the S3 credentials may not write, read and delete objects under {self.uri} (AccessDenied); "
                    "grant s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket there, or use another "
                    "checkpoint.uri")
        return f"{self.uri} failed its storage check at {endpoint}: {_describe(exc)}"


def _object_size(response: dict) -> int:
    """The whole object's size from a GET's answer: `Content-Range: bytes a-b/SIZE` for a ranged one."""
    content_range = response.get("ContentRange") or ""
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    return int(response.get("ContentLength") or 0)


def _fill(body, out: memoryview) -> int:
    """Stream a GET's body into `out`; returns the bytes it held (no more than `out` takes)."""
    got = 0
    try:
        for chunk in body.iter_chunks(1 << 20):
            n = min(len(chunk), out.nbytes - got)
            out[got:got + n] = chunk[:n]
            got += n
    finally:
        body.close()
    return got


class _ShortRange(Exception):
    """A ranged GET returned fewer bytes than asked for."""

    def __init__(self, got: int):
        self.got = got
        super().__init__(f"{got} bytes")


class _ViewReader(io.RawIOBase):
    """A seekable reader over a memoryview, so bytearray/memoryview sources are not copied whole."""

    def __init__(self, view: memoryview):
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        # s3transfer reads a whole part per call; one slice copy beats RawIOBase's two.
        end = len(self._view) if n is None or n < 0 else min(len(self._view), self._pos + n)
        data, self._pos = bytes(self._view[self._pos:end]), max(self._pos, end)
        return data

    def readinto(self, b) -> int:
        n = min(len(b), len(self._view) - self._pos)
        b[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _seekable(f) -> bool:
    try:
        return bool(f.seekable()) and f.tell() >= 0
    except (AttributeError, OSError, ValueError):
        return False


def _code(exc: BaseException | None) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


def _is_transient(exc: ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return _code(exc) in _TRANSIENT_CODES or status >= 500 or status == 429


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', '?')}: {err.get('Message') or exc}"
    if isinstance(exc, RetriesExceededError):
        return f"{type(exc.last_exception).__name__}: {exc.last_exception}"
    return f"{type(exc).__name__}: {exc}"
