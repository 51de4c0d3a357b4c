"""Standard checkpoint formats: export stalwart's checkpoints, and read weights trained elsewhere.

`export(storage, step, fmt, out)` reads a committed checkpoint offline (`engine.load`: every shard,
sharded tensors put back together, no process group, any strategy and world size) and writes

* "dcp": a torch.distributed.checkpoint directory holding `{"model": ..., "optim": ...}`, the shape
  that `torch.distributed.checkpoint.state_dict.get_state_dict` gives and torchtitan-style code loads:
  the model's state dict by fully qualified name, and the optimizer's state dict keyed by the same
  names (`{"state": {fqn: {"exp_avg": ..., "step": ...}}, "param_groups": [{..., "params": [fqn]}]}`);
* "safetensors": the model's weights, full tensors, as `model.safetensors`, or, above
  `max_shard_bytes`, as `model-0000i-of-0000n.safetensors` files with a `model.safetensors.index.json`
  (Hugging Face's layout).

Each strategy saves its own form; `standard_state` turns each into the one above. DeepSpeed saves
flattened fp32 master weights, so the exported weights are those (fp32), shaped by the parameter
shapes its checkpoints record.

`read_weights(path)` is the other way, for `checkpoint.init_from`: a model state dict from a DCP
directory (its "model" entries, or all of its tensors when it has no "model" key, as a torchtitan
weights-only save) or from safetensors weights (a file, or a directory with one file or an index).

An export is written into a temporary folder next to `out` and moved into place when complete, so a
failed export leaves `out` as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from stalwart.checkpointing import engine
from stalwart.checkpointing.storage import Storage
from stalwart.errors import CheckpointNotFound, StalwartError

FORMATS = ("dcp", "safetensors")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DCP_METADATA = ".metadata"
# Hugging Face's default shard size for save_pretrained; safetensors files above it are split.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from `123`, `500MB`, `5GB` (powers of 1000) or `4GiB` (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise StalwartError(f"{text!r} is not a size; write bytes, or a number with KB, MB, GB (or KiB, MiB, GiB)")
    number, unit = float(m.group(1)), (m.group(2) or "b").lower()
    power = "bkmgt".index(unit[0])
    value = int(number * (1024 if "i" in unit else 1000) ** power)
    if value <= 0:
        raise StalwartError(f"{text!r}: a size must be positive")
    return value


# ---- stalwart's forms -> the standard one -------------------------------------------------------
# Module wrappers that put a name of their own into every key below them: torch.compile's, activation
# checkpointing's, FSDP1's. Exported weights go without them, as the plain model names its tensors.
WRAPPER_NAMES = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def plain_name(key: str) -> str:
    """`key` without the wrappers' parts (`_orig_mod.0.weight` -> `0.weight`)."""
    return ".".join(part for part in key.split(".") if part not in WRAPPER_NAMES)


def plain_names(keys) -> dict[str, str]:
    """`{key: plain name}` when no two keys share a plain name, else every key as it is."""
    plain = {k: plain_name(k) for k in keys}
    return plain if len(set(plain.values())) == len(plain) else {k: k for k in keys}


