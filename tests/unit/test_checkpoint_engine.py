"""The checkpoint engine on a local directory, one rank: commit, verify, fall back, retain."""


import pytest
import torch

from stalwart.checkpointing import engine
from stalwart.checkpointing.storage import FileStorage
from stalwart.errors import CheckpointCorrupt, StorageError


def make_state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    return model, opt


def state_of(model, opt):
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": None}


@pytest.fixture
def storage(tmp_path):
    return FileStorage(tmp_path / "ck")


def save(eng, step, model, opt, **meta):
    eng.save(step, state_of(model, opt), local={"rng": torch.get_rng_state()}, meta={"data": {"position": step}, **meta})
    return eng.wait()


def test_roundtrip_is_exact_and_snapshot_is_consistent(storage):
    model, opt = make_state()
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1, keep_last=5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    eng.save(10, state_of(model, opt), local={"rng": 1}, meta={"data": {"position": 10}})
    with torch.no_grad():  # training goes on at once: the save must not see this
        for p in model.parameters():
            p.add_(1.0)
    result = eng.wait()
    assert result.committed and result.error is None and result.stall_s < 1
    loaded = engine.load(storage, 10, 0)
    for k, v in expected.items():
        assert torch.equal(loaded.state["model"][k], v)
    assert loaded.state["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert loaded.local == {"rng": 1}
    assert loaded.manifest["data"] == {"position": 10}
    assert [s["file"] for s in loaded.manifest["shards"]] == ["shard-00000-of-00001.bin"]


def test_buffers_are_reused_between_saves(storage):
    model, opt = make_state()
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1)
    save(eng, 1, model, opt)
    buffer = eng._snapshot._buffer
    save(eng, 2, model, opt)
    assert eng._snapshot._buffer is buffer


def test_corrupt_shard_falls_back_to_previous(storage):
    model, opt = make_state()
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1, keep_last=5)
    save(eng, 1, model, opt)
    save(eng, 2, model, opt)
    shard = storage.root / "step-000000002" / "shard-00000-of-00001.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match="checksum"):
        engine.load(storage, 2, 0)
    skipped = []
    loaded = engine.newest_loadable(storage, 0, on_skip=lambda s, r: skipped.append((s, r)))
    assert loaded.step == 1 and skipped[0][0] == 2


def test_truncated_manifest_and_missing_shard_are_ignored(storage):
    model, opt = make_state()
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1, keep_last=5)
    for step in (1, 2, 3):
        save(eng, step, model, opt)
    manifest = storage.root / "step-000000003" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    (storage.root / "step-000000002" / "shard-00000-of-00001.bin").unlink()
    assert engine.newest_loadable(storage, 0).step == 1


def test_uncommitted_save_is_never_loaded(storage):
    model, opt = make_state()
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1, keep_last=5)
    save(eng, 1, model, opt)
    storage.write("step-000000005/shard-00000-of-00001.bin", b"torn")
    assert engine.committed_steps(storage) == [1]
    assert engine.newest_loadable(storage, 0).step == 1


def test_retention_keeps_last_n_and_pinned_and_drops_torn(storage):
    model, opt = make_state()
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1, keep_last=2)
    eng.pinned.add(1)
    save(eng, 1, model, opt)
    storage.write("step-000000002/shard-00000-of-00001.bin", b"torn")
    for step in (3, 4, 5):
        save(eng, step, model, opt)
    assert engine.list_steps(storage) == {1: True, 4: True, 5: True}


class FlakyStorage(FileStorage):
    fail = True

    def write(self, key, src):
        if self.fail and key.endswith(".bin"):
            raise StorageError("server went away", uri=self.uri, transient=True)
        return super().write(key, src)


def test_failed_save_is_reported_and_the_next_commits(tmp_path):
    storage = FlakyStorage(tmp_path / "ck")
    model, opt = make_state()
    results = []
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1, on_result=results.append)
    first = save(eng, 1, model, opt)
    assert not first.committed and "went away" in first.error
    storage.fail = False
    assert save(eng, 2, model, opt).committed
    assert engine.committed_steps(storage) == [2]
    assert [r.committed for r in results] == [False, True]


def test_assign_balances_bytes_across_ranks():
    from stalwart.checkpointing.shards import assign

    sizes = {f"t{i}": s for i, s in enumerate([100, 90, 50, 40, 30, 20, 10, 5])}
    owner = assign(sizes, 2)
    loads = [sum(s for p, s in sizes.items() if owner[p] == r) for r in range(2)]
    assert abs(loads[0] - loads[1]) <= 10
    assert assign(sizes, 2) == owner  # deterministic on every rank
    # Rank 0 writes the tensors that are not the same on every rank (a model's buffers), whatever their size.
    pinned = assign(sizes, 2, first=frozenset({"t0", "t6"}))
    assert pinned["t0"] == pinned["t6"] == 0
    loads = [sum(s for p, s in sizes.items() if pinned[p] == r) for r in range(2)]
    assert abs(loads[0] - loads[1]) <= 30


