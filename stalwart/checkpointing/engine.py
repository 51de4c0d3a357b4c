"""The asynchronous checkpoint engine: snapshot in the step, write in the background, commit by manifest.

Layout under the storage root (one root per job):

    step-000000100/shard-00000-of-00002.bin   each rank writes its own shard
    step-000000100/shard-00001-of-00002.bin
    step-000000100/manifest.json              written last, by rank 0, once every shard is durable

A checkpoint is committed exactly when its manifest exists. Nothing without one is ever loaded.
Replicated state (DDP) is split across ranks so each writes about 1/world of the bytes. Sharded
state (FSDP, ZeRO; layout "sharded") holds `shards.Piece` leaves: each rank writes its own blocks
with their place in the global tensors, so a checkpoint written by N ranks restores on any number
of ranks. `load` reads every shard and puts the blocks back together (and `checkpoints verify`
checks every byte that way); a restore reads only its rank's share (`share.py`), through the index
each shard ends with, whose place and checksum the manifest records.

A save that does not commit removes what it wrote (each rank its own shard, when every rank knows
the save failed), and a restore removes what earlier attempts left uncommitted: failed saves must not
hold the space the next one needs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection

import torch
import torch.distributed as dist

from stalwart.checkpointing import checksum, shards
from stalwart.checkpointing.storage import Storage, map_private, open_storage
from stalwart.errors import CheckpointCorrupt, CheckpointNotFound, StorageError, WaitTimeout

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{9})$")

# How long `CheckpointEngine.wait` waits for the save in flight (its shard write, the exchange of
# shard records and the manifest) before it gives up. Each part has its own bound (storage retry
# deadlines, the group's collective timeout); this one catches what slips past them, so it is long.
SAVE_WAIT_TIMEOUT_S = 1800.0
SAVE_WAIT_TIMEOUT_ENV = "STALWART_CHECKPOINT_WAIT_TIMEOUT_S"


def save_wait_timeout_s() -> float:
    return float(os.environ.get(SAVE_WAIT_TIMEOUT_ENV, SAVE_WAIT_TIMEOUT_S))


def step_dir(step: int) -> str:
    return f"step-{step:09d}"


def shard_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.bin"


@dataclass
class SaveResult:
    """How one save went. `write_s`: the background write, from its start until the checkpoint is
    committed (or failed); the retention pass and the node-local cache copy come after it."""

    step: int
    committed: bool
    stall_s: float
    write_s: float = 0.0
    bytes: int = 0
    error: str | None = None


@dataclass
class Loaded:
    """A verified checkpoint, ready to be applied: the replicated state and this rank's own objects."""

    step: int
    manifest: dict
    state: Any
    local: Any
    uri: str
    local_shards: int = 0  # shards read from the node-local cache instead of storage


