"""Restores that read only their share of a checkpoint.

`engine.load` reads every shard and rebuilds every tensor, so N ranks read the checkpoint N times.
Here each rank reads only what it needs:

* the blocks of sharded tensors it will hold (`Share.read(blocks)`: FSDP's DTensor blocks, ZeRO's
  fragments): the byte ranges of the saved pieces that overlap them, taken from each shard's index;
* its part of everything else, which every rank needs whole (DDP's replicated state, scalars, the
  blocks a strategy asked for whole): the ranks split those bytes between them, each reads its part,
  and they exchange the parts over the checkpoint's own gloo group;
* when the world size is the one that saved, its own shard, whole, while the model is being built
  (`open_share`, from the restore read-ahead): with an unchanged layout that is all a rank needs.
  For replicated state, also every shard the node-local cache holds (a restart on the same node):
  every rank needs all of it, and local bytes are cheaper read than received.

Every range read is verified against the index's checksum of each chunk it covers (a range is widened
to whole chunks for that); a whole shard against its whole-shard checksum; each index against the
manifest. Checkpoints written before the index (no "index" in their manifest records) are read whole
(`FullShare`), as is every checkpoint when `ranged=False` (the previous code path, kept for comparison).

Lifecycle: `open_share(...)` on each rank (no collectives), the ranks agree on the step, then every
rank calls `read(blocks)` with its blocks (collective over `group` when the world is larger than one).
A `read` that finds a bad chunk raises CheckpointCorrupt on every rank, so they can all fall back together.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist

from stalwart.checkpointing import checksum, shards
from stalwart.checkpointing.engine import MANIFEST, LocalCache, Loaded, load, parse_manifest, step_dir
from stalwart.checkpointing.storage import Storage, map_private, pread_exactly
from stalwart.errors import CheckpointCorrupt, StalwartError, StorageError

# Restores read by ranges unless STALWART_RESTORE_RANGED=0, which brings back the full read of every
# shard by every rank (the code path before ranged reads: for comparison, and as a way out).
RANGED_ENV = "STALWART_RESTORE_RANGED"


def ranged_restores() -> bool:
    return os.environ.get(RANGED_ENV, "1") != "0"


# Tensors every rank needs whole are read once in all and exchanged over the group, unless
# STALWART_RESTORE_EXCHANGE=0: then every rank reads all of them itself. Sharing saves storage reads
# (object stores, shared filesystems); on a node-local disk whose files are in the page cache, reading
# is cheaper than moving the bytes through gloo (docs/BENCHMARKS.md, "Restores that read their share").
EXCHANGE_ENV = "STALWART_RESTORE_EXCHANGE"


def exchange_replicated() -> bool:
    return os.environ.get(EXCHANGE_ENV, "1") != "0"


# Ranges of one shard closer than this are read as one request (the bytes between are read and dropped):
# the padding between tensors is under 64 bytes, and a request costs more than a few KiB on any store.
MERGE_GAP = 4 << 10
# A larger range is read as parts of this size, in parallel (and retried part by part on S3).
PART_BYTES = 64 << 20
# Bytes read whole by every rank are split into segments of about this size (whole chunks) to
# balance them between the ranks, when the world that reads is not the one that wrote.
SEGMENT_BYTES = 16 << 20


@dataclass(frozen=True)
class Stored:
    """One saved tensor as one shard holds it: where its bytes are, the checksum of each chunk of
    them, and its place in the global tensor (zeros for a replicated tensor, which is all of it)."""

    file: str
    rank: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    at: int
    nbytes: int
    sums: tuple[str, ...]
    chunk: int
    algorithm: str
    offset: tuple[int, ...]

    def widen(self, lo: int, hi: int) -> tuple[int, int]:
        """Bytes [lo, hi) of this tensor widened to whole checksum chunks."""
        return lo - lo % self.chunk, min(self.nbytes, -(-hi // self.chunk) * self.chunk)


@dataclass
class TensorInfo:
    """A tensor of the checkpoint as a whole: its global shape and the pieces that hold it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    sharded: bool
    stored: list[Stored] = field(default_factory=list)  # the non-empty ones


