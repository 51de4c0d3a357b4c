"""The shard format and the host-memory snapshot that feeds it.

A shard is one object: a fixed preamble, a JSON header listing every tensor (dtype, shape, offset),
the raw tensor bytes, a pickled tail of small non-tensor objects, then the index (JSON): each tensor's
byte range in the object, its place in the global tensor when it is a `Piece`, and a checksum of
every chunk (`chunk_bytes()`, counted from the tensor's first byte) of its bytes. The manifest gives
the index's range and checksum, so a restore can read and verify just the byte ranges it needs
(`share.py`) where the whole-shard checksum would need every byte. Writing streams straight from the
snapshot buffers (no serialized copy in memory) and hashes every byte once for both checksums;
reading maps tensors onto the downloaded bytes. Readers of the full shard ignore the index.

The state of a job is a tree of dicts and lists whose leaves are tensors or small Python values.
`flatten` turns it into `{path: tensor}` plus a skeleton; `unflatten` puts it back together.

Two kinds of tensor leaves:
* a plain tensor is replicated: every rank holds the same value (DDP), so the engine writes it once,
  splitting such tensors across ranks (`assign`);
* a `Piece` is this rank's own block of a tensor sharded across ranks (FSDP, ZeRO): every rank writes
  its own pieces with their place in the global tensor, and a load puts the blocks of all ranks
  back together (`assemble`), whatever the world size that reads them.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import torch

from stalwart.checkpointing import checksum as checksums

MAGIC = b"STLWSHD1"
_PREAMBLE = struct.Struct("<8sQ")  # magic, header length
_ALIGN = 64
INDEX_VERSION = 1

# The granularity of the per-chunk checksums: a ranged read verifies whole chunks, so it reads up to
# one chunk more than it needs at each end of a range it takes from the middle of a tensor. Smaller
# chunks make the index bigger (about 40 bytes a chunk). Recorded in each index; the reader uses that.
DEFAULT_CHUNK_BYTES = 1 << 20
CHUNK_ENV = "STALWART_CHECKPOINT_CHUNK_BYTES"


def chunk_bytes() -> int:
    """The checksum chunk for new saves: `STALWART_CHECKPOINT_CHUNK_BYTES`, else 1 MiB."""
    value = int(os.environ.get(CHUNK_ENV, DEFAULT_CHUNK_BYTES))
    if value < _ALIGN or value % _ALIGN:
        # Whole multiples of the alignment keep every range a reader takes aligned for any dtype.
        raise ValueError(f"{CHUNK_ENV} must be a positive multiple of {_ALIGN} bytes, got {value}")
    return value


@dataclass(frozen=True)
class _TensorRef:
    path: str


@dataclass
class Piece:
    """This rank's block of a tensor of `shape` that is sharded across ranks.

    `local` is the block and `offset` the index of its first element in every dimension (so the
    block is `full[offset[0]:offset[0] + local.shape[0], ...]`). A rank that holds nothing of the
    tensor gives an empty `local`. The blocks of all ranks must tile the tensor without overlap.
    """

    local: torch.Tensor
    shape: tuple[int, ...]
    offset: tuple[int, ...]

    def __post_init__(self) -> None:
        self.shape = tuple(int(n) for n in self.shape)
        self.offset = tuple(int(n) for n in self.offset)
        if self.local.numel() and (len(self.offset) != len(self.shape) or self.local.dim() != len(self.shape)):
            raise ValueError(f"piece of {tuple(self.local.shape)} at {self.offset} does not fit a {self.shape} tensor")


def flatten(tree: Any, prefix: str = "", *, pieces: dict[str, dict] | None = None
            ) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a state tree into `{path: tensor}` and a skeleton with `_TensorRef` placeholders.

    A `Piece` leaf contributes its local block to the tensors; its place (`shape`, `offset`) goes
    into `pieces` (`{path: {"shape": [...], "offset": [...]}}`), which must then be given.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, Piece):
            if pieces is None:
                raise TypeError(f"{path}: a sharded Piece in a state saved as replicated")
            tensors[path] = node.local
            pieces[path] = {"shape": list(node.shape), "offset": list(node.offset)}
            return _TensorRef(path)
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return _TensorRef(path)
        if isinstance(node, dict):
            return {k: walk(v, f"{path}/{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            items = [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        return node

    return tensors, walk(tree, prefix)


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, _TensorRef):
        return tensors[skeleton.path]
    if isinstance(skeleton, dict):
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(unflatten(v, tensors) for v in skeleton)
    return skeleton


def assemble(path: str, shape: list[int] | tuple[int, ...], blocks: list[tuple[list[int], torch.Tensor]]
             ) -> torch.Tensor:
    """Put the blocks `[(offset, local), ...]` that all ranks saved of one sharded tensor back together.

    Raises ValueError when they do not cover the tensor exactly (a missing or overlapping block).
    """
    shape = tuple(int(n) for n in shape)
    blocks = [(tuple(o), t) for o, t in blocks if t.numel()]
    if not blocks:
        if math.prod(shape) == 0:
            return torch.empty(shape)
        raise ValueError(f"{path}: no rank saved any block of this {shape} tensor")
    dtype = blocks[0][1].dtype
    if len(blocks) == 1 and tuple(blocks[0][1].shape) == shape and not any(blocks[0][0]):
        return blocks[0][1]
    full = torch.empty(shape, dtype=dtype)
    covered = 0
    for offset, local in blocks:
        if local.dtype != dtype or len(offset) != len(shape) or any(
                o < 0 or o + n > s for o, n, s in zip(offset, local.shape, shape)):
            raise ValueError(f"{path}: block {tuple(local.shape)} at {offset} does not fit {shape}")
        full[tuple(slice(o, o + n) for o, n in zip(offset, local.shape))] = local
        covered += local.numel()
    if covered != full.numel():
        raise ValueError(f"{path}: blocks cover {covered} of {full.numel()} elements")
    return full


def block_of(full: torch.Tensor, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """The block of `full` of `shape` at `offset` (a view): the inverse of `assemble` for one rank."""
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def cut(saved: "torch.Tensor | Piece", offset, shape) -> torch.Tensor:
    """The block of `shape` at `offset` (global coordinates) of a loaded tensor: a full tensor, or a
    `Piece` that a share read returned (it must contain the block). A view, not a copy."""
    offset, shape = tuple(int(n) for n in offset), tuple(int(n) for n in shape)
    if isinstance(saved, Piece):
        have = tuple(saved.local.shape)
        if math.prod(shape) == 0:
            return saved.local.new_empty(shape)
        if len(offset) != len(saved.offset) or any(
                o < po or o + n > po + h for o, n, po, h in zip(offset, shape, saved.offset, have)):
            raise ValueError(f"block {shape} at {offset} is not inside the {have} piece read at {saved.offset}")
        return block_of(saved.local, tuple(o - po for o, po in zip(offset, saved.offset)), shape)
    return block_of(saved, offset, shape)


def assign(sizes: dict[str, int], world_size: int, first: frozenset[str] = frozenset()) -> dict[str, int]:
    """Split replicated tensors across ranks so that each rank writes about 1/world of the bytes.

    Deterministic (every rank computes the same answer): largest first, onto the lightest rank. The
    paths in `first` go to rank 0 whatever their size: tensors that are not quite the same on every
    rank (a model's buffers), whose rank-0 copy is the one training goes on with.
    """
    load = [0] * world_size
    owner = {}
    for path in sizes:
        if path in first:
            owner[path] = 0
            load[0] += sizes[path]
    for path in sorted((p for p in sizes if p not in owner), key=lambda p: (-sizes[p], p)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[path] = rank
        load[rank] += sizes[path]
    return owner


class Snapshot:
    """Reusable host buffers holding a consistent copy of some tensors.

    `capture(tensors)` copies into one contiguous host buffer (allocated once, reused while the
    layout is the same) and is the only part of a save that blocks the training step. The caller
    must not capture again while a previous snapshot is still being written.

    GPU tensors are copied into a pinned buffer on a side CUDA stream: `capture` waits for the
    work already queued on the current stream, queues the copies on the side stream and makes the
    current stream wait for them (so a later in-place update, e.g. the optimizer step, cannot
    overwrite a tensor before it is copied), then returns without waiting for the copies. The
    writer calls `ready()`, which waits for them, before it reads the buffer.
    """

    def __init__(self) -> None:
        self._layout: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
        self._buffer: torch.Tensor | None = None
        self._key: tuple | None = None
        self._stream = None  # the side CUDA stream, made on the first GPU capture
        self._done = None  # a CUDA event recorded after the copies

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def capture(self, tensors: dict[str, torch.Tensor]) -> None:
        key = tuple((p, t.dtype, tuple(t.shape)) for p, t in tensors.items())
        if key != self._key:
            self._allocate(tensors)
            self._key = key
        pairs = [(self._buffer[offset:offset + nbytes].view(t.dtype).view(t.shape), t.detach())
                 for (_path, _dtype, _shape, offset, nbytes), t in zip(self._layout, tensors.values())]
        cuda = [(view, t) for view, t in pairs if t.is_cuda]
        for view, t in pairs:
            if not t.is_cuda:
                view.copy_(t)
        self._done = None
        if cuda:
            self._capture_cuda(cuda)

    def _capture_cuda(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        device = pairs[0][1].device
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        main = torch.cuda.current_stream(device)
        self._stream.wait_stream(main)  # the copies see every update queued so far
        pinned = self._buffer.is_pinned()
        with torch.cuda.stream(self._stream):
            for view, t in pairs:
                view.copy_(t, non_blocking=pinned)
                t.record_stream(self._stream)  # the allocator must not reuse t's memory before the copy
        self._done = self._stream.record_event()
        main.wait_event(self._done)  # later kernels (the optimizer step) run after the copies

    def ready(self) -> None:
        """Wait until the last capture's copies have landed in the host buffer."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None

    def _allocate(self, tensors: dict[str, torch.Tensor]) -> None:
        layout, offset = [], 0
        for path, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            layout.append((path, t.dtype, tuple(t.shape), offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        pin = any(t.is_cuda for t in tensors.values())
        self._buffer = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
        self._layout = layout

    def header(self, objects: bytes) -> bytes:
        entries = [
            {"path": p, "dtype": str(d).removeprefix("torch."), "shape": list(s), "offset": o, "nbytes": n}
            for p, d, s, o, n in self._layout
        ]
        header = json.dumps({"tensors": entries, "data_bytes": self.nbytes, "objects_bytes": len(objects)}).encode()
        pad = (-(_PREAMBLE.size + len(header))) % _ALIGN
        return _PREAMBLE.pack(MAGIC, len(header) + pad) + header + b" " * pad

    def reader(self, objects: Any, pieces: dict[str, dict] | None = None) -> "ShardReader":
        """A file object streaming the shard: preamble+header, tensor bytes, pickled objects, index.

        `pieces` (`{path: {"shape", "offset"}}`, as `flatten` gives it) places the sharded tensors
        in the index."""
        self.ready()
        tail = pickle.dumps(objects, protocol=pickle.HIGHEST_PROTOCOL)
        data = memoryview(self._buffer.numpy()) if self._buffer is not None else memoryview(b"")
        header = self.header(tail)
        data_start = len(header)
        entries = [(p, str(d).removeprefix("torch."), list(s), data_start + o, n, (pieces or {}).get(p))
                   for p, d, s, o, n in self._layout]
        index = ShardIndex(entries, data_start + self.nbytes, len(tail), chunk_bytes())
        return ShardReader([memoryview(header), data, memoryview(tail)], index=index)


class ShardIndex:
    """The index a shard ends with, before its digests are known: the regions to hash, and how to
    write the JSON once they are. Digests have a fixed width, so the size is known up front (a
    stream's size must be, for an upload)."""

    def __init__(self, entries: list[tuple[str, str, list[int], int, int, dict | None]], objects_at: int,
                 objects_bytes: int, chunk: int, algorithm: str = checksums.DEFAULT):
        self.entries, self.chunk, self.algorithm = entries, chunk, algorithm
        self.objects = (objects_at, objects_bytes)
        self.regions: list[tuple[int, int]] = []  # stream byte ranges with one digest each, in order
        for _path, _dtype, _shape, at, nbytes, _piece in entries:
            self.regions += [(a, min(a + chunk, at + nbytes)) for a in range(at, at + nbytes, chunk)]
        self.regions.append((objects_at, objects_at + objects_bytes))
        width = len(checksums.new(algorithm).hexdigest())
        self.size = len(self.render(["0" * width] * len(self.regions)))

    def render(self, digests: list[str]) -> bytes:
        sums = iter(digests)
        tensors = {}
        for path, dtype, shape, at, nbytes, piece in self.entries:
            entry = {"dtype": dtype, "shape": shape, "at": at, "nbytes": nbytes,
                     "sums": [next(sums) for _ in range(-(-nbytes // self.chunk))]}
            if piece is not None:
                entry["piece"] = {"shape": list(piece["shape"]), "offset": list(piece["offset"])}
            tensors[path] = entry
        at, nbytes = self.objects
        body = {"version": INDEX_VERSION, "algorithm": self.algorithm, "chunk": self.chunk, "tensors": tensors,
                "objects": {"at": at, "nbytes": nbytes, "sum": next(sums)}}
        return json.dumps(body, separators=(",", ":")).encode()


def parse_index(blob: bytes | bytearray | memoryview) -> dict:
    """The index JSON of a shard (already checked against the manifest); ValueError if it is not one."""
    index = json.loads(bytes(blob))
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION or "tensors" not in index:
        raise ValueError("not a shard index of a known version")
    return index


class ShardReader(io.RawIOBase):
    """Reads a sequence of buffers as one seekable stream without joining them; hashes as it goes.

    Seekable, so that an S3 upload can be retried from the start without first copying the shard
    aside (a one-way stream is spooled to a temporary file). Every byte is hashed once, in order,
    however the stream is read or re-read; `checksum` is the record value for the whole stream.
    """

    _HASH_STEP = 1 << 20  # both hashers take the same 1 MiB while it is in cache

    def __init__(self, parts: list[memoryview], algorithm: str = checksums.DEFAULT, index: ShardIndex | None = None):
        self._index = index
        self._index_buf: bytearray | None = None
        if index is not None:
            # The index's bytes are written in place once the regions before it are hashed.
            self._index_buf = bytearray(index.size)
            parts = [*parts, memoryview(self._index_buf)]
        self._parts = [p.cast("B") for p in parts if p.nbytes]
        self._starts = []
        offset = 0
        for p in self._parts:
            self._starts.append(offset)
            offset += p.nbytes
        self.size = offset
        self._index_at = offset - (index.size if index is not None else 0)
        self._pos = 0
        self._hashed = 0  # bytes [0, _hashed) are in _hasher
        self._algorithm = algorithm
        self._hasher = checksums.new(algorithm)
        self._digests: list[str] = []  # of index.regions, in order, as they complete
        self._region_hasher = None
        self._index_written = index is None

    @property
    def checksum(self) -> str:
        """`algorithm:hexdigest` of the whole stream (bytes not read yet are hashed now)."""
        self._hash_to(self.size)
        return checksums.tag(self._algorithm, self._hasher)

    @property
    def index_record(self) -> dict | None:
        """Where the index is and its checksum, for the manifest (None for a stream without one)."""
        if self._index is None:
            return None
        self._hash_to(self.size)
        hasher = checksums.new(self._algorithm)
        hasher.update(self._index_buf)
        return {"at": self._index_at, "nbytes": len(self._index_buf),
                "checksum": checksums.tag(self._algorithm, hasher)}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _chunks(self, start: int, end: int):
        """Views covering stream bytes [start, end)."""
        for part, first in zip(self._parts, self._starts):
            lo, hi = max(start, first), min(end, first + part.nbytes)
            if lo < hi:
                yield part[lo - first:hi - first]

    def _hash_to(self, end: int) -> None:
        while self._hashed < end:
            if not self._index_written and self._hashed >= self._index_at:
                self._write_index()
            stop = min(end, self._hashed + self._HASH_STEP)
            if not self._index_written:
                stop = min(stop, self._index_at)  # the index's bytes exist only once the regions are hashed
            for chunk in self._chunks(self._hashed, stop):
                self._hasher.update(chunk)
            if self._index is not None:
                self._hash_regions(self._hashed, stop)
            self._hashed = stop

    def _hash_regions(self, lo: int, hi: int) -> None:
        regions = self._index.regions
        while len(self._digests) < len(regions):
            start, end = regions[len(self._digests)]
            if start >= hi:
                return
            if self._region_hasher is None:
                self._region_hasher = checksums.new(self._algorithm)
            for chunk in self._chunks(max(lo, start), min(hi, end)):
                self._region_hasher.update(chunk)
            if end > hi:
                return
            self._digests.append(self._region_hasher.hexdigest())
            self._region_hasher = None

    def _write_index(self) -> None:
        rendered = self._index.render(self._digests)
        if len(rendered) != len(self._index_buf) or len(self._digests) != len(self._index.regions):
            raise RuntimeError("shard index changed size between planning and writing")  # a bug, not bad data
        self._index_buf[:] = rendered
        self._index_written = True

    def views(self, chunk: int = 64 << 20):
        """Yield the rest of the stream as read-only views, hashing each (no copy: for writers that take
        buffers, e.g. a file's write)."""
        while self._pos < self.size:
            end = min(self.size, self._pos + chunk)
            self._hash_to(end)
            yield from self._chunks(self._pos, end)
            self._pos = end

    def readinto(self, out) -> int:
        out = memoryview(out).cast("B")
        start = min(self._pos, self.size)
        end = min(self.size, start + len(out))
        self._hash_to(end)
        written = 0
        for chunk in self._chunks(start, end):
            out[written:written + chunk.nbytes] = chunk
            written += chunk.nbytes
        self._pos = end
        return written

    def read(self, n: int = -1) -> bytes:
        # One copy (RawIOBase.read would make two: into a bytearray, then into bytes).
        start = min(self._pos, self.size)
        end = self.size if n is None or n < 0 else min(self.size, start + n)
        self._hash_to(end)
        self._pos = end
        return b"".join(self._chunks(start, end))


def parse(blob: bytes | bytearray | memoryview) -> tuple[dict[str, torch.Tensor], Any]:
    """Inverse of `Snapshot.reader`: tensors and the objects.

    The tensors are views on `blob` itself when it is writable (a bytearray, a copy-on-write
    mapping: the caller hands it over, no copy), else on a private copy of the tensor bytes.
    """
    magic, header_len = _PREAMBLE.unpack_from(blob, 0)
    if magic != MAGIC:
        raise ValueError("not a stalwart shard (bad magic)")
    start = _PREAMBLE.size
    header = json.loads(bytes(blob[start:start + header_len]))
    data_start = start + header_len
    view = memoryview(blob).cast("B")
    data = view[data_start:data_start + header["data_bytes"]]  # a view: slicing a bytearray would copy
    if view.readonly:
        data = bytearray(data)
    base = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    tensors = {}
    for e in header["tensors"]:
        dtype = getattr(torch, e["dtype"])
        raw = base[e["offset"]:e["offset"] + e["nbytes"]]
        tensors[e["path"]] = raw.view(dtype).view(e["shape"]) if e["nbytes"] else torch.empty(e["shape"], dtype=dtype)
    tail_start = data_start + header["data_bytes"]
    objects = pickle.loads(bytes(blob[tail_start:tail_start + header["objects_bytes"]]))
    return tensors, objects