def test_the_model_buffers_are_written_by_rank_0():
    from stalwart.checkpointing.shards import flatten
    from stalwart.launchers import strategies

    norm = torch.nn.BatchNorm1d(4)
    model = torch.nn.ModuleDict({"a": torch.nn.Sequential(torch.nn.Linear(4, 4), norm), "b": norm})  # shared
    ddp = strategies.make("ddp")
    ddp.adopt(model, None)
    paths = list(flatten(ddp.state())[0])
    assert ddp.rank0_paths(paths) == {f"/model/{m}.{b}" for m in ("a.1", "b")
                                      for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert strategies.make("ddp").rank0_paths(paths) == frozenset()  # no model yet
    # Sharded strategies: every plain tensor of the model (its buffers, by their state-dict names).
    assert strategies.make("fsdp").rank0_paths(["/model/n.running_var", "/optimizer/state/step"]) == {
        "/model/n.running_var"}
    assert strategies.make("deepspeed").rank0_paths(["/buffers/n.running_var", "/engine/global_steps"]) == {
        "/buffers/n.running_var"}


def test_extra_state_is_checked_and_written_by_rank_0():
    from stalwart.checkpointing.shards import flatten
    from stalwart.errors import StalwartError
    from stalwart.launchers import strategies
    from stalwart.launchers.context import TrainContext
    from stalwart.launchers.context import _checked_extras as _extras

    scaler = torch.amp.GradScaler("cpu")
    ema = torch.optim.swa_utils.AveragedModel(torch.nn.Linear(4, 4))
    assert _extras({"scaler": scaler, "ema": ema}) == {"scaler": scaler, "ema": ema}
    assert _extras(None) == {}
    with pytest.raises(StalwartError, match="'step' .*int.* has no state_dict or load_state_dict"):
        _extras({"step": 3})
    with pytest.raises(StalwartError, match="'a/b' is not a usable name"):
        _extras({"a/b": scaler})

    ctx = TrainContext.__new__(TrainContext)
    ctx._strategy, ctx._scheduler, ctx._extras = strategies.make("ddp"), None, {"ema": ema, "scaler": scaler}
    ctx._strategy.adopt(torch.nn.Linear(2, 2), None)
    state = ctx._state()
    assert set(state["extra"]) == {"ema", "scaler"} and state["extra"]["scaler"]["scale"] == 65536.0
    paths = list(flatten(state)[0])
    # An extra may differ between ranks (each rank's own scaler): rank 0's is the one saved, whole.
    assert ctx._rank0_paths(paths) == {p for p in paths if p.startswith("/extra/")} != set()
    ctx._extras = {}
    assert "extra" not in ctx._state()  # no extras: the tree older checkpoints have


def test_resolve_splits_step_uri(storage):
    store, step = engine.resolve(f"file://{storage.root}/step-000000040")
    assert step == 40 and store.root == storage.root
    store, step = engine.resolve(str(storage.root))
    assert step is None


class CountingStorage(FileStorage):
    reads = 0

    def read(self, key):
        CountingStorage.reads += 1
        return super().read(key)


def test_local_cache_serves_restores_and_is_verified(tmp_path):
    storage = CountingStorage(tmp_path / "remote")
    cache = engine.LocalCache(tmp_path / "cache")
    model, opt = make_state()
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1, cache=cache)
    save(eng, 1, model, opt)
    save(eng, 2, model, opt)
    assert not cache.path(1, "shard-00000-of-00001.bin").exists()  # only the newest is kept
    CountingStorage.reads = 0
    loaded = engine.load(storage, 2, 0, cache=cache)
    assert loaded.local_shards == 1 and CountingStorage.reads == 1  # the manifest only
    cached = cache.path(2, "shard-00000-of-00001.bin")
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    loaded = engine.load(storage, 2, 0, cache=cache)
    assert loaded.local_shards == 0  # a damaged local copy is ignored for the durable one


def test_manifest_names_its_checksum_and_older_sha256_manifests_still_verify(storage):
    import hashlib
    import json

    model, opt = make_state()
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1)
    save(eng, 3, model, opt)
    manifest_path = storage.root / "step-000000003" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    record = manifest["shards"][0]
    assert record["checksum"].startswith("xxh3-128:") and len(record["checksum"]) == len("xxh3-128:") + 32
    blob = (storage.root / "step-000000003" / record["file"]).read_bytes()
    # A manifest from before checksums were named carries a bare SHA-256: it loads, and a wrong one fails.
    del record["checksum"]
    record["sha256"] = hashlib.sha256(blob).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    assert engine.load(storage, 3, 0).step == 3
    record["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointCorrupt, match="checksum"):
        engine.load(storage, 3, 0)
    # An algorithm this version does not know is a failed check, never a silent pass.
    del record["sha256"]
    record["checksum"] = "blake9:abcd"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointCorrupt, match="checksum"):
        engine.load(storage, 3, 0)