class LocalCache:
    """Node-local copies of a job's newest shards: a restart on the same node reads no network.

    Object storage stays the truth: a cached shard is used only when its size and checksum match
    the committed manifest, else it is fetched again. Only the newest `keep` steps are kept.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 1):
        self.root = Path(root)
        self.keep = keep

    def path(self, step: int, name: str) -> Path:
        return self.root / step_dir(step) / name

    def put(self, step: int, name: str, reader) -> None:
        target = self.path(step, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for view in reader.views():
                f.write(view)
        os.replace(tmp, target)
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def get(self, step: int, name: str, size: int) -> bytearray | memoryview | None:
        path = self.path(step, name)
        try:
            if path.stat().st_size != size:
                return None
            blob = map_private(path)
            if blob is None:
                with open(path, "rb") as f:
                    blob = bytearray(size)
                    f.readinto(blob)
            return blob
        except OSError:
            return None


class CheckpointEngine:
    """One per rank. `save` blocks only for the snapshot; `wait` fences the write in flight.

    Lifecycle: `save(step, ...)` waits for any previous save, copies the state into reused host
    buffers and returns; a background thread writes this rank's shard, the ranks exchange shard
    records over `group` (a gloo group kept apart from training collectives), and rank 0 writes the
    manifest and applies retention. The caller may mutate the state as soon as `save` returns.
    `on_result(SaveResult)` is called from the background thread after each save, committed or not.
    """

    LAYOUTS = ("replicated", "sharded")

    def __init__(self, storage: Storage, *, rank: int, world_size: int, group=None, strategy: str = "ddp",
                 keep_last: int = 3, job_id: str = "", attempt: int = 0,
                 on_result: Callable[[SaveResult], None] | None = None, cache: LocalCache | None = None, layout: str = "replicated"):
        self.storage = storage
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.strategy = strategy
        # "replicated": every tensor is the same on all ranks and is written once (split across ranks);
        # "sharded": the state may hold shards.Piece leaves, this rank's own blocks, which it writes itself.
        if layout not in self.LAYOUTS:
            raise ValueError(f"layout must be one of {self.LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.keep_last = keep_last
        self.job_id = job_id
        self.attempt = attempt
        self.on_result = on_result
        self.pinned: set[int] = set()
        self.cache = cache
        self._snapshot = shards.Snapshot()
        self._thread: threading.Thread | None = None
        self._in_flight: int | None = None  # the step of the save whose thread is running
        self._last: SaveResult | None = None

    @property
    def snapshot_bytes(self) -> int:
        return self._snapshot.nbytes

    def save(self, step: int, state: Any, local: Any = None, meta: dict | None = None,
             first: Callable[[list[str]], Collection[str]] | None = None) -> None:
        """Snapshot `state` and `local` (this rank's own objects), then write them in the background.

        Plain tensors in `state` are replicated across ranks; with layout "sharded", `shards.Piece`
        leaves are this rank's blocks of sharded tensors. Every rank must pass a tree of the same shape.
        Rank 0 writes the plain tensors whose paths `first` picks out of them (`Strategy.rank0_paths`).
        """
        self.wait()
        t0 = time.perf_counter()
        pieces: dict[str, dict] | None = {} if self.layout == "sharded" else None
        tensors, skeleton = shards.flatten(state, pieces=pieces)
        pieces = pieces or {}
        sizes = {p: t.numel() * t.element_size() for p, t in tensors.items() if p not in pieces}
        owner = shards.assign(sizes, self.world_size, frozenset(first(list(sizes))) if first else frozenset())
        mine = {p: t for p, t in tensors.items() if p in pieces or owner[p] == self.rank}
        self._snapshot.capture(mine)
        # Small non-tensor leaves (param groups, counters) are copied now, while they are consistent.
        objects = _deepcopy_small({"skeleton": skeleton if self.rank == 0 else None, "local": local,
                                   **({"pieces": pieces} if pieces else {})})
        stall = time.perf_counter() - t0
        self._thread = threading.Thread(target=self._write, args=(step, objects, stall, dict(meta or {})),
                                        name=f"stalwart-ckpt-{step}", daemon=True)
        self._in_flight = step
        self._thread.start()

    @property
    def saved_any(self) -> bool:
        """Whether this engine has started a save (so a sweep of uncommitted steps is no longer safe)."""
        return self._thread is not None or self._last is not None

    def wait(self, timeout_s: float | None = None) -> SaveResult | None:
        """Block until the save in flight (if any) has committed or failed; return its result.

        Raises WaitTimeout after `timeout_s` (default: `save_wait_timeout_s()`, set by
        STALWART_CHECKPOINT_WAIT_TIMEOUT_S); the save is then still running and holds the snapshot,
        so no new save can start.
        """
        if self._thread is not None:
            limit = save_wait_timeout_s() if timeout_s is None else timeout_s
            self._thread.join(limit)
            if self._thread.is_alive():
                raise WaitTimeout(f"the background write of checkpoint step {self._in_flight} to "
                                  f"{self.storage.uri} (its shard, the shard exchange and the manifest)",
                                  limit, SAVE_WAIT_TIMEOUT_ENV)
            self._thread = None
        return self._last

    def _write(self, step: int, objects: Any, stall: float, meta: dict) -> None:
        # This thread must never raise into nowhere: a failed save is reported and the next one retries.
        t0 = time.perf_counter()
        key = f"{step_dir(step)}/{shard_name(self.rank, self.world_size)}"
        try:
            reader = self._stream(objects)
            size = self.storage.write(key, reader)
            record = {"file": shard_name(self.rank, self.world_size), "rank": self.rank, "size": size,
                      "checksum": reader.checksum, "index": reader.index_record}
        except StorageError as exc:
            record = {"rank": self.rank, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - any bug here must become a failed save, not a dead thread
            log.exception("checkpoint write failed")
            record = {"rank": self.rank, "error": f"{type(exc).__name__}: {exc}"}
        records = self._exchange(record)
        exchanged = all(r["rank"] != _EXCHANGE_FAILED for r in records)
        errors = [r["error"] for r in records if "error" in r]
        result = SaveResult(step, False, stall, time.perf_counter() - t0, record.get("size", 0))
        if errors:
            result.error = "; ".join(sorted(set(errors)))
            if exchanged:
                # Every rank saw the same records, so rank 0 will not commit: what this rank wrote is
                # garbage. (After a failed exchange, rank 0 may have seen a clean one and committed, so
                # the shard stays; retention or the next restore's sweep removes it if it was torn.)
                self._discard(step, [key])
        elif self.rank == 0:
            try:
                self._commit(step, records, meta)
                result.committed = True
            except StorageError as exc:
                result.error = f"manifest not written: {exc}"
                self._discard_uncommitted(step, records)
        else:
            result.committed = True  # rank 0 commits; a failed commit is reported by rank 0
        result.write_s = time.perf_counter() - t0  # until committed; retention and the cache copy follow
        if result.committed and self.rank == 0:
            try:
                self._retain(step)
            except StorageError as exc:  # the checkpoint stands; the next save's pass deletes what this one left
                log.warning("checkpoint retention failed: %s", exc)
        if self.cache is not None and "error" not in record:
            # After the commit, so the durable copy is never delayed by the local one.
            try:
                self.cache.put(step, record["file"], self._stream(objects))
            except OSError as exc:
                log.warning("local checkpoint cache not written: %s", exc)
        self._last = result
        if self.on_result is not None:
            try:
                self.on_result(result)
            except Exception:  # noqa: BLE001 - reporting must not kill the writer
                log.exception("checkpoint result callback failed")

    def _stream(self, objects: dict) -> shards.ShardReader:
        """This rank's shard as a stream; every copy (storage, the node-local cache) is the same bytes."""
        return self._snapshot.reader(objects, objects.get("pieces"))

    def _exchange(self, record: dict) -> list[dict]:
        """Every rank's shard record; when the exchange itself failed, this rank's and a record of rank
        -1 saying so (then the ranks may not all have seen the same)."""
        if self.world_size == 1 or self.group is None:
            return [record]
        gathered: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, record, group=self.group)
        except (RuntimeError, ValueError) as exc:  # a peer died or timed out (ValueError: its group was
            # destroyed meanwhile, in a rank whose process outlives the attempt): this checkpoint cannot commit
            return [record, {"rank": _EXCHANGE_FAILED, "error": f"shard exchange failed: {exc}"}]
        return gathered

    def _discard(self, step: int, keys: list[str]) -> None:
        """Delete what a save that will never commit wrote. The storage drops a step directory once
        it is empty, so whichever rank deletes last leaves nothing of the step."""
        try:
            self.storage.delete(keys)
        except StorageError as exc:  # the restore sweep or retention deletes it later
            log.warning("could not remove the uncommitted checkpoint step %d: %s", step, exc)

    def _discard_uncommitted(self, step: int, records: list[dict]) -> None:
        """Rank 0, after its manifest write failed: remove every shard, unless the manifest landed after
        all (an upload can fail on our side and still complete on the server)."""
        try:
            if self.storage.exists(f"{step_dir(step)}/{MANIFEST}"):
                return
        except StorageError:
            return  # cannot tell whether it is committed: leave it
        self._discard(step, [f"{step_dir(step)}/{r['file']}" for r in records if "file" in r])

    def _commit(self, step: int, records: list[dict], meta: dict) -> None:
        manifest = {
            "format": FORMAT_VERSION,
            "job_id": self.job_id,
            "attempt": self.attempt,
            "step": step,
            "world_size": self.world_size,
            "strategy": self.strategy,
            "layout": self.layout,
            "created_at": time.time(),
            "shards": sorted(records, key=lambda r: r["rank"]),
            **meta,
        }
        self.storage.write(f"{step_dir(step)}/{MANIFEST}", json.dumps(manifest, indent=1).encode())

    def _retain(self, just_committed: int) -> None:
        """Keep the newest `keep_last` committed checkpoints and the pinned ones; drop torn saves older
        than the step just committed.

        Why only older ones: the other ranks may already be writing their shards of the next save
        (they leave the record exchange before rank 0 gets here), and that save is of a later step,
        since a run saves its steps in increasing order. A torn save of an earlier step has no writer
        left. (Not "older than the newest committed": after a rollback this attempt saves steps below
        a committed one of an earlier attempt, and one of them may be in flight.)
        """
        steps = list_steps(self.storage)
        committed = sorted((s for s, ok in steps.items() if ok), reverse=True)
        if not committed:
            return
        keep = set(committed[: self.keep_last]) | self.pinned
        doomed = [s for s, ok in steps.items() if s not in keep and (ok or s < just_committed)]
        self._delete_steps(doomed)

    def sweep_uncommitted(self) -> list[int]:
        """Delete every step without a manifest: what failed saves of earlier attempts left. Rank 0.

        Safe only before any rank of this attempt starts a save: the restore calls it on rank 0
        before the ranks agree on the step to load, and no rank saves before that agreement, which
        needs rank 0 (earlier attempts' ranks are gone: a gang is stopped before the next starts).
        Returns the steps deleted.
        """
        if self.saved_any:
            return []  # this attempt saves already: one of these may be in flight
        doomed = [s for s, ok in list_steps(self.storage).items() if not ok]
        self._delete_steps(doomed)
        return sorted(doomed)

    def _delete_steps(self, doomed: list[int]) -> None:
        if doomed:
            keys = [k for k in self.storage.list() if _step_of(k) in doomed]
            # Manifests go first so that a crash halfway leaves torn data, never a manifest without shards.
            self.storage.delete([k for k in keys if k.endswith(MANIFEST)])
            self.storage.delete([k for k in keys if not k.endswith(MANIFEST)])


