"""Saves that fail leave nothing behind, leftovers of earlier attempts are swept, and every wait of the
checkpoint path has a named, configurable limit.

Writes fail for real: a storage whose source breaks after part of the shard is on disk (a full disk
answers ENOSPC halfway through a write the same way), and a manifest write that fails."""

import errno
import os
import threading

import pytest
import torch

from stalwart.checkpointing import engine
from stalwart.checkpointing.shards import Piece
from stalwart.checkpointing.storage import FileStorage
from stalwart.errors import StorageError, WaitTimeout

from test_sharded_checkpoints import engines


def files_under(root) -> list[str]:
    """Every file and directory under `root`, temporary files included (list() hides those)."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in dirs + files]
    return sorted(out)


class BreaksMidWrite(FileStorage):
    """Writes the first part of each shard of the ranks in `failing`, then fails: with ENOSPC (a full
    disk), or with another error (a source that breaks)."""

    def __init__(self, root, failing=(0,), error: BaseException | None = None):
        super().__init__(root)
        self.failing = set(failing)
        self.error = error or OSError(errno.ENOSPC, "No space left on device")
        self.partial_seen = False

    def write(self, key, src):
        if not any(key.endswith(engine.shard_name(r, w)) for r in self.failing for w in (1, 2)):
            return super().write(key, src)
        storage = self

        class Breaking:
            def views(self):
                for i, view in enumerate(src.views(chunk=256)):
                    if i == 2:
                        # Part of the shard is on disk by now, under its temporary name.
                        storage.partial_seen = any(n.endswith(".tmp") for n in files_under(storage.root))
                        raise storage.error
                    yield view

        return super().write(key, Breaking())


def state(rank: int = 0):
    return {"w": torch.randn(64, 64), "b": torch.randn(64), "n": 3}


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("source broke")])
def test_a_failed_save_leaves_nothing_of_its_step(tmp_path, error):
    storage = BreaksMidWrite(tmp_path / "ck", error=error)
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1)
    eng.save(7, state())
    result = eng.wait()
    assert not result.committed and result.error
    assert storage.partial_seen  # the failure came halfway through a real write
    assert files_under(storage.root) == []  # no shard, no temporary file, no empty step directory
    storage.failing = set()
    eng.save(8, state())
    assert eng.wait().committed and engine.committed_steps(storage) == [8]


def test_when_one_rank_fails_every_rank_removes_its_shard(tmp_path):
    storage = BreaksMidWrite(tmp_path / "ck", failing=(1,))
    engs = engines(storage)
    for rank, e in enumerate(engs):
        e.save(5, {"w": Piece(torch.randn(4, 8), (8, 8), (4 * rank, 0))})
    results = [e.wait() for e in engs]
    assert not any(r.committed for r in results)
    assert all("No space left" in r.error for r in results)  # rank 0 wrote its shard, then learned of rank 1's
    assert files_under(storage.root) == []


class ManifestFails(FileStorage):
    def write(self, key, src):
        if key.endswith(engine.MANIFEST):
            raise StorageError("disk full", uri=self.uri)
        return super().write(key, src)


def test_a_failed_commit_removes_the_shards(tmp_path):
    storage = ManifestFails(tmp_path / "ck")
    engs = engines(storage)
    for rank, e in enumerate(engs):
        e.save(5, {"w": Piece(torch.randn(4, 8), (8, 8), (4 * rank, 0))})
    results = [e.wait() for e in engs]
    assert "manifest not written" in results[0].error
    assert files_under(storage.root) == []


def test_a_failed_exchange_keeps_the_shard(tmp_path):
    """After an exchange that failed on this rank, rank 0 may still have committed: nothing is removed."""

    class LostPeer(engine.CheckpointEngine):
        def _exchange(self, record):
            return [record, {"rank": -1, "error": "shard exchange failed: peer gone"}]

    storage = FileStorage(tmp_path / "ck")
    eng = LostPeer(storage, rank=1, world_size=2)
    eng.save(5, state())
    assert not eng.wait().committed
    assert files_under(storage.root) == ["step-000000005", "step-000000005/shard-00001-of-00002.bin"]


def test_restore_sweeps_what_earlier_attempts_left_uncommitted(tmp_path):
    storage = FileStorage(tmp_path / "ck")
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1, keep_last=5)
    eng.save(20, state())
    assert eng.wait().committed
    storage.write("step-000000010/shard-00000-of-00002.bin", b"torn, older")
    storage.write("step-000000030/shard-00001-of-00002.bin", b"torn, newer: a dead attempt's save")
    later = engine.CheckpointEngine(storage, rank=0, world_size=1)  # the next attempt's engine
    assert later.sweep_uncommitted() == [10, 30]
    assert engine.list_steps(storage) == {20: True}
    assert files_under(storage.root) == ["step-000000020", "step-000000020/manifest.json",
                                         "step-000000020/shard-00000-of-00001.bin"]
    # Once this attempt saves, a step without a manifest may be its own save in flight: no sweep.
    later.save(40, state())
    later.wait()
    storage.write("step-000000050/shard-00001-of-00002.bin", b"another rank's save in flight")
    assert later.sweep_uncommitted() == []
    assert 50 in engine.list_steps(storage)


def test_retention_spares_torn_saves_newer_than_the_commit(tmp_path):
    """Other ranks write the next save's shards while rank 0 commits this one: a torn newer step may be
    in flight. Older torn steps have no writer left, even when a newer committed step exists."""
    storage = FileStorage(tmp_path / "ck")
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1, keep_last=5)
    eng.save(30, state())
    eng.wait()
    # A rollback: this attempt saves 21 and 25, below an earlier attempt's committed 30.
    storage.write("step-000000021/shard-00001-of-00002.bin", b"torn")
    storage.write("step-000000027/shard-00001-of-00002.bin", b"in flight on another rank")
    eng.save(25, state())
    assert eng.wait().committed
    assert engine.list_steps(storage) == {25: True, 27: False, 30: True}


class Blocked(FileStorage):
    def __init__(self, root):
        super().__init__(root)
        self.release = threading.Event()

    def write(self, key, src):
        self.release.wait()
        return super().write(key, src)


def test_wait_for_a_save_has_a_named_limit(tmp_path, monkeypatch):
    storage = Blocked(tmp_path / "ck")
    eng = engine.CheckpointEngine(storage, rank=0, world_size=1)
    eng.save(3, state())
    with pytest.raises(WaitTimeout, match="checkpoint step 3") as info:
        eng.wait(timeout_s=0.05)
    assert info.value.setting == engine.SAVE_WAIT_TIMEOUT_ENV
    assert "STALWART_CHECKPOINT_WAIT_TIMEOUT_S" in str(info.value)
    monkeypatch.setenv(engine.SAVE_WAIT_TIMEOUT_ENV, "0.05")
    with pytest.raises(WaitTimeout):
        eng.save(4, state())  # a new save waits for the one in flight first
    storage.release.set()
    assert eng.wait(timeout_s=120).committed  # the save was never abandoned, only waited for


def test_restore_read_ahead_has_a_named_limit(monkeypatch):
    from stalwart.launchers.context import RESTORE_PREFETCH_TIMEOUT_ENV, _Prefetch

    release = threading.Event()
    prefetch = _Prefetch(lambda: release.wait() and "found", "the restore read-ahead of a checkpoint under s3://b/p")
    monkeypatch.setenv(RESTORE_PREFETCH_TIMEOUT_ENV, "0.05")
    with pytest.raises(WaitTimeout, match="s3://b/p") as info:
        prefetch.result()
    assert info.value.setting == RESTORE_PREFETCH_TIMEOUT_ENV
    release.set()
    assert prefetch.result() == "found"


def test_loss_statistics_take_python_floats():
    from stalwart.launchers.context import TrainContext

    ctx = TrainContext.__new__(TrainContext)
    ctx._recent_losses = [1.0, float("nan"), torch.tensor(3.0), 2.0]
    stats = ctx._loss_stats()
    assert stats == {"samples": 4, "median": 2.0, "last": 2.0, "nonfinite": True}
