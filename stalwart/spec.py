"""The job spec: typed sections, validated up front, loaded from YAML.

Every error names the field path and what is expected (see `SpecError`). Unknown fields are
rejected, because a misspelt knob that is silently ignored is worse than a refusal.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from stalwart.errors import SpecError

CAUSES = ("node_failure", "hang", "nan", "loss_spike", "divergence", "user_error", "preemption")
Cause = Literal["node_failure", "hang", "nan", "loss_spike", "divergence", "user_error", "preemption"]


class _Section(BaseModel):
    # hide_input_in_errors: a raw ValidationError's text would otherwise quote the input, secrets included
    # (stalwart's own messages, from _problems, quote only what is not a secret).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)


class Resources(_Section):
    workers: int = Field(2, ge=1, le=4096, description="number of rank workers (the world size)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved for each rank")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs reserved for each rank (0: train on CPU with gloo)")
    placement: Literal["pack", "spread"] = Field("pack", description="how the gang's bundles are placed")
    niceness: int | None = Field(
        0, ge=-20, le=19,
        description="scheduling niceness of each rank's process (all its threads) and what it starts. "
                    "Ray starts its workers 15 above its own, behind the node's other processes; 0 (the default) is "
                    "what a plain torchrun rank and Ray's own daemons run at. Lowering it needs root or "
                    "CAP_SYS_NICE; without them the ranks keep Ray's and rank 0 logs why. null keeps Ray's")
    min_workers: int | None = Field(None, ge=1, description="elastic: after a failure, go on with this many ranks "
                                    "or more rather than wait for all; grow back when capacity returns")

    @model_validator(mode="after")
    def _elastic(self) -> "Resources":
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed workers ({self.workers})")
        return self


class Strategy(_Section):
    name: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    options: dict[str, Any] = Field(
        default_factory=dict, validate_default=True,
        description="ddp: DistributedDataParallel arguments; fsdp: mixed_precision, activation_checkpointing, "
                    "reshard_after_forward, shard_modules; deepspeed: the DeepSpeed config")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `strategy: ddp` is the common spelling; the mapping form carries options.
        if isinstance(value, str):
            return {"name": value}
        return value

    @field_validator("options")
    @classmethod
    def _options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Checked here, without importing the strategies (they import torch).
        problems = _strategy_problems(info.data.get("name", "ddp"), options)
        if problems:
            raise ValueError("; ".join(problems))
        return options


_DDP_OPTIONS = ("find_unused_parameters", "bucket_cap_mb", "gradient_as_bucket_view", "static_graph",
                "broadcast_buffers")
_FSDP_OPTIONS = ("mixed_precision", "activation_checkpointing", "reshard_after_forward", "shard_modules")
_DTYPES = ("float32", "bfloat16", "float16")


def _strategy_problems(name: str, options: dict[str, Any]) -> list[str]:
    problems = []
    if name == "ddp":
        problems += [f"unknown ddp option {k!r}; expected one of: {', '.join(_DDP_OPTIONS)}"
                     for k in options if k not in _DDP_OPTIONS]
    elif name == "fsdp":
        problems += [f"unknown fsdp option {k!r}; expected one of: {', '.join(_FSDP_OPTIONS)}"
                     for k in options if k not in _FSDP_OPTIONS]
        mp = options.get("mixed_precision")
        if mp is not None:
            if not isinstance(mp, dict) or set(mp) - {"param_dtype", "reduce_dtype", "output_dtype"}:
                problems.append("fsdp mixed_precision must be a mapping of param_dtype, reduce_dtype, output_dtype")
            else:
                problems += [f"fsdp mixed_precision.{k} must be one of {', '.join(_DTYPES)} (got {v!r})"
                             for k, v in mp.items() if v is not None and v not in _DTYPES]
        for key in ("activation_checkpointing", "reshard_after_forward"):
            if key in options and not isinstance(options[key], bool):
                problems.append(f"fsdp {key} must be true or false")
        units = options.get("shard_modules")
        if units is not None and not (isinstance(units, list) and units and all(isinstance(u, str) for u in units)):
            problems.append("fsdp shard_modules must be a non-empty list of module class names")
    elif name == "deepspeed":
        # options is the DeepSpeed config itself (zero_optimization, bf16, gradient_clipping, ...).
        stage = _zero_stage(options)
        if stage not in (1, 2, 3):
            problems.append(f"deepspeed zero_optimization.stage must be 1, 2 or 3 (got {stage!r}); "
                            "for plain data parallelism use strategy ddp")
        from importlib.util import find_spec

        if find_spec("deepspeed") is None:
            problems.append("strategy deepspeed needs the deepspeed package, which is not installed here: "
                            "pip install 'stalwart[deepspeed]'")
    return problems


def _deepspeed_own_groups(options: dict) -> list[str]:
    """The DeepSpeed options (of a deepspeed strategy's config) for which DeepSpeed makes process groups
    of its own beside the data-parallel one."""
    found = []
    if _number(options.get("sequence_parallel_size", 1)) > 1:
        found.append("sequence_parallel_size > 1")
    tp = options.get("tensor_parallel")
    if isinstance(tp, dict) and _number(tp.get("autotp_size", 1)) > 1:
        found.append("tensor_parallel.autotp_size > 1")
    return found


def _number(value) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 1


def _zero_stage(options: dict):
    """The ZeRO stage of a deepspeed strategy's options (DeepSpeed's config; stalwart's default 2)."""
    zero = options.get("zero_optimization", {})
    return zero.get("stage", 2) if isinstance(zero, dict) else None


# How a secret is written wherever it is not revealed: pydantic's rendering of a SecretStr.
MASK = "**********"
# The fields of a JobSpec that hold secrets, by path (see JobSpec.to_dict and JobSpec.secrets).
SECRET_FIELDS = ("checkpoint.s3.access_key_id", "checkpoint.s3.secret_access_key")


class S3Options(_Section):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; None means AWS")
    region: str | None = None
    access_key_id: SecretStr | None = Field(
        None, description="None (preferred): the standard AWS credential chain. A key given here is a secret: "
                          "masked in every output, never written to disk by stalwart")
    secret_access_key: SecretStr | None = None
    multipart_chunk_mb: int = Field(16, ge=5, le=5120)
    max_concurrency: int = Field(8, ge=1, le=64)
    retry_deadline_s: float = Field(60.0, gt=0, description="how long transient errors are retried before a save fails")

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _not_masked(cls, value: SecretStr | None) -> SecretStr | None:
        # A spec copied from `validate --json` or `status` carries the mask; taken as the key, it would
        # fail at the first upload with an unhelpful "access denied".
        if value is not None and value.get_secret_value() == MASK:
            raise ValueError(f"{MASK} is how stalwart prints a secret, not the secret itself; give the real "
                             "key, or leave out both keys and use the AWS credential chain")
        return value

    @model_validator(mode="after")
    def _pair(self) -> "S3Options":
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both access_key_id and secret_access_key, or neither")
        return self


Steps = Annotated[int, Field(ge=1)]


class CheckpointSpec(_Section):
    uri: str | None = Field(None, description="file:///dir, a plain path, s3://bucket/prefix, or a "
                                  "URI fsspec opens (gs://, az://, hf://, ...; fsspec+s3:// for S3 through s3fs)")
    every_steps: Steps | Literal["auto"] = Field(
        100, description="ctx.checkpoint(step) saves when step % every_steps == 0; auto: the interval that loses "
        "the least time (Young/Daly) from the measured save cost and the job's failure rate, chosen as it runs")
    keep_last: int = Field(3, ge=1, description="committed checkpoints kept, besides pinned ones")
    memory_every_steps: Steps | Literal["auto"] | None = Field(
        None, description="ctx.checkpoint(step) also keeps an in-memory snapshot every this many steps, "
        "replicated to a peer rank, which a restart restores from when the ranks' processes survive; "
        "auto: chosen as every_steps: auto is; None: off")
    auto_mtbf_s: float = Field(
        3600.0, gt=0, description="for the auto intervals: the mean time between failures assumed before the job "
        "has seen a fault (its own rate takes over as faults come)")
    memory_in_loop: bool = Field(
        False, description="with memory_every_steps and DDP, FSDP or DeepSpeed ZeRO 1/2 on CPU: the ranks that "
        "outlive a dead one stay in their training loop (and DDP's and FSDP's spares wait at their restore), so a "
        "recovery runs none of the survivors' set-up (stalwart averages DDP's gradients itself, at about plain "
        "DDP's cost per step, and gives FSDP and ZeRO a process group of its own; docs/BENCHMARKS.md)")
    s3: S3Options = Field(default_factory=S3Options)
    resume_from: str | None = Field(None, description="start from this committed checkpoint")
    init_from: str | None = Field(None, description="weights trained elsewhere (a torch.distributed.checkpoint folder "
                                  "or safetensors weights, a local path): the model starts from them at step 0, with a "
                                  "fresh optimizer, until the job has a checkpoint of its own")
    local_cache_dir: str | None = Field(None, description="node-local copies of the newest shards (for remote "
                                        "storage), so a restart on the same node reads no network; default: "
                                        "a folder under the system temp dir")

    @field_validator("every_steps", "memory_every_steps", mode="before")
    @classmethod
    def _steps_or_auto(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError("give a whole number of steps (1 or more), or auto")
        return value

    @field_validator("uri", "resume_from")
    @classmethod
    def _scheme(cls, uri: str | None) -> str | None:
        if uri is None:
            return None
        if "://" in uri and not uri.startswith(("file://", "s3://")):
            # gs://, az://, hf://, memory://, fsspec+s3://, ...: refused when this fsspec does not know the
            # protocol or its package is missing, as a tracker or deepspeed is (see _needs_extra).
            from stalwart.checkpointing.fsspec_storage import uri_problem

            problem = uri_problem(uri)
            if problem:
                raise ValueError(problem)
        if uri.startswith("s3://") and not uri[5:].split("/", 1)[0]:
            raise ValueError(f"{uri!r} names no bucket; use s3://bucket/prefix")
        return uri

    @field_validator("init_from")
    @classmethod
    def _local_weights(cls, path: str | None) -> str | None:
        if path is not None and "://" in path and not path.startswith("file://"):
            raise ValueError("init_from reads a local path (or file://) that every rank's node can see; "
                             "copy the weights there first")
        return path

    @model_validator(mode="after")
    def _one_start(self) -> "CheckpointSpec":
        if self.init_from and self.resume_from:
            raise ValueError("set resume_from (a stalwart checkpoint: weights, optimizer, step, data position) or "
                             "init_from (weights only, from step 0), not both")
        return self


# Restarts allowed per cause unless the spec says otherwise (a spec's budgets are laid over these).
# A preemption (SIGTERM to a rank, a draining node) is not the job's fault: it has a budget of its own,
# large, outside max_restarts, so that a spot job survives many of them while a loop that preempts
# every attempt (a node that SIGTERMs whatever starts on it) still ends.
DEFAULT_BUDGETS = {"node_failure": 5, "hang": 3, "nan": 3, "loss_spike": 3, "divergence": 3, "user_error": 0, "preemption": 100}


class FaultTolerance(_Section):
    max_restarts: int = Field(10, ge=0, description="global cap on restarts, all causes together but preemption")
    budgets: dict[Cause, int] = Field(
        default_factory=lambda: dict(DEFAULT_BUDGETS),
        description="restarts allowed per cause",
    )
    backoff_s: float = Field(1.0, ge=0, description="wait before the 2nd restart for a cause (the 1st is immediate); doubles after")
    max_backoff_s: float = Field(30.0, ge=0)
    hang_timeout_s: float | None = Field(None, gt=0, description="None: derived from the observed step time")
    resource_wait_s: float = Field(600.0, gt=0, description="how long a restart waits for resources")
    hang_floor_s: float = Field(60.0, gt=0, description="the least a derived hang timeout can be")
    elastic_wait_s: float = Field(30.0, ge=0, description="with resources.min_workers: how long a restart waits "
                                  "for the full gang before going on with fewer ranks")
    spike_detection: bool = Field(True, description="watch loss and grad norm for spikes")
    spike_warmup_steps: int = Field(50, ge=8, description="reports that only feed the statistics")
    trend_detection: bool = Field(True, description="watch for slow divergence: a loss creeping up over hundreds "
                                  "of steps while the grad norm grows (rolled back like a spike)")
    trend_warmup_steps: int = Field(200, ge=60, description="reports that only feed the trend detector's statistics "
                                    "(again after each restart)")
    skip_batches: int = Field(200, ge=0, description="after a NaN, spike or divergence, batches skipped past it")
    spike_escalation: Literal["lower_lr", "fail"] = Field(
        "lower_lr", description="when the same spike comes back after the skip")
    spike_lr_scale: float = Field(0.5, gt=0, le=1, description="the LR factor for lower_lr")
    straggler_factor: float = Field(1.5, gt=1, description="a rank this much slower than the others is a straggler")
    preemption_grace_s: float = Field(30.0, gt=0, description="after a SIGTERM to a rank or a drain of its node: "
                                      "how long the ranks have to agree on a step and commit an emergency "
                                      "checkpoint before the attempt is stopped")
    warm_spares: bool = Field(True, description="keep one idle rank process per rank, torch imported, for restarts "
                              "(CPU jobs; each holds the memory of a Python process with torch, no CPU or GPU)")

    @field_validator("budgets")
    @classmethod
    def _fill(cls, budgets: dict[str, int]) -> dict[str, int]:
        for cause, n in budgets.items():
            if n < 0:
                raise ValueError(f"budget for {cause} must be >= 0, got {n}")
        return {**DEFAULT_BUDGETS, **budgets}


def _local_dir(value: str | None) -> str | None:
    # Trackers run in the controller: a relative path would be relative to its working directory,
    # not to the user's, so only absolute ones are taken.
    if value is None:
        return None
    path = value.removeprefix("file://")
    if "://" in path:
        raise ValueError("not a local directory; use an absolute path or file:///dir")
    if not os.path.isabs(os.path.expanduser(path)):
        raise ValueError("relative; trackers run in the controller, whose working directory is not yours: "
                         "use an absolute path or file:///dir")
    return value


def _needs_extra(module: str, extra: str, what: str) -> None:
    # Checked where the spec is validated, like the deepspeed strategy: the controller imports it later.
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"the {what} tracker needs the {module} package, which is not installed here: "
                         f"pip install 'stalwart[{extra}]'")


_MLFLOW_SCHEMES = ("file", "http", "https", "databricks")
_MLFLOW_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")


class MlflowOptions(_Section):
    tracking_uri: str = Field(description="file:///dir (a local store) or an absolute path, http(s)://server, "
                              "databricks, or a database (sqlite:///abs/mlflow.db, postgresql://...; these need the "
                              "full mlflow package). Credentials go in the controller's environment "
                              "(MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), never here: specs are stored and shown")
    experiment: str = Field("stalwart", min_length=1, max_length=500, description="created if it does not exist")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, uri: str) -> str:
        scheme = uri.split("://", 1)[0] if "://" in uri else ("databricks" if uri == "databricks" else "file")
        if scheme == "file":
            _local_dir(uri)
        elif scheme in _MLFLOW_DATABASES:
            if importlib.util.find_spec("sqlalchemy") is None:
                raise ValueError(f"a {scheme} tracking store needs the full mlflow package (pip install mlflow); "
                                 "stalwart[mlflow] brings mlflow-skinny, which writes to file:///dir or a server")
        elif scheme not in _MLFLOW_SCHEMES:
            raise ValueError(f"unsupported tracking URI scheme {scheme!r}; use file:///dir, http(s)://server, "
                             f"databricks or one of {', '.join(_MLFLOW_DATABASES)}")
        return uri

    @model_validator(mode="after")
    def _no_credentials(self) -> "MlflowOptions":
        # A model-level check, so that the error quotes no input (a field's error would show the password).
        if "@" in self.tracking_uri.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("tracking_uri holds credentials (user:password@); specs are stored and shown, so put "
                             "them in MLFLOW_TRACKING_USERNAME/PASSWORD in the controller's environment")
        return self


