"""A gang: one attempt's rank workers, reserved together in a placement group (all ranks or none)."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from stalwart.checkpointing.memory import replica_ring
from stalwart.errors import GangStartFailed
from stalwart.launchers import rejoin
from stalwart.launchers.plan import AttemptPlan
from stalwart.launchers.worker import RankWorker, UserCodeError
from stalwart.spec import JobSpec

# After the first failure, how long to wait for the others to report, so that a rank killed by the
# OS (the cause) wins over its peers' broken-connection errors (the consequence).
FAILURE_GRACE_S = 3.0
# How long stop() waits for killed workers to be gone.
STOP_FENCE_S = 10.0
# How long start() waits for its new workers to come up and answer (a worker is a new process that
# imports torch: seconds on a loaded node). Past it, the start fails as a node failure.
START_TIMEOUT_ENV = "STALWART_GANG_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 120.0
# How long collecting one finished rank's result may take (it is done when ray.wait says so).
RESULT_TIMEOUT_S = 10.0
# How long start() waits for warm spares (and kept ranks) to answer; one that does not is replaced.
ADOPT_WAIT_S = 2.0
# How long a restart asks a spare on standby not yet seen waiting whether it waits now.
STANDBY_ASK_S = 0.5
# With in-memory snapshots: after a rank's worker died, how long stop(keep=True) waits for the other
# ranks' calls to end (their collective breaks when the peer's connection closes) so that their
# processes, and the snapshots in them, can serve the next attempt. A rank still busy then is killed.
SURVIVOR_WAIT_ENV = "STALWART_SURVIVOR_WAIT_S"
DEFAULT_SURVIVOR_WAIT_S = 5.0
# What a spare imports ahead of a restart: what every rank imports before its first step (DDP's
# constructor alone imports torch._dynamo, about a second), and the strategy's own modules.
SPARE_IMPORTS = ("torch", "torch.distributed", "torch._dynamo", "stalwart.launchers.runner",
                 "stalwart.launchers.strategies")
# DeepSpeed's engine imports more on its first construction: its ZeRO optimizer check imports its Muon
# optimizer, whose module calls torch.compile and so imports torch._inductor (2.3 of the 2.5 s that
# deepspeed.initialize took a replacement rank on 2 cores; 0.17 s with these imported ahead).
STRATEGY_IMPORTS = {"ddp": (),
                    "deepspeed": ("deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2",
                                  "deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.moe.layer"),
                    "fsdp": ("torch.distributed.fsdp", "torch.distributed.device_mesh",
                             "torch.distributed.checkpoint.state_dict")}


@dataclass(frozen=True)
class GangOutcome:
    """How an attempt's gang ended. `cause` is None on success, else one of spec.CAUSES."""

    succeeded: bool
    cause: str | None = None
    rank: int | None = None
    error: str = ""
    traceback: str = ""
    last: dict | None = None  # on success: rank 0's newest step and loss, from its result

    @property
    def worker_died(self) -> bool:
        """A rank's worker process died (not a broken connection to one that did)."""
        return self.cause == "node_failure" and "died" in self.error


