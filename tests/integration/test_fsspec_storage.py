"""FsspecStorage: routing, ranged reads, atomic writes, retries, check()'s advice, pickling, a real checkpoint.

The generic Storage contract runs on fsspec's memory and local filesystems (and on s3fs, when it is
installed) in test_storage.py, whose `storage` fixture has fsspec variants. Here: what is particular
to fsspec. An object store is stood in for by `BlobFS`, a small in-process filesystem that, like
s3fs, gcsfs and adlfs, buffers a written file and publishes it only when its upload completes.
The s3fs tests run against the rclone S3 server (tests/s3server.py) and skip without s3fs.
"""

from __future__ import annotations

import io
import os
import pickle
import time
import uuid

import fsspec
import pytest
import torch
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from test_storage import MB, s3fs_test_options

from stalwart.checkpointing import engine, fsspec_storage
from stalwart.checkpointing.fsspec_storage import FsspecStorage
from stalwart.checkpointing.s3 import S3Storage
from stalwart.checkpointing.storage import FileStorage, open_storage
from stalwart.errors import SpecError, StorageError
from stalwart.spec import JobSpec, S3Options


def memory_uri() -> str:
    return f"memory://t-{uuid.uuid4().hex[:12]}/ck"


@pytest.fixture(params=["memory", "file"])
def fs_storage(request, tmp_path) -> FsspecStorage:
    uri = memory_uri() if request.param == "memory" else f"fsspec+file://{tmp_path}/ck"
    return FsspecStorage(uri)


# ---- a stand-in object store -------------------------------------------------------------------

class BlobFile(AbstractBufferedFile):
    """Uploads in parts; the object appears only when the last part is in (like a multipart upload)."""

    def _initiate_upload(self):
        self.parts = []

    def _upload_chunk(self, final=False):
        self.parts.append(self.buffer.getvalue())
        if final:
            self.fs.blobs[self.path] = b"".join(self.parts)
        return True

    def discard(self):
        self.fs.discarded.append(self.path)

    def _fetch_range(self, start, end):
        return self.fs.blobs[self.path][start:end]