_EXCHANGE_FAILED = -1  # the rank of the record `_exchange` adds when the exchange itself failed


def _deepcopy_small(obj: Any) -> Any:
    import copy

    return copy.deepcopy(obj)


def _step_of(key: str) -> int | None:
    m = _STEP_DIR.match(key.split("/", 1)[0])
    return int(m.group(1)) if m else None


def list_steps(storage: Storage) -> dict[int, bool]:
    """Every step with anything saved, mapped to whether it is committed (has a manifest)."""
    steps: dict[int, bool] = {}
    for key in storage.list():
        step = _step_of(key)
        if step is None:
            continue
        steps[step] = steps.get(step, False) or key.endswith("/" + MANIFEST)
    return steps


def committed_steps(storage: Storage) -> list[int]:
    """Committed steps, newest first."""
    return sorted((s for s, ok in list_steps(storage).items() if ok), reverse=True)


def read_manifest(storage: Storage, step: int) -> dict:
    """The manifest of `step`; raises CheckpointCorrupt if it is unreadable or incomplete."""
    uri = f"{storage.uri}/{step_dir(step)}"
    try:
        raw = storage.read(f"{step_dir(step)}/{MANIFEST}")
    except StorageError as exc:
        raise CheckpointCorrupt(uri, f"manifest cannot be read ({exc})") from None
    return parse_manifest(raw, uri)


