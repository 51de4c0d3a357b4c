"""A scaling sweep: a ladder of small jobs (model sizes x token budgets) from one base job spec, the
results they give (N, D, final loss), and the target run to forecast from them.

Pure: reading a sweep file, planning its jobs and reading a finished job's result. Running them is
the caller's (`stalwart sweep`, through `stalwart.Client`: each rung is an ordinary job, queued,
gang-scheduled and restarted like any other).

    name: tiny-gpt-ladder
    job: job.yaml                  # the base job spec, relative to this file
    steps_key: steps               # the config key that sets a run's length
    config: {warmup: 10}           # over the base job's config, for every run
    sizes:                         # model sizes: config values laid over the base job's
      - {dim: 32, layers: 1, heads: 2}
      - {dim: 64, layers: 2, heads: 4}
    steps: [40, 120, 360]          # token budgets, as training steps
    target: {size: {dim: 256, layers: 4, heads: 4}, steps: 600}   # run too, held out of the fit
    loss: {last: 20}               # a run's loss: the mean of its last 20 reported steps

A run's N is the parameter count rank 0 reported at `ctx.prepare` (`status()["params"]`); its D is
its last step times the tokens one step trains (rank 0's reported `tokens` times the world size:
each rank reports the tokens of its own batch); its compute is 6ND.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SweepError(ValueError):
    """A sweep file that cannot run, or a job whose result cannot be read; the message says what to change."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SweepTarget(_Model):
    size: Optional[dict[str, Any]] = Field(None, description="the target's model: config values, like a size")
    steps: Optional[int] = Field(None, ge=1, description="the target's length in steps")
    run: bool = Field(True, description="also run the target (held out of the fit) and compare")
    params: Optional[float] = Field(None, gt=0, description="its parameters, when it is not run")
    tokens: Optional[float] = Field(None, gt=0, description="its training tokens, when it is not run")
    compute: Optional[float] = Field(None, gt=0, description="its FLOPs, when it is not run")

    @model_validator(mode="after")
    def _one_way(self) -> "SweepTarget":
        if self.run and (self.size is None or self.steps is None):
            raise ValueError("a target that runs needs size and steps (or run: false with compute, or params "
                             "and tokens)")
        if not self.run and self.compute is None and (self.params is None or self.tokens is None):
            raise ValueError("a target that does not run needs compute, or params and tokens")
        return self


class SweepLoss(_Model):
    metric: str = Field("loss", description="the reported figure to fit: loss, or a metric of ctx.report")
    last: int = Field(20, ge=1, description="a run's loss is the mean of its last N reported steps")


class SweepSpec(_Model):
    name: str = Field(description="lower-case letters, digits and '-': the prefix of the jobs' names")
    job: str = Field(description="the base job spec (YAML), relative to the sweep file")
    steps_key: str = Field("steps", description="the config key that sets a run's length in steps")
    config: dict[str, Any] = Field(default_factory=dict, description="config values for every run, target included, "
                                   "over the base job's (a shorter warmup for the short runs, ...)")
    sizes: list[dict[str, Any]] = Field(min_length=2, description="model sizes: config values over the job's")
    steps: list[int] = Field(min_length=1, description="token budgets, as steps")
    target: SweepTarget
    loss: SweepLoss = SweepLoss()
    level: float = Field(0.9, gt=0.5, lt=1.0, description="the forecast interval's coverage")
    law: Optional[Literal["compute", "size"]] = Field(
        None, description="size: L(N, D) on every run, for a target of a given size and data (the default when "
                          "the target runs or names params and tokens); compute: L(C) on the grid's envelope, the "
                          "best loss a compute can reach (the default for a target given as compute alone)")
    min_tokens_per_param: Optional[float] = Field(
        None, gt=0, description="L(N, D) leaves out runs with fewer tokens per parameter (default 10, as for "
                                "large language models; a small ladder may need less: see the tiny GPT's sweep)")

    def law_for_target(self) -> str:
        if self.law is not None:
            return self.law
        t = self.target
        return "size" if t.run or (t.params is not None and t.tokens is not None) else "compute"

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,40}", name):
            raise ValueError("use lower-case letters, digits and '-' (at most 41 characters)")
        return name

    @field_validator("steps")
    @classmethod
    def _positive(cls, steps: list[int]) -> list[int]:
        if any(s < 1 for s in steps) or len(set(steps)) != len(steps):
            raise ValueError("steps must be distinct positive integers")
        return steps

    @field_validator("sizes")
    @classmethod
    def _distinct(cls, sizes: list[dict]) -> list[dict]:
        keys = [json.dumps(s, sort_keys=True) for s in sizes]
        if len(set(keys)) != len(keys):
            raise ValueError("sizes must be distinct")
        return sizes


