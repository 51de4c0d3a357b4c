"""Strategies: how `ctx.prepare` wraps a model, and what of it a checkpoint holds.

One small class per `strategy.name`:

* `wrap(model, optimizer, ctx) -> (model, optimizer)`: move to the rank's device and wrap;
* `state() -> tree`: what to checkpoint (model and optimizer; the LR scheduler is the context's);
* `restore(share) -> tree`: read this rank's share of an opened checkpoint (`checkpointing.share`:
  the blocks of sharded tensors this rank holds, everything else whole) and apply it;
* `load(tree)`: apply a tree read whole (full tensors, whatever world size wrote them); `restore`
  applies its tree the same way, sharded tensors being `shards.Piece` blocks there;
* `load_weights(state_dict)`: set the model's weights from a plain model state dict of full tensors
  (`checkpoint.init_from`: weights trained elsewhere); the optimizer is left fresh;
* `replicated`: True when every rank holds the same tensors (DDP: the engine splits the writing
  across ranks, and the ranks split the reading), False when each rank holds its own shards (FSDP,
  ZeRO: the tree holds `shards.Piece` leaves, each rank writes its own and reads what it needs).

DDP      torch DistributedDataParallel; `options` go to its constructor.
FSDP     PyTorch FSDP2 (`fully_shard`) on each block and on the root, over a 1-D device mesh.
         Checkpoints are the sharded state dicts of torch.distributed.checkpoint.state_dict
         (DTensors): each rank saves its local shards with their offsets, never gathering; a restore
         reads the saved pieces that overlap this rank's blocks and hands DTensors to set_state_dict,
         so a checkpoint written by N ranks loads on M.
DeepSpeed ZeRO stage 1, 2 or 3 through deepspeed.initialize, the DeepSpeed config being
         `strategy.options`. Checkpoints go through stalwart's engine, not DeepSpeed's writer: each
         rank saves, per parameter, its fragment of the fp32 master weights and of every optimizer
         state tensor, with the fragment's place in the flattened parameter. That layout does not
         depend on the world size or the stage, so a checkpoint resumes on another world size
         (and another ZeRO stage). A restore reads each rank's fragments; the model's copy of the
         parameters is then cast from them and all-gathered, as DeepSpeed's step does.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable

import torch
import torch.distributed as dist

from stalwart.checkpointing.shards import Piece, cut, flatten
from stalwart.errors import StalwartError

log = logging.getLogger(__name__)

NAMES = ("ddp", "fsdp", "deepspeed")
DTYPES = ("float32", "bfloat16", "float16")


def deepspeed_missing() -> str | None:
    """None when DeepSpeed can be imported, else why not (for the spec's error message)."""
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the strategy cannot run
        return f"{type(exc).__name__}: {exc}"
    return None


class Strategy:
    name = ""
    replicated = True

    def __init__(self, options: dict | None = None):
        self.options = dict(options or {})
        self.model: torch.nn.Module | None = None  # the unwrapped module whose state is saved
        self.optimizer: Any = None
        self.extras: dict[str, Any] = {}  # the job's kept objects (the context's), by name

    def extra_targets(self) -> dict[str, Any]:
        """Each kept object's state now: where a restore puts what it reads."""
        return {name: obj.state_dict() for name, obj in self.extras.items()}

    @property
    def layout(self) -> str:
        """The checkpoint engine's layout for this strategy's state."""
        return "replicated" if self.replicated else "sharded"

    def wrap(self, model: torch.nn.Module, optimizer: Any, ctx) -> tuple[Any, Any]:
        raise NotImplementedError

    def adopt(self, model: Any, optimizer: Any) -> None:
        """Register a model the user's own code already wrapped (script mode)."""
        raise NotImplementedError

    def join(self, ctx) -> None:
        """A spare on standby has been made a rank (its groups are formed): finish what `wrap` left for
        then. Nothing for most strategies."""

    def rejoined(self, ctx) -> None:
        """This rank stayed in its loop and has formed the next attempt's groups: put back what a
        library keeps of the groups module-wide. Nothing for most strategies."""

    def state(self) -> dict:
        raise NotImplementedError

    def rank0_paths(self, paths: Iterable[str]) -> frozenset[str]:
        """Of `paths` (the plain tensors of `state()` that a save splits across ranks, as `flatten` names
        them), those that are not the same on every rank, so that rank 0's copy is the one saved: the
        model's buffers (BatchNorm's running statistics: DDP hands every rank rank 0's before each
        forward; FSDP and ZeRO leave each rank its own). Written by any other rank, a restore would give
        the job values its training never had. DDP: the buffers under every name `state_dict()` gives
        them (a shared module's too)."""
        if self.model is None:
            return frozenset()
        names = {f"/model/{name}" for name, _ in self.model.named_buffers(remove_duplicate=False)}
        return frozenset(p for p in paths if p in names)

    def load(self, state: dict) -> None:
        raise NotImplementedError

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the model's parameters and persistent buffers from `weights` (`{fqn: full tensor}`, any
        dtype, on the CPU). Every key must match; raises StalwartError naming what does not."""
        raise NotImplementedError

    def extra_state(self, name: str, state: Any) -> Any:
        """A kept object's state (`ctx.prepare(extra=...)`, `ctx.keep`) in the form a save takes. Plain
        tensors (rank 0's are saved); a sharded DTensor is refused here, naming what to do."""
        tensors, _ = flatten(state)
        if any(_is_dtensor(t) for t in tensors.values()):
            raise StalwartError(f"extra {name!r}: its state holds sharded DTensors, which only an FSDP job saves "
                                "as such; keep that state as plain tensors (every rank alike)")
        return state

    def load_extra(self, obj: Any, saved: Any, name: str) -> None:
        """Load a kept object's saved state (`extra_state`'s form, read back) into it."""
        obj.load_state_dict(saved)

    def restore(self, share) -> dict:
        """Read this rank's share of `share` (an opened checkpoint) and apply it; return the tree read.

        Collective: every rank calls it. This default reads every tensor whole, the ranks splitting the
        reading between them (replicated state). Raises CheckpointCorrupt on every rank when what it
        reads fails its checks; nothing is applied then.
        """
        state = share.read({})
        self.load(state)
        return state


def make(name: str, options: dict | None = None) -> Strategy:
    try:
        cls = {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}[name]
    except KeyError:
        raise StalwartError(f"unknown strategy {name!r}; expected one of {', '.join(NAMES)}") from None
    return cls(options)


def adopt(model: Any, optimizer: Any) -> Strategy:
    """The strategy of a model that the user's code wrapped itself, registered for checkpoints."""
    if type(model).__name__ == "DeepSpeedEngine":
        strategy: Strategy = DeepSpeedStrategy()
    elif any(_is_dtensor(p) for p in model.parameters()):
        strategy = FSDPStrategy()
    else:
        strategy = DDPStrategy()
    strategy.adopt(model, optimizer)
    return strategy


# ---- DDP ----------------------------------------------------------------------------------------
class DDPStrategy(Strategy):
    name = "ddp"
    replicated = True

    def wrap(self, model, optimizer, ctx):
        model = model.to(ctx.device)  # in place: the optimizer's parameters stay the same objects
        self.model, self.optimizer = model, optimizer
        train = getattr(ctx, "_train", None)
        if ctx.world_size > 1 and train is not None:
            # Gradients averaged by stalwart's hook: a peer's death does not raise through the loop.
            from stalwart.launchers.rejoin import skip_failed_steps, wrap_ddp

            model = wrap_ddp(model, train, self.options, sync=not (ctx._plan.live_ranks or ctx._standby))
            if optimizer is not None:
                skip_failed_steps(optimizer, train)
        elif ctx.world_size > 1 and dist.is_initialized():
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **self.options)
        return model, optimizer

    def adopt(self, model, optimizer):
        self.model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        self.optimizer = optimizer

    def state(self) -> dict:
        out = {"model": self.model.state_dict(),
               "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}
        if self.optimizer is not None:
            # The optimizer's state dict numbers its parameters; their names make it exportable
            # (checkpointing.formats). A walk over the parameters: nothing next to the save's copy.
            names = {id(p): n for n, p in self.model.named_parameters()}
            out["param_names"] = [[names.get(id(p)) for p in g["params"]] for g in self.optimizer.param_groups]
        return out

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def load_weights(self, weights):
        weights = _named_like(weights, self.model.state_dict())
        _check_keys(weights, self.model.state_dict())
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as exc:  # a shape that differs; torch's message spans lines
            raise StalwartError(f"the weights do not fit the model: {' '.join(str(exc).split())}") from None


# ---- FSDP2 --------------------------------------------------------------------------------------
class FSDPStrategy(Strategy):
    name = "fsdp"
    replicated = False
    _deferred = False  # a standby spare's model, left whole until `join`

    def wrap(self, model, optimizer, ctx):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if getattr(ctx, "_standby", False):
            # A spare on standby has no world yet, and torch builds a device mesh only in a process that
            # has one. fully_shard works in place (the module object stays, the optimizer's parameters
            # are repointed in place), so the model is sharded when the spare is made a rank (`join`),
            # and what the user's code holds now becomes the sharded model then.
            model = model.to(ctx.device)
            self.model, self.optimizer, self._deferred = model, optimizer, True
            return model, optimizer
        if not dist.is_initialized():
            raise StalwartError("strategy fsdp needs torch.distributed initialized before ctx.prepare()")
        if optimizer is not None and optimizer.state:
            raise StalwartError("strategy fsdp: call ctx.prepare(model, optimizer) before the first optimizer step")
        model = model.to(ctx.device)
        names = {id(p): n for n, p in model.named_parameters()}
        train = getattr(ctx, "_train", None)
        if train is not None and ctx.world_size > 1:
            # Sharded over stalwart's group, whose collectives never raise through the loop
            # (launchers.rejoin.ShardGroup): the ranks that outlive a dead peer stay in it.
            from torch.distributed.device_mesh import DeviceMesh

            from stalwart.launchers.rejoin import skip_failed_steps

            mesh = DeviceMesh.from_group(train, ctx.device.type)
            if optimizer is not None:
                skip_failed_steps(optimizer, train)
        else:
            mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": bool(self.options.get("reshard_after_forward", True))}
        mp = self.options.get("mixed_precision")
        if mp:
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=_dtype(mp.get("param_dtype")), reduce_dtype=_dtype(mp.get("reduce_dtype")),
                output_dtype=_dtype(mp.get("output_dtype")))
        units = self._units(model)  # parents before their children (model.modules() order)
        if self.options.get("activation_checkpointing"):
            from torch.distributed._composable import checkpoint  # keeps parameter names unchanged

            inner = {id(m) for u in units for m in u.modules() if m is not u}
            for unit in units:
                if id(unit) not in inner:  # the outermost units only: no recomputation inside a recomputation
                    checkpoint(unit)
        for unit in reversed(units):  # children first: a parent's group must not take their parameters
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        if optimizer is not None:
            # fully_shard replaces every parameter with a sharded DTensor parameter: point the
            # optimizer (and so any LR scheduler built on it) at the new ones, by name.
            sharded = dict(model.named_parameters())
            for group in optimizer.param_groups:
                group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        self.model, self.optimizer = model, optimizer
        return model, optimizer

    def join(self, ctx) -> None:
        if self._deferred:
            self._deferred = False
            self.wrap(self.model, self.optimizer, ctx)

    def _units(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The modules sharded on their own: those named in shard_modules, else every ModuleList's items."""
        wanted = self.options.get("shard_modules")
        if wanted:
            units = [m for m in model.modules() if m is not model and type(m).__name__ in set(wanted)]
            if not units:
                raise StalwartError(f"strategy fsdp: no module of class {', '.join(wanted)} in the model "
                                    "(strategy.options.shard_modules)")
            return units
        return [child for m in model.modules() if isinstance(m, torch.nn.ModuleList) for child in m]

    def adopt(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def rank0_paths(self, paths: Iterable[str]) -> frozenset[str]:
        # The model's plain tensors are its buffers (its parameters are sharded pieces), under the names
        # get_model_state_dict gives them, without the prefixes of wrappers (activation checkpointing,
        # torch.compile) that named_buffers() keeps.
        return frozenset(p for p in paths if p.startswith("/model/"))

    def state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        out = {"model": _dtensors_to_pieces(get_model_state_dict(self.model)), "optimizer": None}
        # An optimizer that has not stepped yet has no state to save (and asking torch for its state
        # dict would initialize it with a step, changing the run).
        if self.optimizer is not None and self.optimizer.state:
            out["optimizer"] = _dtensors_to_pieces(get_optimizer_state_dict(self.model, self.optimizer))
        return out

    def load(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        self._apply(state, get_model_state_dict(self.model), None)

    def load_weights(self, weights):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        target = get_model_state_dict(self.model)
        weights = _named_like(weights, target)
        _check_keys(weights, target)
        self._apply({"model": weights, "optimizer": None}, target, None)

    def extra_state(self, name: str, state: Any) -> Any:
        return _dtensors_to_pieces(state)  # sharded like the model: each rank saves its share

    def load_extra(self, obj: Any, saved: Any, name: str) -> None:
        obj.load_state_dict(_reshard_like(saved, obj.state_dict(), f"extra {name}"))

    def restore(self, share) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model_target, optim_target = get_model_state_dict(self.model), None
        blocks = _dtensor_blocks(model_target, "/model")
        for name, target in self.extra_targets().items():  # read as this rank's blocks, like the model
            blocks.update(_dtensor_blocks(target, f"/extra/{name}"))
        if self.optimizer is not None and any(p.startswith("/optimizer/") for p in share.tensors):
            optim_target = get_optimizer_state_dict(self.model, self.optimizer)  # initializes the state to fill
            blocks.update(_dtensor_blocks(optim_target, "/optimizer"))
        state = share.read(blocks)
        self._apply(state, model_target, optim_target)
        return state

    def _apply(self, state: dict, model_target: dict, optim_target: dict | None) -> None:
        from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        set_model_state_dict(self.model, _reshard_like(state["model"], model_target, "model"))
        if self.optimizer is not None and state.get("optimizer") is not None:
            if optim_target is None:
                optim_target = get_optimizer_state_dict(self.model, self.optimizer)  # initializes the state to fill
            set_optimizer_state_dict(self.model, self.optimizer,
                                     _reshard_like(state["optimizer"], optim_target, "optimizer"))


def _named_like(weights: dict, target) -> dict:
    """`weights` under the target's names when they name the same tensors without its wrapper parts
    (weights exported from a plain model, loaded into a compiled one, or the other way round)."""
    from stalwart.checkpointing.formats import plain_names

    if set(weights) == set(target):
        return weights
    mine, theirs = plain_names(list(weights)), plain_names(list(target))
    by_plain = {plain: key for key, plain in theirs.items()}
    if set(mine.values()) != set(by_plain):
        return weights  # they differ by more than that: _check_keys says how
    return {by_plain[mine[k]]: v for k, v in weights.items()}


def _check_keys(weights: dict, target: dict) -> None:
    missing, unexpected = sorted(set(target) - set(weights)), sorted(set(weights) - set(target))
    if missing or unexpected:
        raise StalwartError("the weights do not fit the model: " + "; ".join(
            f"{what} {len(keys)} key(s): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _dtensor_block(t) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's block of DTensor `t`."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(shape), tuple(offset)


def _dtensors_to_pieces(tree: Any) -> Any:
    if _is_dtensor(tree):
        local = tree.to_local()
        shape, offset = _dtensor_block(tree)
        if tuple(local.shape) != shape:
            raise StalwartError(f"a DTensor's local block is {tuple(local.shape)}, its placement says {shape}")
        return Piece(local, tuple(tree.shape), offset)
    if isinstance(tree, dict):
        return {k: _dtensors_to_pieces(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [_dtensors_to_pieces(v) for v in tree]
        return items if isinstance(tree, list) else tuple(items)
    return tree


def _dtensor_blocks(target: Any, prefix: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """`{path: (offset, shape)}` of this rank's block of every DTensor in `target`, by the paths
    under which `shards.flatten` finds the saved tensors (the saved tree has the target's shape)."""
    tensors, _ = flatten(target, prefix)
    out = {}
    for path, t in tensors.items():
        if _is_dtensor(t):
            shape, offset = _dtensor_block(t)
            out[path] = (offset, shape)
    return out


def _reshard_like(saved: Any, target: Any, path: str) -> Any:
    """`saved` (full tensors, or `Piece` blocks a share read returned) laid out like `target`: a
    DTensor there gets this rank's block of the saved tensor."""
    if _is_dtensor(target):
        from torch.distributed.tensor import DTensor

        if not isinstance(saved, (torch.Tensor, Piece)) or tuple(saved.shape) != tuple(target.shape):
            got = tuple(saved.shape) if isinstance(saved, (torch.Tensor, Piece)) else type(saved).__name__
            raise StalwartError(f"checkpoint {path} is {got}, the model expects {tuple(target.shape)}")
        shape, offset = _dtensor_block(target)
        local = cut(saved, offset, shape).to(device=target.to_local().device, dtype=target.dtype).clone()
        return DTensor.from_local(local, target.device_mesh, target.placements, run_check=False,
                                  shape=target.shape, stride=target.stride())
    if isinstance(saved, dict):
        return {k: _reshard_like(v, target.get(k) if isinstance(target, dict) else None, f"{path}.{k}")
                for k, v in saved.items()}
    if isinstance(saved, (list, tuple)):
        items = [_reshard_like(v, target[i] if isinstance(target, (list, tuple)) and i < len(target) else None,
                               f"{path}.{i}") for i, v in enumerate(saved)]
        return items if isinstance(saved, list) else tuple(items)
    if isinstance(saved, torch.Tensor) and isinstance(target, torch.Tensor):
        return saved.to(device=target.device).clone()
    return saved


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise StalwartError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


# ---- DeepSpeed ----------------------------------------------------------------------------------
_ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def deepspeed_config(options: dict) -> dict:
    """The DeepSpeed config stalwart hands to deepspeed.initialize: `options`, plus defaults.

    Defaults: ZeRO stage 2 when no zero_optimization is given; one micro-batch per step
    (train_micro_batch_size_per_gpu 1, gradient_accumulation_steps 1) when no batch size is given,
    since the batches come from the user's loop, not from DeepSpeed's data loader; quiet logging.
    """
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in options.items()}
    config.setdefault("zero_optimization", {"stage": 2})
    config["zero_optimization"].setdefault("stage", 2)
    if not any(k in config for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        config["train_micro_batch_size_per_gpu"] = 1
        config.setdefault("gradient_accumulation_steps", 1)
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("steps_per_print", 2**31 - 1)
    return config


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    replicated = False

    def __init__(self, options: dict | None = None):
        super().__init__(options)
        self.engine: Any = None
        self._topology: Any = None  # rejoin.DeepSpeedTopology, in a job whose ranks stay in their loop
        self.stage = 0
        self._layout: dict | None = None

    def wrap(self, model, optimizer, ctx):
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        if ds_logger.level < logging.WARNING:
            ds_logger.setLevel(logging.WARNING)
        if ctx.device.type == "cpu":
            _skip_cpu_shm_op()
        model = model.to(ctx.device)
        train = getattr(ctx, "_train", None)
        in_loop = train is not None and ctx.world_size > 1
        extra, joining = {}, False
        if in_loop:
            # ZeRO over stalwart's group, whose collectives never raise through the loop
            # (launchers.rejoin.ShardGroup), given to DeepSpeed as its data-parallel group: the ranks that
            # outlive a dead peer stay in their loop. A rank joining running peers builds its engine with
            # the group detached (the broadcast of rank 0's parameters is not matched by peers in their
            # loop; the restore that follows sets every parameter and the optimizer's state).
            from deepspeed.moe.layer import MoE

            from stalwart.launchers.rejoin import DeepSpeedTopology

            if any(isinstance(m, MoE) for m in model.modules()):
                raise StalwartError("checkpoint.memory_in_loop does not work with DeepSpeed MoE layers (DeepSpeed "
                                    "makes expert groups of its own, which a rank joining peers in their loop "
                                    "cannot form alone): remove memory_in_loop")
            standby = ctx._standby
            if standby:
                # A spare on standby: the model and optimizer are built; wait here to be made a rank
                # (the engine needs the attempt's groups), then build it as a rank joining peers.
                ctx._join()
            self._topology = DeepSpeedTopology(train, ctx.rank)
            extra = {"mpu": self._topology}
            joining = bool(ctx._plan.live_ranks)  # peers in their loop, who built their engines long ago
        with train.detached() if joining else contextlib.nullcontext():
            engine, ds_optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=deepspeed_config(self.options), dist_init_required=False,
                **extra)
        self._bind(engine, ds_optimizer)
        base = getattr(ds_optimizer, "optimizer", None)
        if in_loop and base is not None:
            # A failed step's update of the flat fp32 partitions is skipped; DeepSpeed's own bookkeeping of
            # the step (its gradient buffers emptied, its counters) goes on, and the restore resets it.
            from stalwart.launchers.rejoin import skip_failed_steps

            skip_failed_steps(base, train)
        return engine, ds_optimizer

    def rejoined(self, ctx) -> None:
        if self._topology is not None:
            self._topology.enlist()

    def adopt(self, model, optimizer):
        self._bind(model, optimizer if optimizer is not None else model.optimizer)

    def _bind(self, engine, ds_optimizer) -> None:
        self.engine, self.optimizer, self.model = engine, ds_optimizer, engine.module
        self.stage = int(engine.zero_optimization_stage())
        if self.stage not in (1, 2, 3):
            raise StalwartError(f"strategy deepspeed checkpoints ZeRO stages 1, 2 and 3; this engine runs stage "
                                f"{self.stage} (set strategy.options.zero_optimization.stage, or use ddp)")

    # The base optimizer (the user's torch optimizer) steps on flat fp32 partitions.
    @property
    def _base(self):
        return self.optimizer.optimizer

    def _params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.model.named_parameters())

    def _fragment(self, p, key: str | None) -> tuple[torch.Tensor, int, int]:
        """This rank's fragment of parameter `p` (fp32 master weight, or optimizer state `key`),
        as (1-D tensor, start in the flattened parameter, numel of the parameter)."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            part = p.ds_tensor.ds_numel
            start = part * dist.get_rank(group=getattr(p, "ds_process_group", None))
            valid = max(0, min(part, p.ds_numel - start))
            flat = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
            return flat.reshape(-1)[:valid], start, p.ds_numel
        hp = getattr(p, "_hp_mapping", None)
        if hp is None:  # no part of this parameter lives on this rank
            return torch.empty(0, dtype=torch.float32, device=p.device), 0, p.numel()
        return hp.get_hp_fragment(key).reshape(-1), hp.lp_fragment_address.start, p.numel()

    def _state_keys(self) -> tuple[list[str], list[str]]:
        """Optimizer state keys: (per-element tensors, like exp_avg; scalars, like step)."""
        for flat_state in self._base.state.values():
            tensors = sorted(k for k, v in flat_state.items() if torch.is_tensor(v) and v.dim() > 0)
            scalars = sorted(k for k, v in flat_state.items() if not (torch.is_tensor(v) and v.dim() > 0))
            return tensors, scalars
        return [], []

    def rank0_paths(self, paths: Iterable[str]) -> frozenset[str]:
        return frozenset(p for p in paths if p.startswith("/buffers/"))  # see state()

    def state(self) -> dict:
        params = self._params()
        trainable = [(n, p) for n, p in params if p.requires_grad]
        out: dict[str, Any] = {
            "zero_stage": self.stage,
            "fp32": {n: self._piece(p, None) for n, p in trainable},
            "frozen": {n: self._frozen(p) for n, p in params if not p.requires_grad},
            "buffers": {n: b.detach() for n, b in self.model.named_buffers()},
            "engine": {k: getattr(self.engine, k) for k in _ENGINE_COUNTERS if hasattr(self.engine, k)},
            "loss_scaler": _scalars_of(getattr(self.optimizer, "loss_scaler", None)),
            "optimizer": None,
            "layout": self._model_layout(),
        }
        keys, scalar_keys = self._state_keys()
        if keys or scalar_keys:  # nothing to save before the first step
            first = next(iter(self._base.state.values()))
            out["optimizer"] = {
                "state": {key: {n: self._piece(p, key) for n, p in trainable} for key in keys},
                "scalars": {k: first[k] for k in scalar_keys},
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self._base.param_groups],
            }
        return out

    def _model_layout(self) -> dict:
        """What turns the saved fragments back into the model's state dict (checkpointing.formats):
        each parameter's shape, each state-dict key's source (a tied parameter's key names the first
        one), and the parameters of each optimizer group. Plain values, computed once."""
        if self._layout is None:
            canonical: dict[int, str] = {}
            keys: dict[str, str] = {}
            for prefix, module in self.model.named_modules(remove_duplicate=False):
                prefix = f"{prefix}." if prefix else ""
                for n, t in module._parameters.items():
                    if t is not None:
                        keys[prefix + n] = canonical.setdefault(id(t), prefix + n)
                for n, t in module._buffers.items():
                    if t is not None and n not in module._non_persistent_buffers_set:
                        keys[prefix + n] = canonical.setdefault(id(t), prefix + n)
            shapes = {n: list(getattr(p, "ds_shape", None) or p.shape) for n, p in self._params()}
            self._layout = {"shapes": shapes, "keys": keys, "groups": self._group_names()}
        return self._layout

    def _group_names(self) -> list[list[str]] | None:
        """The trainable parameters of each base optimizer group, by name (None if DeepSpeed hides them)."""
        names = {id(p): n for n, p in self._params()}
        if self.stage == 3:
            sub_groups = getattr(self.optimizer, "fp16_groups", None)
            to_group = getattr(self.optimizer, "sub_group_to_group_id", None)
            if sub_groups is None or to_group is None:
                return None
            groups: list[list[str]] = [[] for _ in self._base.param_groups]
            for i, sub in enumerate(sub_groups):
                groups[to_group[i]] += [names[id(p)] for p in sub]
            return groups
        bit16 = getattr(self.optimizer, "bit16_groups", None)
        return None if bit16 is None else [[names[id(p)] for p in g] for g in bit16]

    def load_weights(self, weights):
        # The saved form with full tensors and no optimizer state: `load` sets each rank's fragment of
        # the fp32 master weights and the model's copy, as a restore does.
        params = dict(self._params())
        keys = self._model_layout()["keys"]  # the model's state-dict keys: a tied parameter under each name
        buffers = {n for n, _ in self.model.named_buffers() if n in keys}
        weights = _named_like(weights, keys)
        _check_keys(weights, keys)
        trainable = {n for n, p in params.items() if p.requires_grad}
        for n, p in params.items():
            shape = tuple(getattr(p, "ds_shape", None) or p.shape)
            if tuple(weights[n].shape) != shape:
                raise StalwartError(f"the weights do not fit the model: {n} is {tuple(weights[n].shape)}, "
                                    f"the model expects {shape}")
        frozen = {n: weights[n].reshape(-1) if self.stage == 3 else weights[n] for n in params if n not in trainable}
        self.load({"fp32": {n: weights[n].reshape(-1) for n in trainable}, "frozen": frozen,
                   "buffers": {n: weights[n] for n in buffers}, "optimizer": None})

    def _piece(self, p, key: str | None) -> Piece:
        local, start, numel = self._fragment(p, key)
        return Piece(local, (numel,), (start,))

    def _frozen(self, p) -> Any:
        if self.stage != 3:
            return p.detach()  # replicated in stages 1 and 2
        part = p.ds_tensor.ds_numel
        start = part * dist.get_rank(group=getattr(p, "ds_process_group", None))
        valid = max(0, min(part, p.ds_numel - start))
        return Piece(p.ds_tensor.detach().reshape(-1)[:valid], (p.ds_numel,), (start,))

    def restore(self, share) -> dict:
        # This rank's fragment of each trainable parameter's fp32 weight and optimizer states; in ZeRO-3
        # its partition of the frozen ones too. Whole: what every rank holds in full (frozen parameters
        # in stages 1 and 2, ZeRO-3's persistent parameters, buffers, scalars).
        fragment: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for name, p in self._params():
            if self.stage == 3:
                _, start, valid = _partition(p)
                if p.data.numel() != p.ds_numel:  # a persistent parameter's full value is on every rank
                    fragment[name] = ((start,), (valid,))
            elif p.requires_grad:
                hp = getattr(p, "_hp_mapping", None)
                address = hp.lp_fragment_address if hp is not None else None
                fragment[name] = ((address.start,), (address.numel,)) if address is not None else ((0,), (0,))
        blocks = {}
        for path in share.tensors:
            group, _, rest = path[1:].partition("/")
            name = rest.rpartition("/")[2] if group == "optimizer" and rest.startswith("state/") else rest
            if group in ("fp32", "frozen", "optimizer") and name in fragment:
                blocks[path] = fragment[name]
        state = share.read(blocks)
        self.load(state)
        return state

    def load(self, state: dict) -> None:
        if "fp32" not in state:
            raise StalwartError("this checkpoint was not written by strategy deepspeed")
        saved_opt = state.get("optimizer")
        if saved_opt is not None:
            self._init_optimizer_state()
        keys = sorted((saved_opt or {}).get("state", {}))
        for name, p in self._params():
            if not p.requires_grad:
                self._set_lp(p, _flat(state["frozen"][name]))
                continue
            fp32 = _flat(state["fp32"][name])
            self._set_fragment(p, None, fp32)
            for key in keys:
                self._set_fragment(p, key, _flat(saved_opt["state"][key][name]))
            if self.stage == 3:
                self._set_lp(p, fp32)
        if self.stage != 3:
            # The model's copy of a trainable parameter is the cast of its fp32 master weight, which is
            # partitioned: each rank casts its partition and the ranks all-gather (what DeepSpeed's
            # step does), so no rank needs the full weights. Collective.
            self.optimizer.update_lp_params()
        buffers = dict(self.model.named_buffers())
        for name, value in state.get("buffers", {}).items():
            buffers[name].data.copy_(value)
        for k, v in state.get("engine", {}).items():
            setattr(self.engine, k, v)
        scaler = getattr(self.optimizer, "loss_scaler", None)
        for k, v in (state.get("loss_scaler") or {}).items():
            if scaler is not None and hasattr(scaler, k):
                setattr(scaler, k, v)
        if saved_opt is not None:
            groups = self._base.param_groups
            if len(groups) != len(saved_opt["param_groups"]):
                raise StalwartError(f"checkpoint has {len(saved_opt['param_groups'])} optimizer param groups, "
                                    f"the optimizer has {len(groups)}")
            for group, saved in zip(groups, saved_opt["param_groups"]):
                group.update(saved)
            for flat_state in self._base.state.values():
                for k, v in saved_opt["scalars"].items():
                    old = flat_state.get(k)
                    flat_state[k] = v.to(old.device).clone() if torch.is_tensor(v) and torch.is_tensor(old) else v

    def _set_fragment(self, p, key: str | None, saved: torch.Tensor | Piece) -> None:
        """Set this rank's fragment of `p`'s fp32 weight (or optimizer state `key`) from the saved
        flattened parameter: a full 1-D tensor, or a Piece that holds at least the fragment."""
        if self.stage == 3:
            from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

            part, start, valid = _partition(p)
            value = torch.zeros(part, dtype=torch.float32)
            value[:valid] = cut(saved, (start,), (valid,))
            value = value.to(p.ds_tensor.device)
            if key is None:
                safe_set_local_fp32_param(p, value)
            else:
                safe_set_local_optimizer_state(p, value, key)
            return
        hp = getattr(p, "_hp_mapping", None)
        if hp is None:
            return
        start, numel = hp.lp_fragment_address.start, hp.lp_fragment_address.numel
        hp.get_hp_fragment(key).data.copy_(cut(saved, (start,), (numel,)))

    def _set_lp(self, p, saved: torch.Tensor | Piece) -> None:
        """The model's (low-precision) copy of a parameter that the optimizer does not hold (a frozen
        one; in ZeRO-3 every one): the cast of the saved flattened weight. In ZeRO-3 this rank's
        partition, and the full value for a persistent parameter (which then was read whole)."""
        if self.stage == 3:
            _, start, valid = _partition(p)
            p.ds_tensor.data.zero_()
            p.ds_tensor.data.reshape(-1)[:valid].copy_(cut(saved, (start,), (valid,)))
            if p.data.numel() == p.ds_numel:  # a gathered (persistent) parameter holds the full value too
                p.data.copy_(saved.view(p.ds_shape))
            return
        p.data.copy_(saved.view(p.shape))

    def _init_optimizer_state(self) -> None:
        """Create the base optimizer's state (it is made lazily at the first step) so a load can fill it.

        As torch.distributed.checkpoint does: a step with zero gradients and a zero learning rate;
        everything it touches is overwritten by the load. ZeRO-3 steps one flat fp32 sub-group at a
        time (its param groups hold no parameters between steps), so it is initialized the same way.
        """
        base = self._base
        if self.stage == 3:
            flats = [(self.optimizer.sub_group_to_group_id[i], f)
                     for i, f in enumerate(self.optimizer.fp32_partitioned_groups_flat)]
        else:
            flats = [(gi, f) for gi, g in enumerate(base.param_groups) for f in g["params"]]
        have = {id(k) for k in base.state}
        missing = [(gi, f) for gi, f in flats if id(f) not in have]
        if missing:
            lrs = [g.get("lr") for g in base.param_groups]
            for g in base.param_groups:
                if "lr" in g:
                    g["lr"] = torch.tensor(0.0) if torch.is_tensor(g["lr"]) else 0.0
            try:
                for _, f in missing:
                    f.grad = torch.zeros_like(f)
                if self.stage == 3:
                    for gi, f in missing:
                        kept = base.param_groups[gi]["params"]
                        base.param_groups[gi]["params"] = [f]
                        try:
                            base.step()
                        finally:
                            base.param_groups[gi]["params"] = kept
                else:
                    base.step()
            finally:
                for g, lr in zip(base.param_groups, lrs):
                    if lr is not None:
                        g["lr"] = lr
                for _, f in missing:
                    f.grad = None
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if self.stage != 3 and link is not None:
            link()  # ZeRO 1/2: map each parameter's fragment onto the optimizer state


def _partition(p) -> tuple[int, int, int]:
    """ZeRO-3: (partition size, start in the flattened parameter, valid elements) of this rank's partition."""
    part = p.ds_tensor.ds_numel
    start = part * dist.get_rank(group=getattr(p, "ds_process_group", None))
    return part, start, max(0, min(part, p.ds_numel - start))


def _flat(saved: torch.Tensor | Piece) -> torch.Tensor | Piece:
    """A saved DeepSpeed tensor as a flattened parameter: Pieces are 1-D already; frozen parameters
    saved by stages 1 and 2 are whole tensors of the parameter's shape."""
    return saved if isinstance(saved, Piece) else saved.reshape(-1)


def _scalars_of(obj: Any) -> dict:
    if obj is None:
        return {}
    return {k: v for k, v in vars(obj).items() if isinstance(v, (bool, int, float)) and not k.startswith("_")}


def _skip_cpu_shm_op() -> None:
    """On CPU, DeepSpeed compiles a shared-memory all-reduce with gcc when its comm backend starts
    (about a minute, once per machine). Only inference all-reduces use it; training collectives go
    through torch.distributed (gloo). Skip the build; set STALWART_DEEPSPEED_SHM=1 to keep it."""
    import os

    if os.environ.get("STALWART_DEEPSPEED_SHM") == "1":
        return
    import importlib

    try:
        # import_module, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the name
        # `torch` (the torch package), which that statement would return.
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None