class WandbOptions(_Section):
    project: str = Field("stalwart", min_length=1, max_length=128)
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="offline: files only, no network (upload later with `wandb sync DIR`). Online "
                              "needs WANDB_API_KEY (or `wandb login`) where the controller runs")
    dir: str | None = Field(None, description="where the run's local files go (absolute); default: the job's "
                            "folder in the state dir")

    @field_validator("dir")
    @classmethod
    def _dir(cls, value: str | None) -> str | None:
        return _local_dir(value)


class LRSchedule(_Section):
    """A run's LR schedule, stated in the spec, for the live forecast band when rank 0 sends none (it
    sends one by itself for a LambdaLR, or with `ctx.report_lr_schedule`). Relative to the peak."""

    kind: Literal["cosine", "wsd", "linear", "constant"] = Field(description="after the warmup: cosine or linear "
                                                                 "decay to min_ratio, wsd (constant, then a linear "
                                                                 "decay to min_ratio over decay_fraction), constant")
    steps: int = Field(ge=2, description="the run's last step")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 over these first steps")
    min_ratio: float = Field(0.0, ge=0, le=1, description="the LR at the last step, as a fraction of the peak")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: the share of the steps the final decay takes")

    @model_validator(mode="after")
    def _warmup_fits(self) -> "LRSchedule":
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        return self

    def lr_at(self, step: int) -> float:
        """The LR of `step` (1-based, as ctx.batches counts), relative to the peak."""
        if step <= self.warmup_steps:
            return step / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            decay_from = self.steps - self.decay_fraction * (self.steps - self.warmup_steps)
            if step <= decay_from:
                return 1.0
            progress = (step - decay_from) / max(self.steps - decay_from, 1e-12)
        else:
            progress = (step - self.warmup_steps) / (self.steps - self.warmup_steps)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_ratio + (1 - self.min_ratio) * shape

    def sampled(self, points: int = 4096) -> tuple[list[int], list[float]]:
        """(steps, lr) at up to `points` steps from 1 to `steps`, the kinks included (as a rank sends it)."""
        n = min(points, self.steps)
        picks = {1 + round(i * (self.steps - 1) / (n - 1)) for i in range(n)} | {self.warmup_steps + 1, self.steps}
        if self.kind == "wsd":
            picks.add(int(self.steps - self.decay_fraction * (self.steps - self.warmup_steps)))
        steps = sorted(s for s in picks if 1 <= s <= self.steps)
        return steps, [self.lr_at(s) for s in steps]