def load_sweep(path: str | Path) -> tuple[SweepSpec, dict]:
    """The sweep file and its base job spec (as a dict, `workdir` made absolute). Raises SweepError."""
    path = Path(path)
    raw = _yaml(path, f"{path}", "a sweep is a mapping (name, job, sizes, steps, target)")
    try:
        sweep = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise SweepError(f"{path}: {where}: {first['msg']}") from None
    job_path = (path.parent / sweep.job).resolve()
    base = _yaml(job_path, f"{path}: job: {job_path}", "it is not a job spec")
    base["workdir"] = str((job_path.parent / base.get("workdir", ".")).resolve())
    return sweep, base


def _yaml(path: Path, where: str, not_a_mapping: str) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SweepError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"{where} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: {not_a_mapping}")
    return raw


def plan(sweep: SweepSpec, base: dict) -> list[dict]:
    """The jobs to run, smallest first: one per (size, steps), then the target when it runs. Each is
    {"name", "size", "steps", "target": bool, "spec": the job spec dict, "submission_id"}; the
    submission id depends on the spec only, so running the sweep again finds the same jobs."""
    rungs = [(i, size, steps, False) for i, size in enumerate(sweep.sizes) for steps in sorted(sweep.steps)]
    if sweep.target.run:
        rungs.append((len(sweep.sizes), sweep.target.size, sweep.target.steps, True))
    jobs = []
    for i, size, steps, is_target in rungs:
        name = f"{sweep.name}-target" if is_target else f"{sweep.name}-s{i}-{steps}"
        spec = json.loads(json.dumps(base))  # a deep copy
        spec["name"] = name
        spec["config"] = {**(base.get("config") or {}), **sweep.config, **size, sweep.steps_key: steps}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        jobs.append({"name": name, "size": size, "steps": steps, "target": is_target, "spec": spec,
                     "submission_id": f"sweep-{sweep.name}-{digest}"})
    return jobs


def run_result(status: dict, metrics: list[dict], loss: SweepLoss = SweepLoss()) -> dict:
    """What a finished job gives the fit: {"params", "tokens", "compute", "loss", "step"}. Raises
    SweepError when the job did not succeed or did not report what is needed."""
    job = status.get("id", "the job")
    if status.get("state") != "SUCCEEDED":
        raise SweepError(f"{job} ended {status.get('state')}: {status.get('reason') or 'see its status'}")
    params = status.get("params")
    if not isinstance(params, (int, float)) or params <= 0:
        raise SweepError(f"{job} reported no parameter count: its function must call ctx.prepare (or ctx.track)")
    last_by_step: dict[int, dict] = {}
    for m in metrics:  # in the order recorded: a step trained again after a restart keeps its last report
        if isinstance(m.get("step"), int):
            last_by_step[m["step"]] = m
    if not last_by_step:
        raise SweepError(f"{job} reported no step")
    steps = sorted(last_by_step)
    values = [_value(last_by_step[s], loss.metric) for s in steps[-loss.last:]]
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        raise SweepError(f"{job} reported no finite {loss.metric!r} in its last {loss.last} steps")
    tokens_per_rank = [_value(last_by_step[s], "tokens") for s in steps[-loss.last:]]
    tokens_per_rank = [t for t in tokens_per_rank if t is not None and t > 0]
    if not tokens_per_rank:
        raise SweepError(f"{job} reported no tokens: pass tokens=<this rank's tokens in the step> to ctx.report")
    world = (status.get("attempts") or [{}])[-1].get("world_size") or 1
    step = steps[-1]
    tokens = float(step) * sorted(tokens_per_rank)[len(tokens_per_rank) // 2] * world
    return {"params": float(params), "tokens": tokens, "compute": 6.0 * float(params) * tokens,
            "loss": sum(values) / len(values), "step": step}


def envelope(rows: list[dict]) -> list[dict]:
    """The compute-optimal runs of a grid (sizes x steps): sorted by compute, each run whose loss is
    below that of every run with less compute. A grid has one run per budget, most of them off the
    optimum (a big model trained briefly, a small one trained long): the law is fitted to this lower
    envelope, as an isoFLOP sweep's frontier keeps the best run per budget."""
    out: list[dict] = []
    for row in sorted(rows, key=lambda r: r["compute"]):
        if not out or row["loss"] < out[-1]["loss"]:
            out.append(row)
    return out


def _value(record: dict, key: str) -> float | None:
    x = record.get(key, (record.get("metrics") or {}).get(key))
    if isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None