class Share:
    """A committed checkpoint opened by one rank, read by ranges. Build with `open_share`."""

    ranged = True

    def __init__(self, reader: "_Reader", manifest: dict, manifest_bytes: int, rank: int, world_size: int,
                 tensors: dict[str, TensorInfo], skeleton: Any, local: Any, whole: dict[str, memoryview],
                 threads: int):
        self.storage, self.step, self.manifest, self.uri = reader.storage, reader.step, manifest, reader.uri
        self.rank, self.world_size = rank, world_size
        self.tensors = tensors
        self.local = local  # this rank's own objects (RNG states): only when the world size is the saved one
        self.group = None  # the checkpoint's gloo group; set by the caller before read()
        self.bytes_received = 0  # from the other ranks, over the group
        self._reader, self._manifest_bytes = reader, manifest_bytes
        self._skeleton = skeleton
        self._whole_files = whole  # file -> verified bytes of the shards open_share read whole
        self._threads = threads
        self._files = {r["file"]: r for r in manifest["shards"]}

    @property
    def bytes_read(self) -> int:
        """Bytes this rank read from storage and the node-local cache for this checkpoint, manifest included."""
        return self._manifest_bytes + self._reader.bytes_read

    @property
    def local_shards(self) -> int:
        """Shards read (in part or whole) from the node-local cache instead of storage."""
        return len(self._reader.local_files)

    @property
    def same_world(self) -> bool:
        return self.manifest["world_size"] == self.world_size

    # ---- reading --------------------------------------------------------------------------------
    def read(self, blocks: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None) -> Any:
        """The saved state tree, with each path of `blocks` (`{path: (offset, shape)}` in global
        coordinates) as a `shards.Piece` holding just that block, and every other tensor whole.

        Collective over `self.group`: every rank calls it, for the same step. Raises CheckpointCorrupt
        (every rank) when a byte range fails its checksum or a shard is missing, StorageError when
        storage failed past its retries.
        """
        blocks = {p: (tuple(int(n) for n in o), tuple(int(n) for n in s))
                  for p, (o, s) in (blocks or {}).items() if p in self.tensors}
        # A block that does not fit the saved tensor (saved with another shape, e.g. by another ZeRO
        # stage) is read whole: the strategy's own check then says what does not match.
        blocks = {p: b for p, b in blocks.items() if _fits(b, self.tensors[p].shape)}
        group = self.group if self.world_size > 1 and dist.is_initialized() else None
        exchange = group is not None and exchange_replicated()
        whole = sorted(p for p in self.tensors if p not in blocks)
        local: set[str] = set()  # shards every rank has in its node-local cache
        if exchange:
            whole, local = self._agree_whole(whole, group)
        segments = self._segments(whole)
        # What every rank holds on local disk it reads itself: cheaper than receiving it (a restart on
        # the same node), and no storage traffic either way. The rest is read once and exchanged.
        mine = [seg for seg, reader in segments if not exchange or reader == self.rank or seg[0].file in local]
        segments = [(seg, reader) for seg, reader in segments if seg[0].file not in local]
        fetch = _Fetch(self)
        pieces: dict[str, list] = {}
        try:
            for stored, lo, hi in mine:
                fetch.want(stored, lo, hi)
            for path, (offset, shape) in blocks.items():
                pieces[path] = self._overlaps(path, offset, shape)
                for stored, _, lo, hi in pieces[path]:
                    fetch.want(stored, lo, hi)
            error = fetch.run()
        except Exception as exc:  # noqa: BLE001 - the other ranks wait for this rank's word below: never hang them
            error = ("error", f"{type(exc).__name__}: {exc}")
        if group is not None:
            errors: list[Any] = [None] * self.world_size
            dist.all_gather_object(errors, error, group=group)
            error = next((e for e in errors if e is not None and e[0] == "storage"), None) or next(
                (e for e in errors if e is not None), None)
        if error is not None:
            kind, message = error
            if kind == "storage":
                raise StorageError(message, uri=self.uri, transient=True)
            if kind == "error":
                raise StalwartError(f"reading checkpoint {self.uri} failed: {message}")
            raise CheckpointCorrupt(self.uri, message)
        stored_bytes = {stored: fetch.view(stored, 0, stored.nbytes) for stored, _, _ in mine
                        if not exchange or stored.file in local}
        if exchange:
            stored_bytes.update(self._exchange(segments, fetch, group))
        tensors: dict[str, Any] = {}
        for path in whole:
            tensors[path] = self._whole(path, stored_bytes)
        for path, (offset, shape) in blocks.items():
            tensors[path] = shards.Piece(self._block(path, offset, shape, pieces[path], fetch),
                                         self.tensors[path].shape, offset)
        return shards.unflatten(self._skeleton, tensors)

    def _agree_whole(self, whole: list[str], group) -> tuple[list[str], set[str]]:
        """The paths read whole: the union over ranks (every rank must plan the same segments); and
        the shards that every rank has in its node-local cache. Ranks almost always want the same
        paths, so only a digest of them goes round unless they do not."""
        digest = hashlib.sha256("\0".join(whole).encode()).hexdigest()
        said: list[Any] = [None] * self.world_size
        dist.all_gather_object(said, (digest, sorted(self._reader.cached_files(self._files.values()))), group=group)
        local = set.intersection(*(set(files) for _, files in said))
        if len({d for d, _ in said}) == 1:
            return whole, local
        lists: list[Any] = [None] * self.world_size
        dist.all_gather_object(lists, whole, group=group)
        return sorted(set().union(*lists)), local

    def _segments(self, paths: list[str]) -> list[tuple[tuple[Stored, int, int], int]]:
        """The bytes of `paths` as (stored, lo, hi) segments, each with the rank that reads it.

        The world that wrote reads what each rank wrote (its own shard, which it read ahead); another
        world splits the bytes into segments of whole chunks and deals them out, biggest first, to the
        rank with the fewest bytes so far. Every rank computes the same answer."""
        stored = [s for p in paths for s in self.tensors[p].stored]
        if self.same_world:
            return [((s, 0, s.nbytes), s.rank) for s in stored]
        out = []
        for s in stored:
            step = max(s.chunk, SEGMENT_BYTES // s.chunk * s.chunk)
            out += [(s, lo, min(s.nbytes, lo + step)) for lo in range(0, s.nbytes, step)]
        load = [0] * self.world_size
        assigned = []
        for seg in sorted(out, key=lambda g: (-(g[2] - g[1]), g[0].file, g[0].at + g[1])):
            reader = min(range(self.world_size), key=lambda r: (load[r], r))
            load[reader] += seg[2] - seg[1]
            assigned.append((seg, reader))
        return assigned

    def _exchange(self, segments, fetch: "_Fetch", group) -> dict[Stored, memoryview]:
        """Each rank broadcasts the segments it read, in turn; all end up with every segment's bytes.
        (One padded all_gather was slower here: 0.66-1.12 s against 0.39-0.58 s for 96-144 MB a rank.)"""
        by_reader: dict[int, list[tuple[Stored, int, int]]] = {}
        for seg, reader in segments:
            by_reader.setdefault(reader, []).append(seg)
        pieces: dict[Stored, list[tuple[int, int, memoryview]]] = {}
        for reader in range(self.world_size):
            segs = by_reader.get(reader, [])
            total = sum(hi - lo for _, lo, hi in segs)
            if not total:
                continue
            buf = torch.empty(total, dtype=torch.uint8)
            view = memoryview(buf.numpy())
            if reader == self.rank:
                at = 0
                for stored, lo, hi in segs:
                    view[at:at + hi - lo] = fetch.view(stored, lo, hi)
                    at += hi - lo
            dist.broadcast(buf, src=dist.get_global_rank(group, reader), group=group)
            if reader != self.rank:
                self.bytes_received += total
            at = 0
            for stored, lo, hi in segs:
                pieces.setdefault(stored, []).append((lo, hi, view[at:at + hi - lo]))
                at += hi - lo
        out = {}
        for stored, parts in pieces.items():
            if len(parts) == 1:
                out[stored] = parts[0][2]  # one segment holds it all: use the received bytes in place
                continue
            whole = memoryview(bytearray(stored.nbytes))
            for lo, hi, v in parts:
                whole[lo:hi] = v
            out[stored] = whole
        return out

    def _whole(self, path: str, stored_bytes: dict[Stored, memoryview]) -> torch.Tensor:
        info = self.tensors[path]
        if not info.stored:  # nothing saved holds a byte of it: an empty tensor
            return torch.empty(info.shape, dtype=info.dtype)
        if not info.sharded:
            return _tensor(stored_bytes[info.stored[0]], info.dtype, info.shape)
        try:
            return shards.assemble(path, info.shape, [(list(s.offset), _tensor(stored_bytes[s], s.dtype, s.shape))
                                                      for s in info.stored])
        except ValueError as exc:
            raise CheckpointCorrupt(self.uri, f"sharded tensor cannot be reassembled: {exc}") from None

    def _overlaps(self, path: str, offset, shape) -> list[tuple[Stored, tuple, int, int]]:
        """The saved pieces that overlap the block: (stored, (lo, hi) corners in global coordinates,
        byte range [lo, hi) of the piece that holds the overlap)."""
        out = []
        for s in self.tensors[path].stored:
            lo = tuple(max(o, so) for o, so in zip(offset, s.offset))
            hi = tuple(min(o + n, so + sn) for o, n, so, sn in zip(offset, shape, s.offset, s.shape))
            if any(a >= b for a, b in zip(lo, hi)) or len(lo) != len(s.shape):
                continue
            size = torch.empty(0, dtype=s.dtype).element_size()
            first = _ravel([a - so for a, so in zip(lo, s.offset)], s.shape)
            last = _ravel([b - 1 - so for b, so in zip(hi, s.offset)], s.shape)
            out.append((s, (lo, hi), first * size, (last + 1) * size))
        return out

    def _block(self, path: str, offset, shape, overlaps, fetch: "_Fetch") -> torch.Tensor:
        info = self.tensors[path]
        if len(overlaps) == 1 and overlaps[0][0].offset == offset and overlaps[0][0].shape == shape:
            s = overlaps[0][0]
            return _tensor(fetch.view(s, 0, s.nbytes), s.dtype, s.shape)  # exactly one saved piece: no copy
        out = torch.empty(shape, dtype=info.dtype)
        covered = 0
        for s, (lo, hi), a, b in overlaps:
            # The bytes [a, b) run from the overlap's first element to its last, in the piece's
            # row-major order; the overlap is a strided view of them with the piece's strides.
            flat = _tensor(fetch.view(s, a, b), s.dtype, ((b - a) // out.element_size(),))
            part = flat.as_strided([y - x for x, y in zip(lo, hi)], _strides(s.shape))
            out[tuple(slice(x - o, y - o) for x, y, o in zip(lo, hi, offset))] = part
            covered += part.numel()
        if covered != out.numel():
            raise CheckpointCorrupt(self.uri, f"{path}: the saved pieces cover {covered} of the {out.numel()} "
                                    f"elements of the block {shape} at {offset}")
        return out


class FullShare:
    """The same interface over a checkpoint read whole by every rank: checkpoints saved before shards
    had an index, and `ranged=False`. `read` ignores the blocks and returns full tensors."""

    ranged = False

    def __init__(self, loaded: Loaded, storage: Storage, world_size: int, bytes_read: int):
        self.loaded, self.storage = loaded, storage
        self.step, self.manifest, self.uri, self.local = loaded.step, loaded.manifest, loaded.uri, loaded.local
        self.local_shards, self.world_size = loaded.local_shards, world_size
        self.group = None
        self.bytes_read, self.bytes_received = bytes_read, 0
        self.tensors = {p: TensorInfo(t.dtype, tuple(t.shape), False)
                        for p, t in shards.flatten(loaded.state)[0].items()}

    @property
    def same_world(self) -> bool:
        return self.manifest["world_size"] == self.world_size

    def read(self, blocks=None) -> Any:
        return self.loaded.state


def open_share(storage: Storage, step: int, rank: int, world_size: int, *, cache: LocalCache | None = None,
               ranged: bool = True, threads: int = 8) -> Share | FullShare:
    """Open committed checkpoint `step` for a share read by `rank` of `world_size`.

    Reads the manifest, every shard's index (verified) and rank 0's objects; when `world_size` is the
    one that saved, also this rank's own shard whole (verified by its checksum), which is all that an
    unchanged layout needs. Raises CheckpointCorrupt when any of that is missing or fails its check.
    No collectives: each rank opens on its own (the restore read-ahead does it while the model is built).
    """
    uri = f"{storage.uri}/{step_dir(step)}"
    if not ranged:
        before = storage.bytes_read
        loaded = load(storage, step, rank, cache=cache, threads=threads)
        return FullShare(loaded, storage, world_size, storage.bytes_read - before)
    try:
        raw = storage.read(f"{step_dir(step)}/{MANIFEST}")
    except StorageError as exc:
        raise CheckpointCorrupt(uri, f"manifest cannot be read ({exc})") from None
    manifest = parse_manifest(raw, uri)
    if not manifest["shards"] or not all("index" in r for r in manifest["shards"]):
        # Saved before shards had an index: the full read is the only one possible.
        before = storage.bytes_read
        loaded = load(storage, step, rank, cache=cache, threads=threads)
        return FullShare(loaded, storage, world_size, storage.bytes_read - before)
    own_record = next((r for r in manifest["shards"] if r["rank"] == rank), None)
    if manifest["world_size"] != world_size:
        own_record = None  # another layout: this rank's blocks are elsewhere; read only ranges
    reader = _Reader(storage, step, uri, cache)
    read_whole = {own_record["file"]} if own_record is not None else set()
    if own_record is not None and manifest.get("layout") == "replicated":
        read_whole.update(reader.cached_files(manifest["shards"]))

    def index_of(record: dict):
        key, ix = record["file"], record["index"]
        if key in read_whole:
            blob = reader.whole(record)
            view = memoryview(blob).cast("B")[ix["at"]:ix["at"] + ix["nbytes"]]
        else:
            view = reader.range(record, ix["at"], ix["at"] + ix["nbytes"])
            blob = None
        if not checksum.matches(ix, view):
            raise CheckpointCorrupt(uri, f"{key}: its index fails its checksum")
        try:
            return record, shards.parse_index(view), blob
        except ValueError as exc:
            raise CheckpointCorrupt(uri, f"{key}: its index cannot be parsed ({exc})") from None

    with ThreadPoolExecutor(max_workers=min(threads, len(manifest["shards"]))) as pool:
        opened = list(pool.map(index_of, manifest["shards"]))
    tensors: dict[str, TensorInfo] = {}
    objects: dict[int, Any] = {}
    whole: dict[str, memoryview] = {}
    for record, index, blob in sorted(opened, key=lambda x: x[0]["rank"]):
        for path, e in index["tensors"].items():
            try:
                dtype = getattr(torch, e["dtype"])
            except AttributeError:
                raise CheckpointCorrupt(uri, f"{record['file']}: unknown dtype {e['dtype']!r} for {path}") from None
            piece = e.get("piece")
            global_shape = tuple(piece["shape"]) if piece else tuple(e["shape"])
            info = tensors.setdefault(path, TensorInfo(dtype, global_shape, piece is not None))
            if info.sharded != (piece is not None) or info.shape != global_shape or (not piece and info.stored):
                raise CheckpointCorrupt(uri, f"{path} is saved in two incompatible ways")
            if e["nbytes"]:
                info.stored.append(Stored(record["file"], record["rank"], dtype, tuple(e["shape"]), e["at"],
                                          e["nbytes"], tuple(e["sums"]), index["chunk"], index["algorithm"],
                                          tuple(piece["offset"]) if piece else (0,) * len(e["shape"])))
        if blob is not None:
            whole[record["file"]] = memoryview(blob).cast("B")
        if record["rank"] == 0 or record is own_record:
            objects[record["rank"]] = _objects(reader, record, index, blob, uri)
    for path, info in tensors.items():
        covered = sum(math.prod(s.shape) for s in info.stored)
        if info.sharded and covered != math.prod(info.shape):
            raise CheckpointCorrupt(uri, f"sharded tensor cannot be reassembled: {path}: the pieces cover "
                                         f"{covered} of {math.prod(info.shape)} elements")
    if 0 not in objects:
        raise CheckpointCorrupt(uri, "the manifest lists no shard of rank 0")
    local = objects[rank]["local"] if own_record is not None else None
    return Share(reader, manifest, len(raw), rank, world_size, tensors, objects[0]["skeleton"], local, whole, threads)


def _objects(reader: "_Reader", record: dict, index: dict, blob, uri: str) -> Any:
    o = index["objects"]
    view = (memoryview(blob).cast("B")[o["at"]:o["at"] + o["nbytes"]] if blob is not None
            else reader.range(record, o["at"], o["at"] + o["nbytes"]))
    if blob is None and not _sum_matches(index["algorithm"], o["sum"], view):
        raise CheckpointCorrupt(uri, f"{record['file']}: its objects fail their checksum")
    try:
        return pickle.loads(view)
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError) as exc:
        raise CheckpointCorrupt(uri, f"{record['file']}: its objects cannot be read ({exc})") from None


class _Reader:
    """Byte ranges of one checkpoint's shards: from the node-local cache when it holds the shard,
    else from storage. Counts what it reads."""

    def __init__(self, storage: Storage, step: int, uri: str, cache: LocalCache | None):
        self.storage, self.step, self.uri, self.cache = storage, step, uri, cache
        self.bytes_read = 0
        self.local_files: set[str] = set()
        self._lock = threading.Lock()  # ranges are read from a pool of threads

    def _counted(self, n: int, local_file: str | None = None) -> None:
        with self._lock:
            self.bytes_read += n
            if local_file is not None:
                self.local_files.add(local_file)

    def cached_files(self, records: Iterable[dict]) -> list[str]:
        """The shards of `records` that the node-local cache holds (at the size the manifest says)."""
        return [r["file"] for r in records if self._cached(r) is not None]

    def _cached(self, record: dict):
        if self.cache is None:
            return None
        path = self.cache.path(self.step, record["file"])
        try:
            return path if path.stat().st_size == record["size"] else None
        except OSError:
            return None

    def whole(self, record: dict) -> bytearray | memoryview:
        """The whole shard, verified against its checksum."""
        key = f"{step_dir(self.step)}/{record['file']}"
        blob = self.cache.get(self.step, record["file"], record["size"]) if self.cache is not None else None
        if blob is not None and checksum.matches(record, blob):
            self._counted(len(blob), record["file"])
            return blob
        blob = _or_corrupt(lambda: self.storage.read_private(key), self.uri, record["file"])
        self._counted(len(blob))
        if len(blob) != record["size"]:
            raise CheckpointCorrupt(self.uri, f"{record['file']} has {len(blob)} bytes, manifest says {record['size']}")
        if not checksum.matches(record, blob):
            raise CheckpointCorrupt(self.uri, f"{record['file']} fails its checksum")
        return blob

    def mapped(self, record: dict, lo: int, hi: int) -> memoryview | None:
        """Bytes [lo, hi) of a shard without a copy, where it is a local file (the node-local cache, a
        file storage): a slice of a copy-on-write mapping. None where the bytes must be read."""
        self._check_range(record, hi)
        cached = self._cached(record)
        if cached is not None:
            try:
                view = map_private(cached)
            except OSError:
                view = None
            if view is not None and view.nbytes == record["size"]:
                self._counted(hi - lo, record["file"])
                return view[lo:hi]
        key = f"{step_dir(self.step)}/{record['file']}"
        view = _or_corrupt(lambda: self.storage.map_range(key, lo, hi), self.uri, record["file"])
        if view is not None:
            self._counted(hi - lo)
        return view

    def _check_range(self, record: dict, hi: int) -> None:
        if hi > record["size"]:
            raise CheckpointCorrupt(self.uri, f"{record['file']}: bytes up to {hi} asked of a "
                                              f"{record['size']}-byte shard")

    def range(self, record: dict, lo: int, hi: int, out: memoryview | None = None) -> memoryview:
        """Bytes [lo, hi) of a shard (unverified: the caller checks them)."""
        if out is None:
            out = memoryview(bytearray(hi - lo))
        self._check_range(record, hi)
        cached = self._cached(record)
        if cached is not None:
            try:
                with open(cached, "rb") as f:
                    pread_exactly(f.fileno(), lo, out)
                self._counted(hi - lo, record["file"])
                return out
            except (OSError, EOFError):
                pass  # the cache is only a cache: storage has the durable copy
        key = f"{step_dir(self.step)}/{record['file']}"
        _or_corrupt(lambda: self.storage.read_into(key, lo, out), self.uri, record["file"])
        self._counted(hi - lo)
        return out


def _or_corrupt(op, uri: str, name: str):
    """Run a storage read; a permanent failure (missing object, short object) means a corrupt checkpoint."""
    try:
        return op()
    except StorageError as exc:
        if exc.transient:
            raise
        raise CheckpointCorrupt(uri, f"{name} cannot be read ({exc})") from None


class _Fetch:
    """One batch of verified byte ranges: `want` them, `run` (reads merged ranges in parallel and
    checks every chunk), then `view` any wanted range."""

    def __init__(self, share: Share):
        self.share = share
        self._wanted: dict[str, list[tuple[int, int]]] = {}  # file -> [(lo, hi) in the shard]
        self._checks: dict[tuple[str, int], tuple[Stored, int]] = {}  # (file, chunk start) -> (stored, chunk)
        self._buffers: dict[str, list[tuple[int, memoryview]]] = {}  # file -> [(start, bytes)]

    def want(self, stored: Stored, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        lo, hi = stored.widen(lo, hi)
        if stored.file in self.share._whole_files:
            return  # read whole and verified already
        self._wanted.setdefault(stored.file, []).append((stored.at + lo, stored.at + hi))
        for k in range(lo // stored.chunk, -(-hi // stored.chunk)):
            self._checks[(stored.file, stored.at + k * stored.chunk)] = (stored, k)

    def run(self) -> tuple[str, str] | None:
        """Read and verify; None, or ("corrupt" | "storage", message) for the first failure."""
        jobs = []
        reader = self.share._reader
        try:
            for file, ranges in self._wanted.items():
                record = self.share._files[file]
                for lo, hi in _merge(ranges, MERGE_GAP):
                    buf = reader.mapped(record, lo, hi)
                    if buf is None:
                        buf = memoryview(bytearray(hi - lo))
                        jobs += [(record, a, min(hi, a + PART_BYTES), buf[a - lo:min(hi, a + PART_BYTES) - lo])
                                 for a in range(lo, hi, PART_BYTES)]
                    self._buffers.setdefault(file, []).append((lo, buf))
            if jobs:
                with ThreadPoolExecutor(max_workers=min(self.share._threads, len(jobs))) as pool:
                    list(pool.map(lambda j: reader.range(*j), jobs))
            for (file, _at), (stored, k) in self._checks.items():
                lo = k * stored.chunk
                hi = min(stored.nbytes, lo + stored.chunk)
                if not _sum_matches(stored.algorithm, stored.sums[k], self._find(file, stored.at + lo, hi - lo)):
                    return "corrupt", f"{file}: bytes {stored.at + lo}-{stored.at + hi} fail their checksum"
        except CheckpointCorrupt as exc:
            return "corrupt", exc.reason
        except StorageError as exc:
            return "storage", str(exc)
        return None

    def _find(self, file: str, at: int, n: int) -> memoryview:
        if file in self.share._whole_files:
            return self.share._whole_files[file][at:at + n]
        for start, buf in self._buffers.get(file, ()):
            if start <= at and at + n <= start + buf.nbytes:
                return buf[at - start:at - start + n]
        raise KeyError(f"{file}: bytes {at}-{at + n} were not read")  # a bug in the caller, not bad data

    def view(self, stored: Stored, lo: int, hi: int) -> memoryview:
        return self._find(stored.file, stored.at + lo, hi - lo)


def _merge(ranges: Iterable[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _sum_matches(algorithm: str, digest: str, view) -> bool:
    hasher = checksum.new(algorithm)
    hasher.update(view)
    return hasher.hexdigest() == digest


def _tensor(view: memoryview, dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor over `view`'s bytes (no copy; the view must be writable and stay alive with it)."""
    if view.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(view, dtype=torch.uint8).view(dtype).view(tuple(shape))


def _fits(block, shape) -> bool:
    offset, size = block
    if len(offset) != len(size) or len(size) != len(shape):
        return False
    return math.prod(size) == 0 or all(0 <= o and 0 <= n and o + n <= d for o, n, d in zip(offset, size, shape))


def _strides(shape) -> list[int]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return out[::-1]


def _ravel(index, shape) -> int:
    flat = 0
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat


__all__ = ["Share", "FullShare", "TensorInfo", "Stored", "open_share"]
