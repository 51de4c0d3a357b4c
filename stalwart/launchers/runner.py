"""What one rank does inside its worker: environment, process groups, context, the user's function.

Two kinds of entrypoint: `module:function`, called as function(ctx, config) after the worker has
initialized torch.distributed; and script mode, `{script: train.py, args: [...]}`, a torchrun-style
script run unmodified as `__main__`, which initializes torch.distributed itself and may call
`stalwart.context()` for checkpoints, reports and fault detection.
"""

from __future__ import annotations

import os
import runpy
import sys
import time

import torch
import torch.distributed as dist

from stalwart.checkpointing import memory
from stalwart.checkpointing.storage import open_storage
from stalwart.errors import StalwartError
from stalwart.launchers import context as context_module
from stalwart.launchers import preemption, rejoin
from stalwart.launchers.context import TrainContext
from stalwart.launchers.niceness import set_niceness
from stalwart.launchers.plan import AttemptPlan
from stalwart.launchers.reporter import Reporter
from stalwart.launchers.userland import Tee, collective_timeout, format_user_error, import_entrypoint
from stalwart.spec import JobSpec


def run_rank(worker, payload: dict) -> dict:
    """Run the user's function for `worker.rank`; return a summary, or raise UserCodeError.

    `payload` keys: spec (dict), master_addr, master_port, plan (AttemptPlan), sink (callable(batch)).
    """
    spec = JobSpec.model_validate(payload["spec"])
    rank, world = worker.rank, worker.world_size
    env = {
        "MASTER_ADDR": payload["master_addr"], "MASTER_PORT": str(payload["master_port"]),
        "RANK": str(rank), "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(payload.get("local_rank", 0)), "LOCAL_WORLD_SIZE": str(payload.get("local_world_size", 1)),
        "STALWART_JOB_ID": worker.job_id, "STALWART_ATTEMPT": str(worker.attempt),
    }
    if payload.get("cuda_visible_devices") is not None:
        # Every rank on a node sees the node's GPUs of this gang, in local-rank order, so that
        # LOCAL_RANK indexes its own GPU as torchrun scripts and DeepSpeed expect. Set before CUDA starts.
        env["CUDA_VISIBLE_DEVICES"] = payload["cuda_visible_devices"]
    os.environ.update(env)
    os.environ.update(spec.env)
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))

    # Every thread of the process, before the rank starts more (reporter, process group): they inherit it.
    refused = set_niceness(spec.resources.niceness, all_threads=True)
    reporter = Reporter(payload["sink"], spec.monitoring.report_interval_s).start()
    out, err = sys.stdout, sys.stderr
    sys.stdout = Tee(out, reporter.log, f"[rank {rank}] ")
    sys.stderr = Tee(err, reporter.log, f"[rank {rank}] ")
    if refused and rank == 0:
        reporter.log(f"[rank 0] stalwart: ranks are {refused}; set resources.niceness to null to keep Ray's "
                     f"niceness without this note\n")
    ctx = None
    started = time.time()
    grace = spec.fault_tolerance.preemption_grace_s

    def on_notice(notice: preemption.Notice) -> None:
        # Off the signal handler, on a thread of its own: the controller hears of it at once.
        reporter.log(f"[rank {rank}] stalwart: preemption notice ({notice.reason}): stopping at the next step "
                     f"all ranks reach, after an emergency checkpoint\n")
        reporter.event("preemption_notice", rank=rank, reason=notice.reason, grace_s=notice.deadline - notice.received)
        reporter.flush()

    preemption.begin(grace, on_notice)
    try:
        device = _device(spec, payload)
        timeout = collective_timeout()
        hang = spec.fault_tolerance.hang_timeout_s
        if hang is not None and timeout.total_seconds() < 3 * hang:
            # stalwart must see a hang (and take the stacks) before the collective gives up.
            timeout = type(timeout)(seconds=3 * hang)
        plan: AttemptPlan = payload["plan"]
        storage = open_storage(plan.checkpoint_uri, spec.checkpoint.s3)

        def make_context(ckpt_group=None, lazy_group: bool = False, vote_group=None, memory=None,
                         train=None, rejoin_with=None, standby: bool = False) -> TrainContext:
            return TrainContext(
                job_id=worker.job_id, attempt=worker.attempt, rank=rank, world_size=world,
                local_rank=int(env["LOCAL_RANK"]), device=device, config=dict(spec.config),
                strategy=spec.strategy.name, strategy_options=dict(spec.strategy.options), storage=storage,
                every_steps=spec.checkpoint.every_steps, keep_last=spec.checkpoint.keep_last, reporter=reporter,
                plan=plan, ckpt_group=ckpt_group, lazy_group=lazy_group, vote_group=vote_group, memory=memory,
                train=train, rejoin_with=rejoin_with, standby=standby, auto_mtbf_s=spec.checkpoint.auto_mtbf_s,
                auto_memory=spec.checkpoint.memory_every_steps == "auto")

        if spec.script is not None:
            os.environ["STALWART_COLLECTIVE_TIMEOUT_S"] = str(timeout.total_seconds())
            result = _run_script(spec, lambda: make_context(lazy_group=True))
            ctx = context_module._CURRENT
        else:
            live = rejoin.applies(spec) and world > 1
            # A warm spare on standby runs the function up to its restore, which then waits for the
            # attempt it will be a rank of (launchers.rejoin); the groups are formed then.
            standby = bool(payload.get("standby")) and live
            backend = "nccl" if device.type == "cuda" else "gloo"
            # Checkpoint shard records travel on their own gloo group, from a background thread, so they
            # never interleave with the training collectives; the preemption vote too (one tiny
            # non-blocking all-reduce a step, see preemption.StopVote).
            groups = rejoin.Groups() if standby else rejoin.form_groups(
                backend, rank, world, timeout, memory=spec.checkpoint.memory_every_steps is not None, train=live)
            tier = _memory_tier(worker, spec, groups.memory, plan.ring)

            def rejoin_with(failed: BaseException | None) -> tuple[rejoin.Rendezvous, rejoin.Groups]:
                """After a peer was lost (in the loop), or on standby (at the restore): the attempt's
                rendezvous, and its groups."""
                rendezvous = worker.mailbox.wait(rejoin.rejoin_wait_s() if failed is not None else None)
                if rendezvous is None:
                    raise rejoin.PeerLost(f"a peer was lost ({_first_line(failed)}) and no new attempt asked this "
                                          f"rank to rejoin within {rejoin.rejoin_wait_s():g} s "
                                          f"({rejoin.REJOIN_WAIT_ENV})") from failed
                rejoin.leave_groups()
                worker.attempt = rendezvous.attempt
                os.environ.update(MASTER_ADDR=rendezvous.master_addr, MASTER_PORT=str(rendezvous.master_port),
                                  STALWART_ATTEMPT=str(rendezvous.attempt))
                formed = rejoin.form_groups(backend, rank, world, timeout, memory=True, train=True)
                tier.bind(rank, world, formed.memory, ring=rendezvous.plan.ring)
                return rendezvous, formed

            ctx = context_module._CURRENT = make_context(
                groups.checkpoint, vote_group=groups.vote, memory=tier,
                train=rejoin.group_for(spec, groups, rank, world) if live else None,
                rejoin_with=rejoin_with if live else None, standby=standby)
            func = import_entrypoint(spec.entrypoint, spec.workdir)
            result = func(ctx, dict(spec.config))
        if ctx is not None:
            ctx.close()
        return {"rank": rank, "seconds": time.time() - started, "result": _small(result),
                "last": reporter.last_figures()}
    except context_module.StandbyDeclined as exc:  # a standby run that cannot wait as it is: no error
        reporter.log(f"[rank {rank}] stalwart: {exc}\n")
        return {"rank": rank, "seconds": time.time() - started, "result": None}
    except BaseException as exc:  # noqa: BLE001 - every failure is reported with its traceback
        error = format_user_error(rank, exc)
        reporter.log(f"[rank {rank}] " + (f"stalwart: {exc}\n" if error.preempted else error.traceback_text))
        raise error from None
    finally:
        preemption.end()
        context_module._CURRENT = context_module._FACTORY = None
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, Tee):
                stream.close_partial()
        sys.stdout, sys.stderr = out, err
        reporter.close()
        rejoin.leave_groups()