def test_local_files_load_mapped_copy_on_write(storage):
    # A load maps local shards instead of reading them; the tensors must be writable and private.
    model, opt = make_state()
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1)
    save(eng, 4, model, opt)
    shard = storage.root / "step-000000004" / "shard-00000-of-00001.bin"
    before = shard.read_bytes()
    blob = storage.read_private("step-000000004/shard-00000-of-00001.bin")
    assert isinstance(blob, memoryview) and not blob.readonly and blob.nbytes == len(before)
    loaded = engine.load(storage, 4, 0)
    weight = loaded.state["model"]["0.weight"]
    assert torch.equal(weight, model.state_dict()["0.weight"])
    weight.fill_(7.0)  # written in this process only
    assert shard.read_bytes() == before
    shard.unlink()  # retention may delete a file that is mapped: the mapping stays valid
    assert bool((weight == 7.0).all())
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_private("step-000000004/shard-00000-of-00001.bin")


def test_file_writes_are_exact_from_every_kind_of_source(tmp_path, monkeypatch):
    import io

    from stalwart.checkpointing import storage as storage_module

    monkeypatch.setattr(storage_module._WritebackAhead, "CHUNK", 1000)  # many chunks, an odd tail
    store = FileStorage(tmp_path)
    data = bytes(range(256)) * 40 + b"tail"
    floats = torch.arange(3000, dtype=torch.float32)

    class Views:  # a shard stream hands over buffers of any format
        def views(self):
            yield memoryview(data[:10])
            yield memoryview(floats.numpy())

    assert store.write("a", data) == len(data)
    assert store.write("b", io.BytesIO(data)) == len(data)
    assert store.write("c", Views()) == 10 + floats.numel() * 4
    assert store.read("a") == data and store.read("b") == data
    assert store.read("c") == data[:10] + floats.numpy().tobytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_verify_streams_each_shard_in_chunks_and_finds_every_kind_of_damage(storage, monkeypatch):
    import json

    model, opt = make_state()
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1)
    save(eng, 4, model, opt)
    monkeypatch.setattr(engine, "VERIFY_CHUNK", 1000)  # many chunks, one of them across the index's range
    seen = []
    engine.verify(storage, 4, on_bytes=seen.append)
    shard = next((storage.root / "step-000000004").glob("shard-*"))
    assert sum(seen) == shard.stat().st_size and len(seen) > 3 and max(seen) <= 1000
    good = shard.read_bytes()
    manifest_path = storage.root / "step-000000004" / "manifest.json"
    index = json.loads(manifest_path.read_text())["shards"][0]["index"]

    def damaged(blob: bytes, match: str) -> None:
        shard.write_bytes(blob)
        with pytest.raises(CheckpointCorrupt, match=match):
            engine.verify(storage, 4)
        shard.write_bytes(good)

    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 1
    damaged(bytes(flipped), "fails its checksum")
    damaged(good[:-1], "shorter")
    damaged(good + b"x", "longer")
    # A shard whose bytes match but whose index the manifest no longer agrees with.
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["index"]["checksum"] = "xxh3-128:" + "0" * 32
    manifest_path.write_text(json.dumps(manifest))
    damaged(good, "index fails")
    assert index["nbytes"] > 0
    shard.unlink()
    with pytest.raises(CheckpointCorrupt, match="missing"):
        engine.verify(storage, 4)


def test_keep_is_checked_and_a_standby_fsdp_spare_declines_it():
    from stalwart.errors import StalwartError
    from stalwart.launchers import strategies
    from stalwart.launchers.context import StandbyDeclined, TrainContext

    class Counter:
        def state_dict(self):
            return {"n": 1}

        def load_state_dict(self, state):
            pass

    ctx = TrainContext.__new__(TrainContext)
    ctx._strategy, ctx._extras, ctx._restore_called, ctx._standby = None, {}, False, False
    with pytest.raises(StalwartError, match="after ctx.prepare"):
        ctx.keep("n", Counter())
    ctx._strategy = strategies.make("ddp")
    ctx.keep("n", Counter())
    with pytest.raises(StalwartError, match="kept already"):
        ctx.keep("n", Counter())
    ctx._restore_called = True
    with pytest.raises(StalwartError, match="after ctx.restore"):
        ctx.keep("m", Counter())
    # A spare on standby holds FSDP's model whole until it is a rank: it does not stand by with a kept object.
    ctx._restore_called, ctx._standby = False, True
    ctx._strategy = strategies.make("fsdp")
    ctx._strategy._deferred = True
    with pytest.raises(StandbyDeclined):
        ctx.keep("ema", Counter())