class BlobFS(AbstractFileSystem):
    protocol = ("blobtest",)
    root_marker = ""
    blobs: dict[str, bytes] = {}
    discarded: list[str] = []
    failures: dict[str, list[BaseException]] = {}  # operation -> errors to raise, first first
    calls: list[tuple] = []

    def _fail(self, op: str) -> None:
        BlobFS.calls.append((op,))
        pending = BlobFS.failures.get(op)
        if pending:
            exc = pending[0]
            if not getattr(exc, "_forever", False):
                pending.pop(0)
            raise exc

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        self._fail("open")
        if "r" in mode and path not in self.blobs:
            raise FileNotFoundError(path)
        return BlobFile(self, path, mode, block_size=block_size or 5 * MB, autocommit=autocommit,
                        cache_options=cache_options, size=len(self.blobs[path]) if "r" in mode else None)

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        if path in self.blobs:
            return {"name": path, "size": len(self.blobs[path]), "type": "file"}
        raise FileNotFoundError(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._fail("cat")
        BlobFS.calls.append(("cat_file", start, end))
        path = self._strip_protocol(path)
        if path not in self.blobs:
            raise FileNotFoundError(path)
        return self.blobs[path][start:end]

    def find(self, path, **kwargs):
        self._fail("find")
        path = self._strip_protocol(path).rstrip("/")
        return sorted(k for k in self.blobs if k.startswith(path + "/") or k == path)

    def rm(self, path, recursive=False, maxdepth=None):
        for p in [path] if isinstance(path, str) else path:
            self.blobs.pop(self._strip_protocol(p), None)  # like S3: deleting nothing is fine

    def rm_file(self, path):
        self.rm(path)


@pytest.fixture
def blobfs(monkeypatch):
    """The `blobtest://` protocol, treated as an object store that publishes on completion."""
    fsspec.register_implementation("blobtest", BlobFS, clobber=True)
    monkeypatch.setattr(fsspec_storage, "_PUBLISH_ON_COMPLETE", fsspec_storage._PUBLISH_ON_COMPLETE | {"blobtest"})
    BlobFS.blobs, BlobFS.discarded, BlobFS.failures, BlobFS.calls = {}, [], {}, []
    BlobFS.clear_instance_cache()
    yield BlobFS
    from fsspec.registry import _registry

    _registry.pop("blobtest", None)


def forever(exc: BaseException) -> BaseException:
    exc._forever = True
    return exc


class FailingStream(io.RawIOBase):
    """A seekable source (so it is not copied aside first) that breaks after handing over `good` bytes."""

    def __init__(self, good: int):
        self._buf = io.BytesIO(os.urandom(good))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        return self._buf.tell()

    def read(self, n: int = -1) -> bytes:
        chunk = self._buf.read(n)
        if not chunk:
            raise ValueError("the source broke")
        return chunk


# ---- routing -------------------------------------------------------------------------------------

def test_open_storage_routes_uris(tmp_path):
    assert isinstance(open_storage("s3://bucket/run"), S3Storage)  # boto3 keeps s3://
    assert isinstance(open_storage(f"file://{tmp_path}"), FileStorage)
    assert isinstance(open_storage(str(tmp_path)), FileStorage)
    mem = open_storage("memory://bucket/run/")
    assert isinstance(mem, FsspecStorage) and mem.uri == "memory://bucket/run" and mem.protocol == "memory"
    local = open_storage(f"fsspec+file://{tmp_path}/x")
    assert isinstance(local, FsspecStorage) and local.uri == f"fsspec+file://{tmp_path}/x"
    # fsspec+s3:// goes through s3fs, configured from checkpoint.s3 (no import happens until first use).
    opts = S3Options(endpoint_url="http://127.0.0.1:9", access_key_id="k", secret_access_key="s", retry_deadline_s=7)
    via = open_storage("fsspec+s3://bucket/run", opts)
    assert isinstance(via, FsspecStorage) and via.protocol == "s3" and via.retry_deadline_s == 7
    assert via.storage_options["endpoint_url"] == "http://127.0.0.1:9"
    assert (via.storage_options["key"], via.storage_options["secret"]) == ("k", "s")
    with pytest.raises(StorageError) as info:
        open_storage("nosuchproto://bucket/run")
    assert "unsupported storage URI" in str(info.value) and "fsspec" in str(info.value)
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_storage("fsspec+nosuchproto://bucket/run")
    with pytest.raises(StorageError, match="names no bucket or path"):
        open_storage("memory://")


def test_step_uris_come_back_to_the_same_backend(fs_storage):
    again, step = engine.resolve(f"{fs_storage.uri}/step-000000007")
    assert isinstance(again, FsspecStorage) and again.uri == fs_storage.uri and step == 7


def test_spec_accepts_fsspec_uris_it_can_serve(tmp_path):
    def spec(uri: str) -> JobSpec:
        return JobSpec.from_dict({"name": "x", "entrypoint": "a:b", "checkpoint": {"uri": uri}})

    assert spec(f"fsspec+file://{tmp_path}").checkpoint.uri == f"fsspec+file://{tmp_path}"
    with pytest.raises(SpecError, match="unsupported URI scheme"):
        spec("nosuchproto://bucket/x")
    with pytest.raises(SpecError, match="lives inside one process"):
        spec("memory://bucket/x")
    if importlib_missing("gcsfs"):
        with pytest.raises(SpecError, match="pip install gcsfs"):
            spec("gs://bucket/x")


def importlib_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


# ---- the contract's fine print ---------------------------------------------------------------------

def test_ranged_read_into_reads_only_the_range(blobfs, monkeypatch):
    monkeypatch.setattr(fsspec_storage, "_RANGE_CHUNK", 1 * MB)  # several requests for one range
    storage = FsspecStorage("blobtest://bucket/run")
    data = os.urandom(5 * MB + 123)
    storage.write("shard", data)
    blobfs.calls.clear()
    out = bytearray(3 * MB + 7)
    storage.read_into("shard", MB - 5, memoryview(out))
    assert out == data[MB - 5:MB - 5 + len(out)]
    ranges = [c[1:] for c in blobfs.calls if c[0] == "cat_file"]
    starts = [MB - 5, 2 * MB - 5, 3 * MB - 5, 4 * MB - 5]
    assert ranges == [(lo, min(lo + MB, 4 * MB + 2)) for lo in starts]  # never the whole object
    assert storage.bytes_read == len(out)
    with pytest.raises(StorageError) as info:
        storage.read_into("shard", len(data) - 10, memoryview(bytearray(11)))
    assert "ends before byte" in str(info.value) and info.value.transient is False
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_into("nope", 0, memoryview(bytearray(1)))


def test_read_private_and_counts(fs_storage):
    data = os.urandom(2 * MB + 1)
    fs_storage.write("k", data)
    buf = fs_storage.read_private("k")
    assert isinstance(buf, bytearray) and buf == data
    buf[0] ^= 0xFF  # the caller owns it
    assert fs_storage.read("k") == data
    assert fs_storage.bytes_read == 2 * len(data)
    out = bytearray(10)
    fs_storage.read_into("k", 100, memoryview(out))
    assert out == data[100:110] and fs_storage.bytes_read == 2 * len(data) + 10


def test_failed_write_leaves_nothing(fs_storage):
    fs_storage.write("k", b"old version")
    with pytest.raises(StorageError, match="the source broke"):
        fs_storage.write("k", FailingStream(3 * MB))
    with pytest.raises(StorageError, match="the source broke"):
        fs_storage.write("new", FailingStream(10))
    assert fs_storage.list() == ["k"] and fs_storage.read("k") == b"old version"
    assert fs_storage.fs.find(fs_storage._root) == [f"{fs_storage._root}/k"]  # no temporary file either


def test_object_store_writes_in_place_and_abandons_failed_uploads(blobfs):
    storage = FsspecStorage("blobtest://bucket/run")
    assert storage.write("a/k", memoryview(b"x" * 100)) == 100
    assert list(blobfs.blobs) == ["bucket/run/a/k"]  # no temporary key, no move
    # A source that breaks after some parts went up: the upload is discarded, never completed.
    with pytest.raises(StorageError, match="the source broke"):
        storage.write("a/big", FailingStream(12 * MB))
    with pytest.raises(StorageError, match="the source broke"):
        storage.write("a/small", FailingStream(100))  # still in the buffer: closing would publish it
    assert blobfs.discarded == ["bucket/run/a/big", "bucket/run/a/small"]
    assert storage.list() == ["a/k"]


def test_transient_errors_are_retried(blobfs):
    storage = FsspecStorage("blobtest://bucket/run", retry_deadline_s=5)
    storage.write("k", b"v")
    blobfs.failures["cat"] = [ConnectionResetError("reset by peer"), TimeoutError("read timed out")]
    assert storage.read("k") == b"v"
    blobfs.failures["find"] = [OSError(16, "SlowDown")]  # s3fs reports throttling as EBUSY
    assert storage.list() == ["k"]


def test_retries_stop_at_the_deadline(blobfs):
    storage = FsspecStorage("blobtest://bucket/run", retry_deadline_s=0.5)
    blobfs.failures["find"] = [forever(ConnectionRefusedError("connection refused"))]
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.list()
    assert info.value.transient is True and "ConnectionRefusedError" in str(info.value)
    assert 0.5 <= time.monotonic() - start < 1.5


def test_permanent_errors_are_not_retried(blobfs):
    storage = FsspecStorage("blobtest://bucket/run", retry_deadline_s=30)
    blobfs.failures["find"] = [forever(PermissionError("AccessDenied"))]
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.list()
    assert info.value.transient is False and time.monotonic() - start < 1
    assert sum(1 for c in blobfs.calls if c == ("find",)) == 1


def test_pickles_without_filesystem(fs_storage):
    fs_storage.write("k", b"v")
    clone = pickle.loads(pickle.dumps(fs_storage))
    assert clone._fs is None
    assert clone.read("k") == b"v" and clone.list() == ["k"]


def test_env_options_are_read_when_the_filesystem_is_made(blobfs, monkeypatch):
    monkeypatch.setenv("FSSPEC_BLOBTEST_COLOUR", "blue")  # set after fsspec was imported
    monkeypatch.setenv("FSSPEC_BLOBTEST_SHAPE", "round")
    storage = FsspecStorage("blobtest://bucket/run", {"shape": "square"})
    assert storage.fs.storage_options == {"colour": "blue", "shape": "square"}  # explicit options win


def test_invalid_keys(fs_storage):
    for key in ["", "/abs", "a/../b", "a//b"]:
        with pytest.raises(StorageError, match="invalid key"):
            fs_storage.write(key, b"v")


# ---- check() ---------------------------------------------------------------------------------------

def test_check_unknown_protocol():
    with pytest.raises(StorageError) as info:
        FsspecStorage("nosuchproto://bucket/run").check()
    assert info.value.transient is False and "fsspec knows no protocol 'nosuchproto'" in str(info.value)


def test_check_missing_backend_package(monkeypatch):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "fakeproto", {"class": "stalwart_no_such_pkg.FakeFileSystem",
                                                             "err": "Install stalwart_no_such_pkg"})
    with pytest.raises(StorageError) as info:
        FsspecStorage("fakeproto://bucket/run").check()
    assert info.value.transient is False
    assert "stalwart_no_such_pkg is not installed: pip install stalwart_no_such_pkg" in str(info.value)