class RayGang:
    """Lifecycle: `reserve()` until True, `start(plan, sink_for)`, `poll()` until it returns an
    outcome, then `stop()` (always; it is idempotent and also releases an unused reservation).

    Restarts: `stop(keep=True)` stops the workers but keeps the reservation and the spares, and
    the next attempt's gang, built with `previous=` that gang, takes them over when it has the same
    shape and none of the nodes it must avoid (otherwise it releases them). Spares are warm rank
    processes (`warm_spares()`, once an attempt trains): one per bundle, holding no resources of
    their own, with torch and the strategy imported, so that a restart's ranks start in
    milliseconds instead of seconds. They live in the reservation and go with it.

    Survivors (jobs with checkpoint.memory_every_steps, CPU): when a rank's worker died, `stop(keep=True)`
    keeps the workers of the ranks whose calls ended (their processes hold the in-memory snapshots), and
    the next attempt runs the same ranks in them; a warm spare (or a new worker) takes the dead rank's place."""

    def __init__(self, job_id: str, attempt: int, spec: JobSpec, world_size: int | None = None,
                 exclude_nodes: tuple[str, ...] = (), previous: "RayGang | None" = None):
        self.job_id = job_id
        self.attempt = attempt
        self.spec = spec
        self.world_size = world_size or spec.resources.workers
        res = spec.resources
        bundle = {"CPU": res.cpus_per_worker}
        if res.gpus_per_worker:
            bundle["GPU"] = res.gpus_per_worker
        self.bundle = bundle
        selector = None
        if exclude_nodes:
            # Quarantined nodes: no bundle of this gang may land there.
            selector = [{"ray.io/node-id": f"!in({','.join(exclude_nodes)})"} for _ in range(self.world_size)]
        self.exclude_nodes = tuple(exclude_nodes)
        self._spares: dict[int, tuple] = {}  # bundle -> (actor, ref of its warm() call)
        self._survivors: dict[int, object] = {}  # bundle -> the worker of a rank that outlived its attempt
        self._live: dict[int, object] = {}  # bundle -> the call of a survivor still in its loop (launchers.rejoin)
        self._standby: dict[int, object] = {}  # bundle -> the run of its spare, waiting at its restore
        self._standby_payload: dict[int, dict] = {}
        self._waiting: set[int] = set()  # bundles whose standby run was last seen waiting to be made a rank
        if previous is not None and previous._lendable(self.world_size, self.exclude_nodes):
            self._pg, self._spares, self._survivors = previous._pg, previous._spares, previous._survivors
            self._live, self._standby, self._waiting = previous._live, previous._standby, previous._waiting
            previous._pg, previous._spares, previous._survivors, previous._live = None, {}, {}, {}
            previous._standby = {}
        else:
            if previous is not None:
                previous.stop()
            self._pg = placement_group([dict(bundle) for _ in range(self.world_size)],
                                       strategy="PACK" if res.placement == "pack" else "SPREAD",
                                       name=f"stalwart-{job_id}-{attempt}", bundle_label_selector=selector)
        self._ready_ref = self._pg.ready()
        self.workers: list = []
        self._refs: dict = {}
        self._results: dict[int, dict] = {}
        self._stopped = False
        self.ranks: list[dict] = []
        self.warm_ranks = 0  # ranks of this attempt that started from a spare
        self.kept_ranks: tuple[int, ...] = ()  # ranks of this attempt whose process ran the previous one
        self.live_ranks: tuple[int, ...] = ()  # of those, the ranks whose call of the previous one goes on
        self.standby_ranks: tuple[int, ...] = ()  # ranks from spares that ran the function up to their restore
        self._dead: set[int] = set()  # ranks whose worker died

    def reserve(self, timeout: float = 0.5) -> bool:
        ready, _ = ray.wait([self._ready_ref], timeout=timeout)
        return bool(ready)

    def waiting_for(self) -> str:
        free = ray.available_resources()
        total = ray.cluster_resources()
        have = ", ".join(f"{k} {free.get(k, 0):g} free of {total.get(k, 0):g}" for k in self.bundle)
        want = ", ".join(f"{k}: {v:g}" for k, v in self.bundle.items())
        avoid = f"; avoiding {len(self.exclude_nodes)} quarantined or unreachable node(s)" if self.exclude_nodes else ""
        return f"waiting for resources: {self.world_size} x {{{want}}} (cluster has {have}{avoid})"

    def _new_worker(self, bundle: int, attempt: int, spare: bool = False):
        """A RankWorker in `bundle` of the reservation: a rank holds the bundle's resources, a spare none."""
        res = self.spec.resources
        opts = dict(num_cpus=0 if spare else res.cpus_per_worker, num_gpus=0 if spare else res.gpus_per_worker,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=bundle),
                    max_restarts=0)
        if self.spec.runtime_env:
            opts["runtime_env"] = self.spec.runtime_env
        return RankWorker.options(**opts).remote(self.job_id, attempt, bundle, self.world_size)

    def start(self, plan: AttemptPlan, sink_for: Callable[[int], Callable]) -> None:
        """Start every rank's `run`. Raises GangStartFailed when a worker dies or does not answer
        within the start timeout (a rank lost before its first report is a node failure too)."""
        kept = self._adopt(self._take_survivors())
        live = {rank: ref for rank, ref in self._live.items() if rank in kept}
        self._live = {}
        spares = self._adopt_spares(needed=set(range(self.world_size)) - set(kept))
        # Spares that ran the function up to their restore join from there, like the ranks still in their loop.
        standby = {rank: self._standby.pop(rank) for rank in spares if rank in self._standby}
        self.warm_ranks = len(spares)
        self.kept_ranks = tuple(sorted(kept))
        self.live_ranks = tuple(sorted(live))
        self.standby_ranks = tuple(sorted(standby))
        if self.kept_ranks or standby:
            plan = dataclasses.replace(plan, kept_ranks=self.kept_ranks, live_ranks=self.live_ranks,
                                       standby_ranks=self.standby_ranks)
        live.update(standby)
        adopted = {**spares, **kept}
        self.workers = [adopted[rank] if rank in adopted else self._new_worker(rank, self.attempt)
                        for rank in range(self.world_size)]
        timeout = start_timeout_s()
        try:
            addr, port = ray.get(self.workers[0].address.remote(), timeout=timeout)
            nodes = ray.get([w.node_id.remote() for w in self.workers], timeout=timeout)
            pids = ray.get([w.pid.remote() for w in self.workers], timeout=timeout)
            gpus = (ray.get([w.gpu_ids.remote() for w in self.workers], timeout=timeout)
                    if self.spec.resources.gpus_per_worker > 0 else None)
        except RayActorError as exc:
            raise GangStartFailed(f"a rank's worker died while the gang started: {_first_line(exc)}") from None
        except GetTimeoutError:
            raise GangStartFailed(f"the rank workers did not answer within {timeout:g} s of starting "
                                  f"(raise {START_TIMEOUT_ENV} on slow nodes)") from None
        self.ranks = [{"rank": r, "node_id": n, "pid": p} for r, (n, p) in enumerate(zip(nodes, pids))]
        if self.spec.checkpoint.memory_every_steps is not None:
            plan = dataclasses.replace(plan, ring=replica_ring(nodes))
        spec_dict = self.spec.to_dict(reveal_secrets=True)  # the ranks open the S3 storage with the keys
        for rank, worker in enumerate(self.workers):
            same_node = [r for r, n in enumerate(nodes) if n == nodes[rank]]
            payload = {"spec": spec_dict, "master_addr": addr, "master_port": port, "plan": plan,
                       "sink": sink_for(rank), "local_rank": same_node.index(rank),
                       "local_world_size": len(same_node)}
            if gpus is not None:
                payload.update(node_gpus(gpus, same_node, rank))
            self._standby_payload[rank] = {**payload, "master_addr": "127.0.0.1", "master_port": 0, "standby": True}
            if rank in live:  # its call of the last attempt (or its standby run) goes on, in this one
                worker.rejoin.remote(self.attempt, addr, port, plan, payload["sink"])
                self._refs[live[rank]] = rank
            else:
                self._refs[worker.run.remote(payload)] = rank

    def poll(self, timeout: float = 0.5) -> GangOutcome | None:
        """None while running; otherwise how the gang ended."""
        pending = [r for r in self._refs if self._refs[r] not in self._results]
        if not pending:
            return GangOutcome(True)
        done, rest = ray.wait(pending, num_returns=1, timeout=timeout)
        if not done:
            return None
        if rest:  # and every other rank that has ended by now: ranks that end together are seen together
            done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        failures = self._collect(done)
        if not failures:
            if all(r.get("ok") for r in self._results.values()) and len(self._results) == self.world_size:
                return GangOutcome(True, last=self._results.get(0, {}).get("last"))
            return None
        if any(f.worker_died for f in failures):
            return _classify(failures)  # a dead worker is the primary cause whatever the others report
        # Give the other ranks a moment to report: the first error is often a consequence (a broken
        # connection to a peer that died, whose own death Ray reports a moment later).
        deadline = time.monotonic() + FAILURE_GRACE_S
        while time.monotonic() < deadline and len(self._results) < self.world_size:
            rest = [r for r in self._refs if self._refs[r] not in self._results]
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=max(0.0, deadline - time.monotonic()))
            failures += self._collect(more)
            if not more:
                break
        return _classify(failures)

    def _collect(self, refs) -> list[GangOutcome]:
        failures = []
        for ref in refs:
            rank = self._refs[ref]
            if rank in self._results:
                continue
            try:
                value = ray.get(ref, timeout=RESULT_TIMEOUT_S)
                self._results[rank] = {"ok": True, "last": value.get("last") if isinstance(value, dict) else None}
            except RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, UserCodeError) else None
                if cause is None:
                    failures.append(GangOutcome(False, "user_error", rank, str(exc), str(exc)))
                else:
                    kind = ("preemption" if cause.preempted else
                            "node_failure" if cause.communication else "user_error")
                    failures.append(GangOutcome(False, kind, rank, cause.error, cause.traceback_text))
                self._results[rank] = {"ok": False}
            except (RayActorError, GetTimeoutError) as exc:
                failures.append(GangOutcome(False, "node_failure", rank, f"rank {rank}'s worker died: {_first_line(exc)}"))
                self._results[rank] = {"ok": False}
                self._dead.add(rank)
        return failures

    def finished(self) -> dict[int, int | None]:
        """The ranks whose call of the function has returned in this attempt, with the last step each
        reported (None: none)."""
        return {rank: (r.get("last") or {}).get("step") for rank, r in self._results.items() if r.get("ok")}

    def stacks(self, timeout: float = 5.0) -> dict[int, str]:
        refs = {w.stacks.remote(): rank for rank, w in enumerate(self.workers)}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        out = {}
        for ref in refs:
            try:
                out[refs[ref]] = ray.get(ref, timeout=0) if ref in ready else "<no answer: process stopped or busy in C>"
            except (RayActorError, RayTaskError, GetTimeoutError) as exc:
                out[refs[ref]] = f"<unavailable: {_first_line(exc)}>"
        return out

    def preempt(self, ranks: list[int], reason: str, deadline: float | None) -> None:
        """Give `ranks` a preemption notice (their node drains): the gang stops at an agreed step after an
        emergency checkpoint due by `deadline` (time.time(); None: the job's preemption_grace_s)."""
        for rank in ranks:
            if rank < len(self.workers):
                self.workers[rank].preempt.remote(reason, deadline)  # not awaited: the worker may be going

    def warm_spares(self) -> int:
        """Start one spare for each bundle that has none (CPU jobs with fault_tolerance.warm_spares);
        return how many are ready: their imports done, and, where ranks stay in their loop
        (launchers.rejoin), their run of the function waiting at its restore."""
        if (not self._stopped and self._pg is not None and self.spec.fault_tolerance.warm_spares
                and self.spec.resources.gpus_per_worker <= 0):
            modules = [*SPARE_IMPORTS, *STRATEGY_IMPORTS.get(self.spec.strategy.name, ())]
            omp_threads = max(1, int(self.spec.resources.cpus_per_worker))
            for bundle in range(self.world_size):
                if bundle not in self._spares:
                    spare = self._new_worker(bundle, 0, spare=True)
                    self._spares[bundle] = (spare, spare.warm.remote(omp_threads, modules, self.spec.resources.niceness))
        refs = [ref for _, ref in self._spares.values()]
        warm = ray.wait(refs, num_returns=len(refs), timeout=0)[0] if refs else []
        if rejoin.on_standby(self.spec) and self.world_size > 1:
            # Ahead of any fault, a warm spare runs the function up to its restore (model built,
            # prepared), where it waits to be made a rank (launchers.rejoin).
            for bundle, (spare, ref) in self._spares.items():
                if ref in warm and bundle not in self._standby and bundle in self._standby_payload:
                    self._standby[bundle] = spare.run.remote(self._standby_payload[bundle])
            # Ready: its run waits where it needs the world (the model built).
            asked = {self._spares[b][0].waiting.remote(): b for b in self._standby if b in self._spares}
            answered = ray.wait(list(asked), num_returns=len(asked), timeout=0.2)[0] if asked else []
            self._waiting = {asked[ref] for ref in answered if _answer(ref)}
            return len(self._waiting)
        return len(warm)

    def _adopt_spares(self, needed: set[int]) -> dict[int, object]:
        """The spares of the `needed` bundles whose imports are done, by bundle. The other spares of
        needed bundles are dropped and a new worker takes their bundle: one still starting or importing
        would not be ready sooner than a new process. Spares of other bundles stay for the next fault."""
        spares = {b: self._spares.pop(b) for b in sorted(needed) if b in self._spares}
        warm_refs = [ref for _, ref in spares.values()]
        warm = set(ray.wait(warm_refs, num_returns=len(warm_refs), timeout=0)[0]) if spares else set()
        standby = {b: self._standby.pop(b) for b in spares if b in self._standby}
        waiting = self._standing_by({b: spares[b][0] for b in standby}, standby)
        self._waiting -= set(spares)
        for b in [b for b in standby if b not in waiting]:  # its function failed, or is not at its wait
            del standby[b]
            warm.discard(spares[b][1])
        self._standby.update(standby)
        adopted = self._adopt({b: spare for b, (spare, ref) in spares.items() if ref in warm})
        for bundle, (spare, _) in spares.items():
            if bundle not in adopted:
                _kill(spare)
                self._standby.pop(bundle, None)
        return adopted

    def _standing_by(self, workers: dict[int, object], runs: dict[int, object]) -> set[int]:
        """Of the bundles whose spare has a standby run (`runs`, by bundle), those whose run is waiting
        for an attempt. One not waiting yet may never get there (its function waits on a group a spare
        has no part in), so a run counts only when seen waiting (`warm_spares`) or when it says so now,
        within STANDBY_ASK_S; a run that has ended (its function failed) never does."""
        ended = set(ray.wait(list(runs.values()), num_returns=len(runs), timeout=0)[0]) if runs else set()
        alive = {b for b in runs if runs[b] not in ended}
        asked = {workers[b].waiting.remote(): b for b in alive - self._waiting}
        said = ray.wait(list(asked), num_returns=len(asked), timeout=STANDBY_ASK_S)[0] if asked else []
        return (alive & self._waiting) | {asked[ref] for ref in said if _answer(ref)}

    def _adopt(self, workers: dict[int, object]) -> dict[int, object]:
        """The `workers` (by bundle) that answer `adopt(attempt)` within ADOPT_WAIT_S; the others are killed."""
        asked = {w.adopt.remote(self.attempt): bundle for bundle, w in workers.items()}
        answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=ADOPT_WAIT_S) if asked else ([], [])
        adopted = {}
        for ref in answered:
            try:
                ray.get(ref, timeout=0)
                adopted[asked[ref]] = workers[asked[ref]]
            except (RayActorError, RayTaskError, GetTimeoutError):
                pass
        for bundle, worker in workers.items():
            if bundle not in adopted:
                _kill(worker)
        return adopted

    def _take_survivors(self) -> dict[int, object]:
        survivors, self._survivors = self._survivors, {}
        return survivors

    def _keeps_survivors(self) -> bool:
        """Whether ranks outlive a failed attempt: with in-memory snapshots to restore from, on CPU
        (a GPU rank's process would need its bundle's GPU again; not built yet)."""
        return (self.spec.checkpoint.memory_every_steps is not None and self.spec.script is None
                and self.spec.resources.gpus_per_worker <= 0 and self.world_size > 1)

    def _lendable(self, world_size: int, avoid: tuple[str, ...]) -> bool:
        """Whether the next attempt can keep this stopped gang's reservation (and its spares)."""
        if not self._stopped or self._pg is None or world_size != self.world_size:
            return False
        try:
            table = placement_group_table(self._pg)
        except Exception:  # noqa: BLE001 - gone with its owner or the cluster
            return False
        nodes = set((table.get("bundles_to_node_id") or {}).values())
        return table.get("state") == "CREATED" and len(nodes) > 0 and not nodes & set(avoid)

    def stop(self, keep: bool = False) -> None:
        """Stop the workers; release the reservation and the spares too unless `keep`. With `keep`,
        after a rank's worker died, the ranks that outlived it are kept for the next attempt (see the
        class docstring)."""
        if not self._stopped:
            self._stopped = True
            if keep and self._keeps_survivors() and self._dead:
                self._survivors = self._wait_for_survivors()
            self._stop_workers(spare=set(self._survivors))
        if not keep:
            self._release()

    def _wait_for_survivors(self) -> dict[int, object]:
        """The workers of the ranks that outlive a dead peer, by rank; their processes live on. A rank
        survives when its call ends within the survivor wait (a dead peer breaks its collectives), or,
        in a job whose ranks stay in their loop (launchers.rejoin), when it waits there to rejoin."""
        rest = {ref: rank for ref, rank in self._refs.items() if rank not in self._dead}
        stays = rejoin.applies(self.spec)
        deadline = time.monotonic() + survivor_wait_s()
        waiting: set[int] = set()
        while True:
            done = set(ray.wait(list(rest), num_returns=len(rest), timeout=0)[0]) if rest else set()
            running = {rank: ref for ref, rank in rest.items() if ref not in done and rank not in self._results}
            if stays and running:
                asked = {self.workers[rank].waiting.remote(): rank for rank in running}
                answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=1.0)
                for ref in answered:
                    try:
                        if ray.get(ref, timeout=0):
                            waiting.add(asked[ref])
                    except (RayActorError, RayTaskError, GetTimeoutError):
                        pass
            if set(running) <= waiting or time.monotonic() >= deadline:
                break
            pending = [ref for rank, ref in running.items() if rank not in waiting]
            ray.wait(pending, num_returns=len(pending), timeout=0.05 if stays else max(0.0, deadline - time.monotonic()))
        self._collect([ref for ref in done if rest[ref] not in self._results])
        self._live = {rank: ref for rank, ref in running.items() if rank in waiting}
        ended = {rank: self.workers[rank] for ref, rank in rest.items() if ref in done and rank not in self._dead}
        return {**ended, **{rank: self.workers[rank] for rank in self._live}}

    def _stop_workers(self, spare: set[int] = frozenset()) -> None:
        for rank, worker in enumerate(self.workers):
            if rank not in spare:
                _kill(worker)
        # ray.kill returns before the processes are gone; wait for their calls to resolve so that no
        # stray background write (a checkpoint commit, a retention pass) lands after stop() returns.
        live = set(self._live.values())
        pending = [r for r in self._refs if self._refs[r] not in self._results and r not in live]
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=STOP_FENCE_S)

    def _release(self) -> None:
        for spare, _ in self._spares.values():
            _kill(spare)
        self._spares = {}
        for worker in self._survivors.values():
            _kill(worker)
        self._survivors, self._live, self._standby = {}, {}, {}
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001 - already gone with its owner or the cluster; nothing to release
                pass
            self._pg = None


