"""The Storage contract, checked on every backend, plus S3's error messages and fault behaviour.

The S3 backend runs against a real server (`rclone serve s3`, see tests/s3server.py); those tests
skip only when rclone is not installed. The fsspec backend runs the contract on fsspec's memory and
local filesystems, and through s3fs on the same server when s3fs is installed
(tests/integration/test_fsspec_storage.py has its own tests).
"""

from __future__ import annotations

import io
import os
import pickle
import threading
import time
import uuid

import pytest
from botocore.stub import Stubber
from pydantic import SecretStr
from s3server import S3Server, free_port

from stalwart.checkpointing.fsspec_storage import FsspecStorage
from stalwart.checkpointing.s3 import S3Storage
from stalwart.checkpointing.storage import FileStorage, Storage
from stalwart.errors import StorageError
from stalwart.spec import S3Options

MB = 1 << 20
CHUNK_MB = 8  # small parts, so the 40 MB test really goes multipart


def _s3(uri: str, options: S3Options, **kw) -> S3Storage:
    opts = options.model_copy(update={"multipart_chunk_mb": CHUNK_MB, "max_concurrency": 4})
    return S3Storage(uri, opts, **{"retry_deadline_s": 10, **kw})


@pytest.fixture(params=["file", "s3", "fsspec-memory", "fsspec-file", "fsspec-s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "file":
        return FileStorage(tmp_path / "store")
    if request.param == "fsspec-memory":  # fsspec's in-process filesystem, under a root of its own
        return FsspecStorage(f"memory://t-{uuid.uuid4().hex[:12]}/store")
    if request.param == "fsspec-file":  # fsspec's local filesystem, asked for explicitly
        return FsspecStorage(f"fsspec+file://{tmp_path}/store")
    if request.param == "fsspec-s3":
        pytest.importorskip("s3fs", reason="s3fs is not installed (see pyproject.toml's fsspec extra)")
    server = request.getfixturevalue("s3_server")
    if request.param == "fsspec-s3":  # S3 through s3fs, on the same rclone server
        uri = request.getfixturevalue("s3_uri").replace("s3://", "fsspec+s3://", 1)
        return FsspecStorage(uri, s3fs_test_options(server), retry_deadline_s=10)
    return _s3(request.getfixturevalue("s3_uri"), server.options)


def s3fs_test_options(server) -> dict:
    """s3fs storage options that reach `server` (an S3Server), with parts of CHUNK_MB so 40 MB goes multipart."""
    return {"endpoint_url": server.endpoint_url, "key": server.access_key, "secret": server.secret_key,
            "client_kwargs": {"region_name": "us-east-1"}, "default_block_size": CHUNK_MB * MB,
            "config_kwargs": {"s3": {"addressing_style": "path"}, "request_checksum_calculation": "when_required",
                              "response_checksum_validation": "when_required"}}


@pytest.fixture
def own_server(s3_server):
    """A server for one test to kill or freeze (asking for s3_server skips it where rclone is absent)."""
    with S3Server() as server:
        yield server


class OneWayStream:
    """A file object that can only be read forward, like a pipe or an HTTP body."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(n)


# ---- the contract, on every backend -------------------------------------------------------------

def test_check_passes(storage):
    storage.check()
    assert storage.list() == []  # the probe is cleaned up


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_roundtrip_buffers(storage, kind):
    data = os.urandom(1000)
    assert storage.write("a/b.bin", kind(data)) == len(data)
    assert storage.read("a/b.bin") == data
    assert storage.exists("a/b.bin")


def test_roundtrip_empty(storage):
    assert storage.write("empty", b"") == 0
    assert storage.read("empty") == b""


@pytest.mark.parametrize("make", [io.BytesIO, OneWayStream], ids=["seekable", "one-way"])
def test_roundtrip_file_object(storage, make):
    data = os.urandom(3 * MB + 17)
    assert storage.write("f.bin", make(data)) == len(data)
    assert storage.read("f.bin") == data


def test_large_object(storage):
    data = os.urandom(40 * MB)
    parts, gets = [], []
    if isinstance(storage, S3Storage):
        storage.client.meta.events.register("after-call.s3.UploadPart", lambda **kw: parts.append(1))
        storage.client.meta.events.register("after-call.s3.GetObject", lambda **kw: gets.append(1))
    assert storage.write("big/shard-0", data) == len(data)
    assert storage.read("big/shard-0") == data
    if isinstance(storage, S3Storage):
        assert len(parts) == 40 // CHUNK_MB  # multipart upload
        assert len(gets) == 40 // CHUNK_MB  # ranged download


def test_list_prefixes(storage):
    for key in ["a/1", "a/2", "ab/3", "b/4", "a/deep/5"]:
        storage.write(key, key.encode())
    assert storage.list() == ["a/1", "a/2", "a/deep/5", "ab/3", "b/4"]
    assert storage.list("a/") == ["a/1", "a/2", "a/deep/5"]
    assert storage.list("a") == ["a/1", "a/2", "a/deep/5", "ab/3"]
    assert storage.list("zz") == []


def test_delete(storage):
    for key in ["x/1", "x/2", "y/3"]:
        storage.write(key, b"data")
    storage.delete(["x/1", "y/3", "never/written"])
    assert storage.list() == ["x/2"]
    assert not storage.exists("x/1")
    storage.delete([])
    storage.delete(["x/2"])
    assert storage.list() == []


def test_missing_key(storage):
    with pytest.raises(StorageError) as info:
        storage.read("no/such/key")
    assert info.value.transient is False
    assert "no/such/key" in str(info.value) and "does not exist" in str(info.value)
    assert not storage.exists("no/such/key")


def test_overwrite(storage):
    storage.write("k", b"first version")
    storage.write("k", b"second")
    assert storage.read("k") == b"second"
    assert storage.list() == ["k"]


# ---- S3 only ------------------------------------------------------------------------------------

def test_s3_pickles_without_client(s3_server, s3_uri):
    storage = _s3(s3_uri, s3_server.options)
    storage.write("k", b"v")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone._client is None
    assert clone.read("k") == b"v"


def test_s3_uri_parsing(s3_server):
    assert S3Storage("s3://bkt", s3_server.options).prefix == ""
    assert S3Storage("s3://bkt/a/b/", s3_server.options).prefix == "a/b/"
    with pytest.raises(StorageError, match="names no bucket"):
        S3Storage("s3:///x", s3_server.options)


def test_s3_delete_batches_of_1000(s3_server, s3_uri):
    storage = _s3(s3_uri, s3_server.options)
    calls = []
    storage.client.meta.events.register("provide-client-params.s3.DeleteObjects",
                                        lambda params, **kw: calls.append(len(params["Delete"]["Objects"])))
    storage.write("k-0", b"v")
    storage.delete([f"k-{i}" for i in range(2500)])
    assert calls == [1000, 1000, 500]
    assert storage.list() == []


def test_s3_check_wrong_endpoint():
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    opts = S3Options(endpoint_url=endpoint, access_key_id="k", secret_access_key="s")
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        S3Storage("s3://bucket/prefix", opts).check()
    assert time.monotonic() - start < 10
    assert info.value.transient is False
    assert endpoint in str(info.value) and "checkpoint.s3.endpoint_url" in str(info.value)


@pytest.mark.parametrize("field", ["access_key_id", "secret_access_key"])
def test_s3_check_bad_credentials(s3_server, s3_uri, field):
    opts = s3_server.options.model_copy(update={field: SecretStr("wrong")})
    with pytest.raises(StorageError) as info:
        S3Storage(s3_uri, opts).check()
    assert info.value.transient is False
    assert "credentials" in str(info.value) and "checkpoint.s3.access_key_id" in str(info.value)


def test_s3_check_missing_bucket(s3_server):
    with pytest.raises(StorageError) as info:
        S3Storage("s3://no-such-bucket/run", s3_server.options).check()
    assert info.value.transient is False
    assert "'no-such-bucket' does not exist" in str(info.value)


def _stubbed(probe: bool = False, **kw) -> tuple[S3Storage, Stubber]:
    # Errors rclone cannot be made to return (AccessDenied, throttling) are replayed by botocore's
    # Stubber in place of the HTTP layer.
    opts = S3Options(endpoint_url="http://127.0.0.1:9", access_key_id="k", secret_access_key="s")
    storage = S3Storage("s3://bucket/run", opts, **kw)
    stub = Stubber(storage._probe_client() if probe else storage.client)
    stub.activate()
    return storage, stub


def test_s3_check_access_denied():
    storage, stub = _stubbed(probe=True)  # check() has a client of its own, with short timeouts
    stub.add_client_error("put_object", "AccessDenied", "Access Denied", 403)
    with pytest.raises(StorageError) as info:
        storage.check()
    assert info.value.transient is False
    assert "AccessDenied" in str(info.value) and "s3:PutObject" in str(info.value)


def test_s3_throttling_is_retried():
    storage, stub = _stubbed()
    stub.add_client_error("list_objects_v2", "SlowDown", "Please reduce your request rate", 503)
    stub.add_client_error("list_objects_v2", "InternalError", "We encountered an internal error", 500)
    stub.add_response("list_objects_v2", {"Contents": [{"Key": "run/a"}], "IsTruncated": False})
    assert storage.list() == ["a"]


def test_s3_retries_stop_at_deadline():
    storage, stub = _stubbed(retry_deadline_s=1.0)
    for _ in range(100):
        stub.add_client_error("list_objects_v2", "SlowDown", "Please reduce your request rate", 503)
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.list()
    assert info.value.transient is True and "SlowDown" in str(info.value)
    assert 1.0 <= time.monotonic() - start < 1.5


def test_s3_permanent_errors_are_not_retried():
    storage, stub = _stubbed()
    stub.add_client_error("list_objects_v2", "NoSuchBucket", "The specified bucket does not exist", 404)
    with pytest.raises(StorageError) as info:
        storage.list()
    assert info.value.transient is False
    stub.assert_no_pending_responses()


class ThrottledReader(io.RawIOBase):
    """A seekable source that yields data at `rate` bytes/s, so an upload is still running when the server dies."""

    def __init__(self, data: bytes, rate: float):
        self._buf, self._rate = io.BytesIO(data), rate

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._buf.readinto(b)
        time.sleep(n / self._rate)
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        return self._buf.tell()


def test_s3_server_killed_mid_upload(own_server):
    deadline_s = 2.0
    server = own_server
    storage = _s3(server.uri("run"), server.options, retry_deadline_s=deadline_s,
                  connect_timeout_s=1, read_timeout_s=3)
    parts = threading.Semaphore(0)
    storage.client.meta.events.register("after-call.s3.UploadPart", lambda **kw: parts.release())
    outcome: dict = {}

    def upload() -> None:
        try:
            outcome["size"] = storage.write("shard-0", ThrottledReader(os.urandom(80 * MB), rate=40 * MB))
        except StorageError as exc:
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    assert parts.acquire(timeout=20) and parts.acquire(timeout=20), "the upload never got going"
    server.kill()
    killed_at = time.monotonic()
    thread.join(30)
    assert not thread.is_alive(), "write() hung after the server died"

    error = outcome.get("error")
    assert error is not None, f"write() succeeded against a dead server: {outcome}"
    assert error.transient is True
    # The deadline bounds the retrying; the attempt that was running when the server died
    # may add its own few seconds (botocore's tries of the failing part and of the abort).
    assert outcome["at"] - killed_at < deadline_s + 10, error
    print(f"write() raised {outcome['at'] - killed_at:.1f}s after the kill: {error}")

    server.start()
    assert storage.list() == []
    assert not storage.exists("shard-0")
    with pytest.raises(StorageError, match="does not exist"):
        storage.read("shard-0")
    # The server, and the storage object, work again after the outage.
    assert storage.write("shard-0", b"retry") == 5
    assert storage.read("shard-0") == b"retry"


def test_s3_hung_server(own_server):
    # A frozen server accepts connections but never answers: only timeouts can tell.
    server = own_server
    storage = _s3(server.uri("run"), server.options, retry_deadline_s=1.0, read_timeout_s=1.0)
    storage.write("k", b"v")
    server.freeze()
    try:
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            storage.list()
        # One attempt is 3 tries x 1 s read timeout plus botocore's backoff (<= 1 + 2 s): the
        # first, then retries for 1 s, the last of which may start just before the deadline.
        assert info.value.transient is True and time.monotonic() - start < 2 * 6 + 1 + 1, info.value
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            storage.check()
        assert info.value.transient is False and "cannot reach" in str(info.value)
        # The probe write fails: 2 tries x (1 s waiting for "100 Continue", which botocore
        # asks for on uploads, + 1 s read timeout), plus <= 1 s backoff.
        assert time.monotonic() - start < 6
    finally:
        server.thaw()
    assert storage.read("k") == b"v"