class Monitoring(_Section):
    report_interval_s: float = Field(0.5, gt=0, le=60, description="how often ranks ship reports")
    forecast_band: bool = Field(True, description="fit the curve law on the run's own first steps (with the LR "
                                "schedule rank 0 sends) and watch the loss against that forecast's band")
    forecast_fit_fraction: float = Field(0.2, gt=0, lt=1, description="the share of the run's steps the live "
                                         "forecast is fitted on")
    lr_schedule: LRSchedule | None = Field(None, description="the run's LR schedule for the live forecast, when "
                                           "rank 0 sends none (it does for a LambdaLR)")
    # Experiment trackers (stalwart.monitoring.sinks): the controller hands them every report and event.
    tensorboard: str | None = Field(None, description="a directory (absolute, or file:///dir): the job's event "
                                    "files go under DIR/<job id>")
    mlflow: MlflowOptions | None = Field(None, description="an MLflow run per job, in this store and experiment")
    wandb: WandbOptions | None = Field(None, description="a Weights & Biases run per job (its id is the job id)")

    # Each tracker is an optional extra: a spec naming one that is not installed is refused here.
    _TRACKER_EXTRAS: ClassVar[dict[str, tuple[str, str]]] = {
        "tensorboard": ("tensorboard", "TensorBoard"), "mlflow": ("mlflow", "MLflow"), "wandb": ("wandb", "W&B")}

    @field_validator("tensorboard", "mlflow", "wandb")
    @classmethod
    def _tracker(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            if info.field_name == "tensorboard":
                _local_dir(value)
            module, name = cls._TRACKER_EXTRAS[info.field_name]
            _needs_extra(module, module, name)
        return value


class Fault(_Section):
    """A fault to inject, so users rehearse recovery on their own jobs (e.g. kill rank 1 at step 40)."""

    kind: Literal["kill", "nan", "hang", "spike", "drift", "error", "slow"]
    step: int = Field(ge=1, description="the step at whose report the fault fires")
    rank: int = Field(0, ge=0)
    attempt: int = Field(1, ge=1, description="fires only in this attempt, so a restart does not repeat it")
    factor: float = Field(3.0, gt=1, description="spike: how much the reported loss is multiplied; drift: the "
                          "multiplier the loss creeps up to, linearly, over `length` steps (the grad norm: its 4th power)")
    length: int = Field(10, ge=1, description="spike, slow, drift: for how many steps")
    at: Literal["report", "snapshot"] = Field(
        "report", description="kill only: at the step's report, or while the step's in-memory snapshot is being "
        "copied to its peer (checkpoint.memory_every_steps)")

    @model_validator(mode="after")
    def _at(self) -> "Fault":
        if self.at == "snapshot" and self.kind != "kill":
            raise ValueError(f"at: snapshot is for kill faults (this one is {self.kind}); leave `at` out")
        return self

    @classmethod
    def parse(cls, text: str) -> "Fault":
        """`kind:key=value,...`, e.g. `kill:rank=1,step=40` (the CLI's --inject)."""
        kind, _, rest = text.partition(":")
        fields: dict[str, Any] = {"kind": kind.strip()}
        for part in filter(None, rest.split(",")):
            key, eq, value = part.partition("=")
            if not eq:
                raise SpecError([("faults", f"{part!r} in {text!r} is not key=value")])
            fields[key.strip()] = value.strip()
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise SpecError([(f"faults.{p}", m) for p, m in _problems(exc)]) from None


_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_ENTRYPOINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ScriptEntrypoint(_Section):
    """Script mode: a torchrun-style script run unmodified as `__main__` in every rank.

    The rank worker sets sys.argv and MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, and does not
    initialize torch.distributed: the script calls init_process_group itself, as under torchrun.
    """

    script: str = Field(description="path of the script, relative to workdir (the spec file's folder)")
    args: list[str] = Field(default_factory=list, description="its command-line arguments (sys.argv[1:])")

    @field_validator("script")
    @classmethod
    def _py(cls, script: str) -> str:
        if not script.strip():
            raise ValueError("script must name a Python file, e.g. train.py")
        return script

    @field_validator("args", mode="before")
    @classmethod
    def _strings(cls, args: Any) -> Any:
        # YAML turns `--steps 40` style values into ints and floats; argv is strings.
        if isinstance(args, list):
            return [a if isinstance(a, str) else str(a).lower() if isinstance(a, bool) else str(a) for a in args]
        return args

    def path(self, workdir: str | None) -> Path:
        path = Path(self.script).expanduser()
        return path if path.is_absolute() or workdir is None else Path(workdir) / path

    def __str__(self) -> str:
        return " ".join([self.script, *self.args])


class DataSpec(_Section):
    skip: list[tuple[int, int]] = Field(
        default_factory=list, description="global batch index ranges [start, end) never fed to the model")

    @field_validator("skip")
    @classmethod
    def _ranges(cls, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for start, end in ranges:
            if not 0 <= start < end:
                raise ValueError(f"skip range [{start}, {end}) must satisfy 0 <= start < end")
        return ranges


class JobSpec(_Section):
    name: str = Field(description="lower-case letters, digits, '.', '_' and '-'")
    entrypoint: str | ScriptEntrypoint = Field(
        description="module:function, called as function(ctx, config) in every rank; or {script: train.py, args: [...]}")
    config: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    strategy: Strategy = Field(default_factory=Strategy)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    fault_tolerance: FaultTolerance = Field(default_factory=FaultTolerance)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    data: DataSpec = Field(default_factory=DataSpec)
    workdir: str | None = Field(None, description="put on sys.path in every rank; default: the spec file's folder")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables for every rank")
    runtime_env: dict[str, Any] | None = Field(None, description="a Ray runtime_env for the rank workers")
    faults: list[Fault] = Field(default_factory=list, description="faults to inject (recovery rehearsal)")
    priority: int = Field(0, ge=-1000, le=1000, description="queue order while jobs wait for resources: higher "
                          "starts first, equal ones in submit order; a running job is never preempted")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(
                f"{name!r} is not a valid job name: use 1-63 lower-case letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return name

    @field_validator("entrypoint", mode="before")
    @classmethod
    def _entrypoint(cls, entrypoint: Any) -> Any:
        if isinstance(entrypoint, ScriptEntrypoint):
            return entrypoint
        if isinstance(entrypoint, dict):
            unknown = sorted(set(entrypoint) - {"script", "args"})
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} in the script entrypoint; "
                                 "expected {script: train.py, args: [...]}")
            if "script" not in entrypoint:
                raise ValueError("a script entrypoint needs `script`, e.g. {script: train.py, args: [--steps, '100']}")
            if not isinstance(entrypoint.get("args", []), list):
                raise ValueError("entrypoint args must be a list of strings, e.g. [--steps, '100']")
            try:
                return ScriptEntrypoint.model_validate(entrypoint)
            except ValidationError as exc:
                raise ValueError("; ".join(f"{p}: {m}" for p, m in _problems(exc))) from None
        if not isinstance(entrypoint, str):
            raise ValueError("expected module:function (e.g. train:main) or {script: train.py, args: [...]}")
        if not _ENTRYPOINT.match(entrypoint):
            hint = (f"; to run a script use entrypoint: {{script: {entrypoint}}}"
                    if entrypoint.endswith(".py") else "")
            raise ValueError(f"{entrypoint!r} is not of the form module:function (e.g. train:main){hint}")
        return entrypoint

    @property
    def script(self) -> ScriptEntrypoint | None:
        """The script entrypoint, or None for a module:function one."""
        return self.entrypoint if isinstance(self.entrypoint, ScriptEntrypoint) else None

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None, workdir: str | None = None) -> "JobSpec":
        if not isinstance(data, dict):
            raise SpecError([("", f"expected a mapping of fields, got {type(data).__name__}")], source)
        try:
            spec = cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(_problems(exc), source) from None
        if spec.workdir is None and workdir is not None:
            spec = spec.model_copy(update={"workdir": workdir})
        script = spec.script
        if script is not None and spec.checkpoint.memory_every_steps is not None:
            raise SpecError([("checkpoint.memory_every_steps", "in-memory snapshots need a module:function "
                              "entrypoint (a script sets up its own process group); remove it for script mode")],
                            source)
        if spec.checkpoint.memory_in_loop:
            if spec.checkpoint.memory_every_steps is None:
                raise SpecError([("checkpoint.memory_in_loop", "the ranks stay in their loop by restoring from the "
                                  "in-memory snapshots: set checkpoint.memory_every_steps (a number of steps or "
                                  "auto), or remove memory_in_loop")], source)
            if spec.strategy.name == "deepspeed" and _zero_stage(spec.strategy.options) == 3:
                raise SpecError([("checkpoint.memory_in_loop", "works with deepspeed ZeRO stages 1 and 2, not 3 "
                                  "(stage 3 builds its engine with barriers over every rank, which a rank joining "
                                  "peers in their loop cannot match): set strategy.options.zero_optimization.stage "
                                  "to 1 or 2, or remove memory_in_loop (the survivors then restore from the "
                                  "snapshots in a new call of your function)")], source)
            own_groups = _deepspeed_own_groups(spec.strategy.options) if spec.strategy.name == "deepspeed" else []
            if own_groups:
                raise SpecError([("checkpoint.memory_in_loop", f"works with deepspeed data parallelism alone, not "
                                  f"with {' or '.join(own_groups)} (DeepSpeed makes process groups of its own for "
                                  "them, which a rank joining peers in their loop cannot form alone): remove "
                                  "memory_in_loop, or those options")], source)
            if spec.resources.gpus_per_worker > 0:
                raise SpecError([("checkpoint.memory_in_loop", "is for CPU jobs for now (resources.gpus_per_worker "
                                  "> 0): remove memory_in_loop; the survivors then restore from the snapshots in a new call "
                                  "of your function")], source)
        for i, fault in enumerate(spec.faults):
            if fault.at == "snapshot" and spec.checkpoint.memory_every_steps is None:
                raise SpecError([(f"faults.{i}.at", "a fault at a snapshot needs checkpoint.memory_every_steps")],
                                source)
        if script is not None and not (spec.runtime_env or {}).get("working_dir"):
            path = script.path(spec.workdir)
            if (path.is_absolute() or spec.workdir is not None) and not path.is_file():
                raise SpecError([("entrypoint.script", f"no such file: {path}")], source)
        return spec

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "JobSpec":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SpecError([("", f"cannot read {path}: {exc.strerror or exc}")], str(path)) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise SpecError([("", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}")], str(path)) from None
        spec = cls.from_dict(data, source=str(path), workdir=str(path.resolve().parent))
        spec.check_entrypoint(str(path))
        return spec

    def check_entrypoint(self, source: str | None = None) -> None:
        """A misspelt module:function entrypoint fails at submit, not in every rank: the module is looked
        for where the ranks will (the workdir, when it is a folder on this machine, or this environment's
        packages), and its file read, not run, for the function. Raises SpecError when the module is
        missing and its name is a near miss of a file there (it may be installed on the cluster only), or
        when the file surely binds no such name. Says nothing when the code or its environment comes from
        elsewhere (runtime_env working_dir, py_modules, pip, conda, uv, a container, PYTHONPATH; a workdir
        on the cluster) or when the file is one this Python cannot read."""
        env = self.runtime_env or {}
        elsewhere = ("working_dir", "py_modules", "pip", "conda", "uv", "container", "image_uri", "py_executable")
        if (self.script is not None or not self.workdir or any(env.get(k) for k in elsewhere)
                or "PYTHONPATH" in (env.get("env_vars") or {})):
            return
        root = Path(self.workdir)
        if not root.is_dir():
            return
        module, function = self.entrypoint.split(":")
        parts = module.split(".")
        # A package folder before a module file of the same name, as Python's import takes them.
        for candidate in (root.joinpath(*parts, "__init__.py"), root.joinpath(*parts[:-1], parts[-1] + ".py")):
            if candidate.is_file():
                names, functions = _module_names(candidate, source)
                if names is not None and function not in names:
                    raise SpecError([("entrypoint", f"{candidate} defines no {function!r} (its functions: "
                                      f"{', '.join(sorted(functions)) or 'none'})")], source)
                return
        if (root / parts[0]).is_dir() or importlib.util.find_spec(parts[0]) is not None:
            return  # a package folder, or an installed module: the ranks' Python finds it as this one does
        # Not here: it may be installed where the ranks run only. A near miss of a file here is a typo.
        local = sorted(p.stem for p in root.glob("*.py"))
        near = difflib.get_close_matches(parts[0], local, n=1, cutoff=0.75)
        if near:
            raise SpecError([("entrypoint", f"no module {module!r} in {root}, where the ranks import it from, "
                              f"nor installed here: did you mean {near[0]!r}? (Python files there: "
                              f"{', '.join(p + '.py' for p in local)})")], source)

    # ---- serializing, and the secrets -----------------------------------------------------
    def to_dict(self, *, reveal_secrets: bool = False) -> dict[str, Any]:
        """The spec as JSON-able data. The secrets (SECRET_FIELDS) come out as MASK, so the result is safe
        to store and print; it is not a runnable spec when it holds any, because a masked value is refused
        as input (`with_secrets` puts them back).

        reveal_secrets=True gives the real values, only to hand the spec to the process that runs it
        (the client to the controller, the controller to the ranks, over Ray); never store or print it.
        """
        data = self.model_dump(mode="json")
        return self._put_secrets(data, self.secrets()) if reveal_secrets else data

    def secrets(self) -> dict[str, str]:
        """The secrets set in this spec, {field path: value} (e.g. checkpoint.s3.secret_access_key)."""
        found = {}
        for path in SECRET_FIELDS:
            value: Any = self
            for part in path.split("."):
                value = getattr(value, part)
            if value is not None:
                found[path] = value.get_secret_value()
        return found

    @classmethod
    def with_secrets(cls, data: dict[str, Any], secrets: dict[str, str]) -> "JobSpec":
        """The spec of `data`, a masked `to_dict()`, with the values of its `secrets()` put back.
        Raises SpecError when a masked field has no value in `secrets`."""
        data = cls._put_secrets(copy.deepcopy(data), secrets)
        missing = masked_secrets(data)
        if missing:
            raise SpecError([(", ".join(missing), "masked, and its value was not given")])
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(_problems(exc)) from None

    @staticmethod
    def _put_secrets(data: dict[str, Any], secrets: dict[str, str]) -> dict[str, Any]:
        for path, value in secrets.items():
            *parents, leaf = path.split(".")
            section = data
            for part in parents:
                section = section.setdefault(part, {})
            section[leaf] = value
        return data


def masked_secrets(data: dict[str, Any]) -> list[str]:
    """The SECRET_FIELDS that `data`, a spec as `JobSpec.to_dict()` gives it, holds masked."""
    masked = []
    for path in SECRET_FIELDS:
        value: Any = data
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value == MASK:
            masked.append(path)
    return masked


_SECRET_NAMES = {path.split(".")[-1] for path in SECRET_FIELDS}


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = _model_at(JobSpec, err["loc"][:-1])
            known = ", ".join(parent.model_fields) if parent else ""
            msg = f"unknown field; expected one of: {known}" if known else "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        secret = path.split(".")[-1] in _SECRET_NAMES  # a secret's value is never echoed, even a wrong one
        if (err["type"] not in ("extra_forbidden", "missing") and "input" in err
                and not isinstance(err["input"], dict) and not secret):
            msg = f"{msg} (got {err['input']!r})"
        problems.append((path, msg))
    return problems


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        # An optional section (`MlflowOptions | None`) is found among its union's members.
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _module_names(path: Path, source: str | None) -> tuple[set[str] | None, set[str]]:
    """The names a module file binds at its top level (functions, classes, assignments, loop and `with`
    targets, imports), read without running it, None when it could bind others or cannot be read here
    (a star import, `global`, `exec`/`setattr`/`globals()`/`vars()`/`sys.modules`, a `match`, a module
    `__getattr__`, syntax this Python does not parse); and the functions it defines."""
    import ast

    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return None, set()  # the ranks' Python may read what this one cannot: theirs to say
    names: set[str] = set()
    functions: set[str] = set()
    dynamic = False

    def visit(node: ast.AST) -> None:
        nonlocal dynamic
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(child.name)
                if not isinstance(child, ast.ClassDef):
                    functions.add(child.name)
                dynamic |= any(isinstance(n, ast.Global) for n in ast.walk(child))
                continue  # what a body binds is its own, but for `global`
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for alias in child.names:
                    dynamic |= alias.name == "*"
                    names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                names.add(child.id)
            elif isinstance(child, ast.ExceptHandler) and child.name:
                names.add(child.name)
            elif isinstance(child, (ast.Global, ast.Match)) or type(child).__name__ == "TryStar":
                dynamic = True
            elif isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id in (
                    "exec", "setattr", "globals", "vars", "__import__"):
                dynamic = True
            elif isinstance(child, ast.Attribute) and child.attr == "modules":
                dynamic = True  # sys.modules[__name__] and the like
            visit(child)

    visit(tree)
    if dynamic or "__getattr__" in names:
        return None, functions
    return names, functions