def _memory_tier(worker, spec: JobSpec, group, ring: tuple[int, ...]) -> memory.MemoryTier | None:
    """The job's in-memory snapshots in this process (an earlier attempt's, when the process survived
    it), bound to this attempt; their replicas travel on `group`, a gloo group of their own, apart
    from the training collectives and the checkpoint's records."""
    every = spec.checkpoint.memory_every_steps
    if every is None:
        return None
    tier = memory.tier_for(worker.job_id, 0 if every == "auto" else every)  # auto: set by the context
    tier.bind(worker.rank, worker.world_size, group, ring=ring)
    return tier


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _device(spec: JobSpec, payload: dict) -> torch.device:
    """cuda:<index of this rank's GPU among the visible ones> when the job asks for GPUs, else cpu."""
    if spec.resources.gpus_per_worker <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise StalwartError(
            f"resources.gpus_per_worker is {spec.resources.gpus_per_worker:g} but torch sees no CUDA device in "
            f"this rank (torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    device = torch.device("cuda", int(payload.get("cuda_device_index", 0)))
    torch.cuda.set_device(device)
    return device


def _run_script(spec: JobSpec, make_context) -> object:
    """Run the script as `__main__` with its argv; `stalwart.context()` builds the context on first use."""
    script = spec.script
    path = script.path(spec.workdir).resolve()
    if not path.is_file():
        raise StalwartError(f"entrypoint script {path} does not exist on this node")
    context_module._CURRENT = None
    context_module._FACTORY = make_context
    saved = sys.argv, list(sys.path)
    sys.argv = [str(path), *script.args]
    for entry in (spec.workdir, str(path.parent)):  # as `python train.py` would: the script's folder first
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    destroy = dist.destroy_process_group

    def destroy_after_saves(*args, **kwargs):
        # The last checkpoint's shard records travel over a group that this call tears down.
        if context_module._CURRENT is not None:
            context_module._CURRENT.close()
        return destroy(*args, **kwargs)

    dist.destroy_process_group = destroy_after_saves
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    finally:
        dist.destroy_process_group = destroy
        sys.argv, sys.path[:] = saved[0], saved[1]
    return None


def _small(value):
    """Return values travel back to the controller; keep only small, plain ones."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and len(value) <= 64:
        return {str(k): _small(v) for k, v in value.items() if isinstance(v, (bool, int, float, str, type(None)))}
    return repr(value)[:200]