def standard_state(loaded: engine.Loaded, optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(model state dict `{fqn: tensor}`, optimizer state dict keyed by fqn or None) of a loaded
    checkpoint, whichever strategy wrote it; `optimizer=False`: the model's only. Raises StalwartError
    when the checkpoint lacks what the conversion needs (saved by an older stalwart that did not record it).
    The names are the plain model's, without the keys' wrapper parts (a compiled model's `_orig_mod.`)."""
    strategy = loaded.manifest.get("strategy", "ddp")
    state = loaded.state
    if strategy == "ddp":
        model, optim = dict(state["model"]), _ddp_optimizer(state, loaded.uri) if optimizer else None
    elif strategy == "fsdp":
        # get_model_state_dict / get_optimizer_state_dict already key everything by fqn; the saved
        # DTensor blocks came back whole from engine.load.
        model, optim = dict(state["model"]), state.get("optimizer") if optimizer else None
    elif strategy == "deepspeed":
        model, optim = _zero_state(state, loaded.uri, optimizer)
    else:
        raise StalwartError(f"checkpoint {loaded.uri} was written by strategy {strategy!r}, which export does not know")
    names = plain_names(list(model) + [k for k in (optim or {}).get("state", {}) if k not in model])
    model = {names[k]: v for k, v in model.items()}
    if optim is not None:
        optim = {**optim, "state": {names.get(k, k): v for k, v in optim.get("state", {}).items()},
                 "param_groups": [{**g, "params": [names.get(p, p) if isinstance(p, str) else p for p in g["params"]]}
                                  for g in optim.get("param_groups", [])]}
    return model, optim


def _ddp_optimizer(state: dict, uri: str) -> dict | None:
    optimizer = state.get("optimizer")
    if optimizer is None:
        return None
    groups = optimizer["param_groups"]
    names = state.get("param_names") or [g.get("param_names") for g in groups]
    if any(n is None for n in names):
        # Saved before stalwart recorded the names: unambiguous only when the model has no buffers
        # and the optimizer holds every parameter, in order.
        keys = list(state["model"])
        ids = [i for g in groups for i in g["params"]]
        guess = dict(zip(ids, keys)) if len(ids) == len(keys) else {}
        if not guess or any(  # every state tensor must have the shape of the parameter guessed for it
                i not in guess or (isinstance(v, torch.Tensor) and v.dim()
                                   and v.shape != state["model"][guess[i]].shape)
                for i, s in optimizer["state"].items() for v in s.values()):
            raise StalwartError(f"checkpoint {uri} does not record which parameter each optimizer entry belongs to "
                                "(saved by an older stalwart); export it with --format safetensors (the weights), "
                                "or save it again with this version")
        names = [[guess[i] for i in g["params"]] for g in groups]
    by_id = {i: n for g, group_names in zip(groups, names) for i, n in zip(g["params"], group_names)}
    if None in by_id.values():
        raise StalwartError(f"checkpoint {uri}: the optimizer holds a tensor that is not a parameter of the model, "
                            "which the standard optimizer state dict cannot name; export it with --format safetensors")
    return {"state": {by_id[i]: dict(s) for i, s in optimizer["state"].items()},
            "param_groups": [{**{k: v for k, v in g.items() if k not in ("params", "param_names")},
                              "params": [by_id[i] for i in g["params"]]} for g in groups]}


def _zero_state(state: dict, uri: str, optimizer: bool) -> tuple[dict[str, torch.Tensor], dict | None]:
    layout = state.get("layout")
    if not layout:
        raise StalwartError(f"checkpoint {uri} does not record its parameters' shapes (saved by an older "
                            "stalwart, which DeepSpeed checkpoints need for export); save it again with this version")
    shapes = {n: tuple(s) for n, s in layout["shapes"].items()}

    def full(name: str) -> torch.Tensor:
        for group in ("fp32", "frozen"):
            if name in state[group]:
                return state[group][name].reshape(shapes[name])
        return state["buffers"][name]

    model = {key: full(source) for key, source in layout["keys"].items()}
    saved = state.get("optimizer") if optimizer else None
    if saved is None:
        return model, None
    trainable = list(state["fp32"])
    per_param = {n: {**{k: _copy(v) for k, v in saved["scalars"].items()},
                     **{k: saved["state"][k][n].reshape(shapes[n]) for k in saved["state"]}} for n in trainable}
    groups = layout.get("groups") or ([trainable] if len(saved["param_groups"]) == 1 else None)
    if groups is None or len(groups) != len(saved["param_groups"]):
        raise StalwartError(f"checkpoint {uri} does not record which parameters each optimizer group holds")
    return model, {"state": per_param,
                   "param_groups": [{**g, "params": list(names)} for g, names in zip(saved["param_groups"], groups)]}


def _copy(v: Any) -> Any:
    return v.clone() if isinstance(v, torch.Tensor) else v


# ---- export ---------------------------------------------------------------------------------------
def export(storage: Storage, step: int | None, fmt: str, out: str | os.PathLike, *, force: bool = False,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Write committed checkpoint `step` (None: the newest) of `storage` to folder `out` in format `fmt`.

    Checks everything it can before reading: `fmt` is known, `out` is not a file and is empty or
    absent (with `force`, its contents are replaced). Raises StalwartError (CheckpointNotFound when
    there is no committed checkpoint, CheckpointCorrupt when one fails its checksums) and leaves
    `out` untouched. Returns a summary: step, format, files, tensors, bytes.
    """
    if fmt not in FORMATS:
        raise StalwartError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if max_shard_bytes <= 0:
        raise StalwartError("the safetensors shard size must be positive")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StalwartError(f"{out} is a file; give a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise StalwartError(f"{out} is not empty; give an empty or new folder, or pass --force to replace its contents")
    steps = engine.committed_steps(storage)
    if not steps:
        raise CheckpointNotFound(f"no committed checkpoint under {storage.uri}")
    if step is None:
        step = steps[0]
    elif step not in steps:
        raise CheckpointNotFound(f"no committed checkpoint at {storage.uri}/{engine.step_dir(step)}; committed "
                                 f"steps: {', '.join(map(str, sorted(steps)[-10:]))}")
    loaded = engine.load(storage, step, 0)
    model, optim = standard_state(loaded, optimizer=fmt == "dcp")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        if fmt == "dcp":
            files = _write_dcp(tmp, model, optim)
        else:
            files = _write_safetensors(tmp, model, max_shard_bytes,
                                       {"stalwart_step": str(step), "stalwart_source": loaded.uri})
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"step": step, "format": fmt, "source": loaded.uri, "out": str(out), "files": files,
            "tensors": len(model), "optimizer": optim is not None,
            "bytes": sum(t.numel() * t.element_size() for t in model.values())}


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export `tmp` to `out`, replacing what `out` held (checked empty or forced)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _write_dcp(folder: Path, model: dict, optim: dict | None) -> list[str]:
    import torch.distributed.checkpoint as dcp

    state: dict[str, Any] = {"model": {k: v.contiguous() for k, v in model.items()}}
    if optim is not None:
        state["optim"] = optim
    # no_dist: written by this one process, with no process group, as one rank would.
    with _single_process():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    return sorted(p.name for p in folder.iterdir())


@contextlib.contextmanager
def _single_process():
    """DCP warns that it assumes one process when no process group is up: that is what is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_safetensors(folder: Path, model: dict, max_shard_bytes: int, metadata: dict) -> list[str]:
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in model.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    meta = {"format": "pt", **metadata}  # "pt": what transformers' loaders expect
    if len(shards) == 1:
        names = [SAFETENSORS_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, keys in zip(names, shards):
        # A copy per tensor: the loaded tensors are views on one buffer per saved shard, and
        # safetensors refuses tensors that share memory. One output file's worth at a time.
        save_file({k: model[k].contiguous().clone() for k in keys}, str(folder / file), metadata=meta)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in model.values())},
                 "weight_map": {k: file for file, keys in zip(names, shards) for k in keys}}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        names.append(SAFETENSORS_INDEX)
    return names


# ---- reading weights (init_from) ------------------------------------------------------------------
def detect(path: str | os.PathLike) -> str | None:
    """"dcp", "safetensors", or None when `path` holds neither (or does not exist)."""
    p = Path(_local(path))
    if p.is_file():
        return "safetensors" if p.suffix == ".safetensors" else None
    if not p.is_dir():
        return None
    if (p / DCP_METADATA).is_file():
        return "dcp"
    if (p / SAFETENSORS_INDEX).is_file() or (p / SAFETENSORS_FILE).is_file() or len(list(p.glob("*.safetensors"))) == 1:
        return "safetensors"
    return None


def _local(path: str | os.PathLike) -> str:
    path = str(path)
    if path.startswith("file://"):
        return path[len("file://"):]
    if "://" in path:
        raise StalwartError(f"init_from {path!r}: weights are read from a local path (or file://); copy them to "
                            "the nodes (or a shared filesystem) first")
    return path


def check_weights(path: str) -> str:
    """The format of the weights at `path`; StalwartError saying what is expected when there are none."""
    fmt = detect(path)
    if fmt is None:
        raise StalwartError(f"{path} holds no weights stalwart can read: expected a torch.distributed.checkpoint "
                            f"folder (with {DCP_METADATA}), a .safetensors file, or a folder with {SAFETENSORS_FILE} "
                            f"or {SAFETENSORS_INDEX}")
    return fmt


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict `{fqn: tensor}` at `path` (a DCP folder or safetensors weights), on the CPU.

    Reads with no process group (each rank that calls it reads all of it). Raises StalwartError when
    `path` holds neither format, or a file in it cannot be read.
    """
    fmt = check_weights(str(path))
    p = Path(_local(path))
    try:
        return _read_dcp(p) if fmt == "dcp" else _read_safetensors(p)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise StalwartError(f"weights at {path} cannot be read ({type(exc).__name__}: {exc})") from None


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if p.is_file():
        return load_file(str(p))
    if (p / SAFETENSORS_INDEX).is_file():
        index = json.loads((p / SAFETENSORS_INDEX).read_text())
        out: dict[str, torch.Tensor] = {}
        for file in dict.fromkeys(index["weight_map"].values()):
            out.update(load_file(str(p / file)))
        missing = set(index["weight_map"]) - set(out)
        if missing:
            raise KeyError(f"{len(missing)} tensor(s) of the index are in no file, e.g. {sorted(missing)[0]}")
        return out
    file = p / SAFETENSORS_FILE if (p / SAFETENSORS_FILE).is_file() else next(p.glob("*.safetensors"))
    return load_file(str(file))


def _read_dcp(p: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(p))
    tensors = {k: m for k, m in reader.read_metadata().state_dict_metadata.items()
               if isinstance(m, TensorStorageMetadata)}
    # A full training state keeps the model under "model" (flattened keys "model.<fqn>"); a
    # weights-only save (torchtitan's last step) holds the model's fqns at the top.
    prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
    target = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in tensors.items()
              if k.startswith(prefix)}
    if not target:
        raise ValueError("the checkpoint holds no tensors")
    with _single_process():
        dcp.load(target, storage_reader=reader, no_dist=True)
    return {k[len(prefix):]: v for k, v in target.items()}