@pytest.mark.skipif(not importlib_missing("gcsfs"), reason="gcsfs is installed here")
def test_check_gs_without_gcsfs():
    storage = FsspecStorage("gs://bucket/run")
    with pytest.raises(StorageError, match=r"gcsfs is not installed: pip install gcsfs"):
        storage.check()
    with pytest.raises(StorageError, match=r"gcsfs is not installed"):
        storage.list()  # every method says so, not only check()


def test_check_advice(blobfs):
    storage = FsspecStorage("blobtest://bucket/run")
    storage.check()
    assert blobfs.blobs == {}  # the probe is gone
    blobfs.failures["open"] = [forever(PermissionError("AccessDenied: Access Denied"))]
    with pytest.raises(StorageError) as info:
        storage.check()
    assert info.value.transient is False and "may not write, read and delete" in str(info.value)
    blobfs.failures["open"] = [forever(FileNotFoundError("NoSuchBucket"))]
    with pytest.raises(StorageError, match="'bucket' of blobtest://bucket/run does not exist"):
        storage.check()
    blobfs.failures["open"] = [forever(ConnectionRefusedError("connection refused"))]
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.check()
    assert "cannot reach" in str(info.value) and info.value.transient is False
    assert time.monotonic() - start < 1  # not retried at startup


