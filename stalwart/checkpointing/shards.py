"""The shard format and the host-memory snapshot that feeds it.

A shard is one object: a fixed preamble, a JSON header listing every tensor (dtype, shape, offset),
the raw tensor bytes, then a pickled tail of small non-tensor objects. Writing streams straight from
the snapshot buffers (no serialized copy in memory); reading maps tensors onto the downloaded bytes.

The state of a job is a tree of dicts and lists whose leaves are tensors or small Python values.
`flatten` turns it into `{path: tensor}` plus a skeleton; `unflatten` puts it back together.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import torch

MAGIC = b"STLWSHD1"
_PREAMBLE = struct.Struct("<8sQ")  # magic, header length
_ALIGN = 64


@dataclass(frozen=True)
class _TensorRef:
    path: str


def flatten(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a state tree into `{path: tensor}` and a skeleton with `_TensorRef` placeholders."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
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


def assign(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Split replicated tensors across ranks so that each rank writes about 1/world of the bytes.

    Deterministic (every rank computes the same answer): largest first, onto the lightest rank.
    """
    load = [0] * world_size
    owner = {}
    for path in sorted(sizes, key=lambda p: (-sizes[p], p)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[path] = rank
        load[rank] += sizes[path]
    return owner


class Snapshot:
    """Reusable host buffers holding a consistent copy of some tensors.

    `capture(tensors)` copies into one contiguous host buffer (allocated once, reused while the
    layout is the same) and is the only part of a save that blocks the training step. The caller
    must not capture again while a previous snapshot is still being written.
    """

    def __init__(self) -> None:
        self._layout: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
        self._buffer: torch.Tensor | None = None
        self._key: tuple | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def capture(self, tensors: dict[str, torch.Tensor]) -> None:
        key = tuple((p, t.dtype, tuple(t.shape)) for p, t in tensors.items())
        if key != self._key:
            self._allocate(tensors)
            self._key = key
        pin = self._buffer.is_pinned()
        for (path, _dtype, _shape, offset, nbytes), t in zip(self._layout, tensors.values()):
            view = self._buffer[offset:offset + nbytes].view(t.dtype).view(t.shape)
            view.copy_(t.detach(), non_blocking=pin)
        if pin:
            torch.cuda.current_stream().synchronize()

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

    def reader(self, objects: Any) -> "ShardReader":
        """A file object streaming the shard: preamble+header, tensor bytes, pickled objects."""
        tail = pickle.dumps(objects, protocol=pickle.HIGHEST_PROTOCOL)
        data = memoryview(self._buffer.numpy()) if self._buffer is not None else memoryview(b"")
        return ShardReader([memoryview(self.header(tail)), data, memoryview(tail)])


class ShardReader(io.RawIOBase):
    """Reads a sequence of buffers as one stream without joining them; hashes as it goes."""

    def __init__(self, parts: list[memoryview]):
        self._parts = [p.cast("B") for p in parts if p.nbytes]
        self._index = 0
        self._pos = 0
        self.size = sum(p.nbytes for p in self._parts)
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, out) -> int:
        out = memoryview(out).cast("B")
        written = 0
        while written < len(out) and self._index < len(self._parts):
            part = self._parts[self._index]
            n = min(len(out) - written, part.nbytes - self._pos)
            chunk = part[self._pos:self._pos + n]
            out[written:written + n] = chunk
            self.sha256.update(chunk)
            written += n
            self._pos += n
            if self._pos == part.nbytes:
                self._index += 1
                self._pos = 0
        return written


def parse(blob: bytes | bytearray) -> tuple[dict[str, torch.Tensor], Any]:
    """Inverse of `Snapshot.reader`: tensors (views on a private copy of `blob`) and the objects."""
    magic, header_len = _PREAMBLE.unpack_from(blob, 0)
    if magic != MAGIC:
        raise ValueError("not a stalwart shard (bad magic)")
    start = _PREAMBLE.size
    header = json.loads(bytes(blob[start:start + header_len]))
    data_start = start + header_len
    data = bytearray(blob[data_start:data_start + header["data_bytes"]]) if not isinstance(blob, bytearray) else \
        blob[data_start:data_start + header["data_bytes"]]
    base = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    tensors = {}
    for e in header["tensors"]:
        dtype = getattr(torch, e["dtype"])
        raw = base[e["offset"]:e["offset"] + e["nbytes"]]
        tensors[e["path"]] = raw.view(dtype).view(e["shape"]) if e["nbytes"] else torch.empty(e["shape"], dtype=dtype)
    tail_start = data_start + header["data_bytes"]
    objects = pickle.loads(bytes(blob[tail_start:tail_start + header["objects_bytes"]]))
    return tensors, objects