def survivor_wait_s() -> float:
    return float(os.environ.get(SURVIVOR_WAIT_ENV, DEFAULT_SURVIVOR_WAIT_S))


def start_timeout_s() -> float:
    return float(os.environ.get(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S))


def _answer(ref) -> object:
    try:
        return ray.get(ref, timeout=0)
    except (RayActorError, RayTaskError, GetTimeoutError):
        return None


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except (RayActorError, ValueError):
        pass


def node_gpus(gpu_ids: list[list[str]], same_node: list[int], rank: int) -> dict:
    """CUDA_VISIBLE_DEVICES for `rank`: the GPUs Ray gave the ranks on its node, in local-rank order
    (as torchrun shows them), and the index of this rank's first GPU among them."""
    visible: list[str] = []
    for r in same_node:
        visible += [g for g in gpu_ids[r] if g not in visible]
    mine = gpu_ids[rank]
    return {"cuda_visible_devices": ",".join(visible), "cuda_device_index": visible.index(mine[0]) if mine else 0}


def _classify(failures: list[GangOutcome]) -> GangOutcome:
    """The primary failure: a dead worker beats a user error, which beats a broken connection."""
    dead = [f for f in failures if f.worker_died]
    user = [f for f in failures if f.cause == "user_error"]
    for group in (dead, user, failures):
        if group:
            return min(group, key=lambda f: f.rank if f.rank is not None else 0)
    raise AssertionError("no failures to classify")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