# ---- S3 through s3fs, on the rclone server ------------------------------------------------------------

@pytest.fixture
def s3fs_uri(s3_server, s3_uri) -> str:
    pytest.importorskip("s3fs", reason="s3fs is not installed (it would downgrade botocore here; see pyproject.toml)")
    return s3_uri.replace("s3://", "fsspec+s3://", 1)


def test_s3fs_through_open_storage_with_spec_options(s3_server, s3fs_uri):
    storage = open_storage(s3fs_uri, s3_server.options.model_copy(update={"multipart_chunk_mb": 5}))
    storage.check()
    data = os.urandom(12 * MB)
    assert storage.write("step-1/shard", data) == len(data)  # goes multipart at 5 MB parts
    out = bytearray(MB)
    storage.read_into("step-1/shard", 7 * MB, memoryview(out))
    assert out == data[7 * MB:8 * MB]
    assert storage.read_private("step-1/shard") == data
    assert storage.list("step-1/") == ["step-1/shard"]
    assert pickle.loads(pickle.dumps(storage)).read("step-1/shard") == data


def test_s3fs_check_errors(s3_server, s3fs_uri):
    opts = s3fs_test_options(s3_server)
    with pytest.raises(StorageError) as info:
        FsspecStorage(s3fs_uri, {**opts, "secret": "wrong"}).check()
    assert info.value.transient is False and "credentials" in str(info.value)
    with pytest.raises(StorageError) as info:
        FsspecStorage("fsspec+s3://no-such-bucket/run", opts).check()
    assert info.value.transient is False
    assert "'no-such-bucket'" in str(info.value) and "does not exist" in str(info.value)


# ---- a real checkpoint, through the engine --------------------------------------------------------------

def test_checkpoint_roundtrip_through_the_engine(fs_storage):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    eng = engine.CheckpointEngine(fs_storage, rank=0, world_size=1, keep_last=2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in (1, 2, 3):
        eng.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": None},
                 local={"rng": step}, meta={"data": {"position": step}})
        result = eng.wait()
        assert result.committed and result.error is None, result.error
    assert sorted(engine.committed_steps(fs_storage)) == [2, 3]  # keep_last retired step 1

    # Opened again from its URI, as another process would: the newest checkpoint loads exactly.
    again, step = engine.resolve(f"{fs_storage.uri}/step-000000003")
    loaded = engine.load(again, step, 0)
    for k, v in expected.items():
        assert torch.equal(loaded.state["model"][k], v)
    assert loaded.state["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert loaded.local == {"rng": 3} and loaded.manifest["data"] == {"position": 3}
    assert again.bytes_read > 0
    assert engine.newest_loadable(again, 0).step == 3