def parse_manifest(raw: bytes, uri: str) -> dict:
    """A manifest's bytes as read from `uri`; raises CheckpointCorrupt if they are not a complete manifest."""
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointCorrupt(uri, f"manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "shards" not in manifest:
        raise CheckpointCorrupt(uri, "manifest is incomplete or of an unknown format")
    return manifest


def load(storage: Storage, step: int, rank: int, *, verify: bool = True, threads: int = 8,
         cache: LocalCache | None = None) -> Loaded:
    """Read and verify every shard of committed checkpoint `step`; raise CheckpointCorrupt on any mismatch."""
    manifest = read_manifest(storage, step)
    uri = f"{storage.uri}/{step_dir(step)}"
    local_hits: list[str] = []

    def fetch(record: dict):
        key = f"{step_dir(step)}/{record['file']}"
        blob = cache.get(step, record["file"], record["size"]) if cache is not None else None
        if blob is not None and checksum.matches(record, blob):
            local_hits.append(record["file"])
            return record["rank"], shards.parse(blob)
        try:
            blob = storage.read_private(key)
        except StorageError as exc:
            if exc.transient:
                raise
            raise CheckpointCorrupt(uri, f"{record['file']} is missing ({exc})") from None
        if len(blob) != record["size"]:
            raise CheckpointCorrupt(uri, f"{record['file']} has {len(blob)} bytes, manifest says {record['size']}")
        if verify and not checksum.matches(record, blob):
            raise CheckpointCorrupt(uri, f"{record['file']} fails its checksum")
        index = record.get("index")
        if verify and index and not checksum.matches(index, memoryview(blob)[index["at"]:][:index["nbytes"]]):
            # The whole shard is intact but its index is not the one the manifest promised: ranged
            # restores of it would fail, so it is as unusable as a corrupt shard.
            raise CheckpointCorrupt(uri, f"{record['file']}: its index fails its checksum")
        try:
            return record["rank"], shards.parse(blob)  # tensors are views on the blob, which this load owns
        except (ValueError, KeyError, EOFError) as exc:
            raise CheckpointCorrupt(uri, f"{record['file']} cannot be parsed ({exc})") from None

    with ThreadPoolExecutor(max_workers=min(threads, len(manifest["shards"]) or 1)) as pool:
        parts = dict(pool.map(fetch, manifest["shards"]))
    tensors: dict[str, torch.Tensor] = {}
    blocks: dict[str, tuple[list, list]] = {}  # sharded tensors: path -> (shape, [(offset, block), ...])
    for _rank, (t, objects) in sorted(parts.items()):
        placed = objects.get("pieces") or {}
        for path, tensor in t.items():
            if path in placed:
                blocks.setdefault(path, (placed[path]["shape"], []))[1].append((placed[path]["offset"], tensor))
            else:
                tensors[path] = tensor
    for path, (shape, parts_of_path) in blocks.items():
        try:
            tensors[path] = shards.assemble(path, shape, parts_of_path)
        except ValueError as exc:
            raise CheckpointCorrupt(uri, f"sharded tensor cannot be reassembled: {exc}") from None
    if 0 not in parts:
        raise CheckpointCorrupt(uri, "the manifest lists no shard of rank 0")
    skeleton = parts[0][1]["skeleton"]
    own = parts.get(rank)
    local = own[1]["local"] if own is not None else None
    return Loaded(step, manifest, shards.unflatten(skeleton, tensors), local, uri, len(local_hits))


VERIFY_CHUNK = 16 << 20


def verify(storage: Storage, step: int, manifest: dict | None = None,
           on_bytes: Callable[[int], None] | None = None) -> None:
    """Check every shard of checkpoint `step` against its manifest by streaming it through its checksum
    in chunks (one reused buffer: memory stays at VERIFY_CHUNK whatever the shard's size; no tensor is
    built). Raises CheckpointCorrupt naming the first shard that is missing, has another size, or fails
    its checksum or its index's; StorageError when the storage itself fails. `on_bytes(n)` is called
    after each chunk (a progress bar)."""
    manifest = manifest if manifest is not None else read_manifest(storage, step)
    uri = f"{storage.uri}/{step_dir(step)}"
    buf = memoryview(bytearray(VERIFY_CHUNK))
    for record in manifest["shards"]:
        key, size = f"{step_dir(step)}/{record['file']}", int(record["size"])
        algorithm, digest = checksum.of_record(record)
        try:
            whole = checksum.new(algorithm)
        except ValueError as exc:
            raise CheckpointCorrupt(uri, f"{record['file']}: {exc}") from None
        index = record.get("index")
        part = checksum.new(checksum.of_record(index)[0]) if index else None
        lo, hi = (index["at"], index["at"] + index["nbytes"]) if index else (0, 0)
        if size == 0 and not storage.exists(key):
            raise CheckpointCorrupt(uri, f"{record['file']} is missing")
        for done in range(0, size, VERIFY_CHUNK):
            n = min(VERIFY_CHUNK, size - done)
            try:
                storage.read_into(key, done, buf[:n])
            except StorageError as exc:
                if exc.transient:
                    raise
                raise CheckpointCorrupt(uri, f"{record['file']} is missing or shorter than the manifest's "
                                        f"{size} bytes ({exc})") from None
            whole.update(buf[:n])
            if part is not None and done < hi and done + n > lo:
                part.update(buf[max(lo, done) - done:min(hi, done + n) - done])
            if on_bytes is not None:
                on_bytes(n)
        try:  # one byte past the end must not exist
            storage.read_into(key, size, buf[:1])
            longer = True
        except StorageError as exc:
            if exc.transient:
                raise
            longer = False
        if longer:
            raise CheckpointCorrupt(uri, f"{record['file']} is longer than the manifest's {size} bytes")
        if whole.hexdigest() != digest:
            raise CheckpointCorrupt(uri, f"{record['file']} fails its checksum")
        if part is not None and part.hexdigest() != checksum.of_record(index)[1]:
            raise CheckpointCorrupt(uri, f"{record['file']}: its index fails its checksum")


def delete_checkpoint(storage: Storage, step: int) -> int:
    """Delete one checkpoint, manifest first (so it is never committed without its shards). Returns keys deleted."""
    keys = [k for k in storage.list(step_dir(step) + "/")]
    storage.delete([k for k in keys if k.endswith(MANIFEST)])
    storage.delete([k for k in keys if not k.endswith(MANIFEST)])
    return len(keys)


def describe(storage: Storage) -> list[dict]:
    """One row per saved step, newest first: committed or not, and the manifest's headline figures."""
    rows = []
    for step, ok in sorted(list_steps(storage).items(), reverse=True):
        row = {"step": step, "uri": f"{storage.uri}/{step_dir(step)}", "committed": ok}
        if ok:
            try:
                m = read_manifest(storage, step)
                row.update(world_size=m["world_size"], strategy=m["strategy"], created_at=m["created_at"],
                           bytes=sum(s["size"] for s in m["shards"]), data=m.get("data"),
                           loss=(m.get("loss_stats") or {}).get("median"), job_id=m.get("job_id"))
            except CheckpointCorrupt as exc:
                row.update(committed=False, problem=exc.reason)
        rows.append(row)
    return rows


def resolve(uri: str, s3_options=None) -> tuple[Storage, int | None]:
    """Split a checkpoint URI into its storage root and, if it names one, the step directory."""
    base, _, last = uri.rstrip("/").rpartition("/")
    m = _STEP_DIR.match(last)
    if m:
        return open_storage(base, s3_options), int(m.group(1))
    return open_storage(uri, s3_options), None


def newest_loadable(storage: Storage, rank: int, *, max_step: int | None = None,
                    on_skip: Callable[[int, str], None] | None = None, cache: LocalCache | None = None) -> Loaded | None:
    """The newest committed checkpoint (at or below `max_step`) that verifies; skips corrupt ones."""
    for step in committed_steps(storage):
        if max_step is not None and step > max_step:
            continue
        try:
            return load(storage, step, rank, cache=cache)
        except CheckpointCorrupt as exc:
            if on_skip:
                on_skip(step, exc.reason)
    return None


__all__ = ["CheckpointEngine", "LocalCache", "SaveResult", "Loaded", "load", "newest_loadable", "committed_steps",
           "read_manifest", "list_steps", "resolve", "step_dir", "CheckpointNotFound"]
