"""Training loops shared by bench/recovery.py and bench/goodput.py (not a benchmark itself).

The same model, batches and optimizer run under stalwart (`stalwart_main`, a job entrypoint the
benchmarks submit with `workdir: bench/`) and under Ray Train's TorchTrainer (`raytrain_loop`).
Each rank appends one line per completed step to `config["stamps_dir"]/<side>-rank<r>.txt`:
`<step> <wall-clock ts> <pid>` (flushed at once), so a driver outside can see when a step finished
in which process, which pid to kill, and when the first step after a restore completed, for both
frameworks alike. The same file gets marks `start` (the function is entered), `prepared` (model
built and DDP-wrapped) and `restored` (checkpoint loaded; Ray Train also `downloaded` and
`torch_loaded`), from which the benchmarks split the recovery time.

The model is a stack of square Linear layers with AdamW (8 x 2048: 33.6M parameters, about 400 MB
of model + optimizer state once the Adam moments exist), trained as DDP over gloo on CPU with one
thread per rank (what stalwart's runner sets for cpus_per_worker: 1; set here for Ray Train too).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULTS = {"layers": 8, "dim": 2048, "batch_size": 8, "lr": 1e-4, "steps": 20, "every_steps": 5, "seed": 0,
            "sleep_s": 0.0}


def _cfg(config: dict) -> dict:
    return {**DEFAULTS, **(config or {})}


def build(c: dict):
    torch.manual_seed(c["seed"])  # the same initial weights on every rank
    layers = []
    for i in range(c["layers"]):
        layers.append(torch.nn.Linear(c["dim"], c["dim"]))
        if i < c["layers"] - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=0.01)
    return model, optimizer


def batch_at(c: dict, rank: int):
    def batch(index: int):
        g = torch.Generator().manual_seed(index * 1009 + rank)
        x = torch.randn(c["batch_size"], c["dim"], generator=g)
        return x, torch.tanh(x)

    return batch


def train_step(model, optimizer, x, y):
    loss = F.mse_loss(model(x), y)
    if hasattr(model, "zero_optimization_stage"):  # a DeepSpeed engine (strategy deepspeed) steps itself
        model.backward(loss)
        model.step()
        return loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


class Stamps:
    """`<step> <ts> <pid>` per completed step, appended and flushed (a few microseconds)."""

    def __init__(self, c: dict, side: str, rank: int):
        self.f = None
        if c.get("stamps_dir"):
            path = Path(c["stamps_dir"]) / f"{side}-rank{rank}.txt"
            self.f = open(path, "a", buffering=1)
            self.f.write(f"start {time.time()} {os.getpid()}\n")

    def step(self, step: int) -> None:
        self.mark(str(step))

    def mark(self, what: str) -> None:
        if self.f is not None:
            self.f.write(f"{what} {time.time()} {os.getpid()}\n")


def read_stamps(path: Path) -> list[tuple[str, float, int]]:
    """[(step or 'start', ts, pid)] from a stamps file (a torn last line is dropped)."""
    out = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        try:
            out.append((parts[0], float(parts[1]), int(parts[2])))
        except ValueError:
            continue
    return out


# ---- under stalwart ----------------------------------------------------------------------------
class RestoreProfile:
    """With config["stamps_dir"]: time the parts of ctx.restore() (wrapping stalwart's own functions for
    the duration) and write them to `restore-rank<r>-<pid>.json` there: every storage read (download),
    listing and shard parse, engine.load as a whole (download + checksum check + parse, shards in
    parallel), the whole restore, and after_load_s = the restore outside engine.load (listing the
    storage to find the newest step, load_state_dict, RNG, the ranks' agreement on the step)."""

    def __init__(self, c: dict, rank: int):
        self.dir = Path(c["stamps_dir"]) if c.get("stamps_dir") else None
        self.rank = rank
        self.calls: list[tuple[str, float, float]] = []
        self._undo: list = []

    def _wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        calls = self.calls

        def timed(*args, **kwargs):
            t0 = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                calls.append((label, t0, time.time()))

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def __enter__(self):
        if self.dir is None:
            return self
        from stalwart.checkpointing import engine, shards
        from stalwart.checkpointing.s3 import S3Storage

        self._wrap(S3Storage, "read", "storage_read")
        self._wrap(S3Storage, "list", "storage_list")
        self._wrap(shards, "parse", "parse")
        self._wrap(engine, "load", "engine_load")
        self.t0 = time.time()
        return self

    def __exit__(self, *exc):
        if self.dir is None:
            return False
        t1 = time.time()
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        import json

        def span(label):
            xs = [(a, b) for l, a, b in self.calls if l == label]
            return (max(b for _, b in xs) - min(a for a, _ in xs)) if xs else 0.0

        out = {"restore_s": t1 - self.t0, "engine_load_s": span("engine_load"),
               "download_wall_s": span("storage_read"), "list_s": sum(b - a for l, a, b in self.calls
                                                                       if l == "storage_list"),
               "parse_s": sum(b - a for l, a, b in self.calls if l == "parse"),
               "calls": [(l, a - self.t0, b - self.t0) for l, a, b in self.calls]}
        out["after_load_s"] = out["restore_s"] - sum(b - a for l, a, b in self.calls if l == "engine_load")
        (self.dir / f"restore-rank{self.rank}-{os.getpid()}.json").write_text(json.dumps(out))
        return False


def stalwart_main(ctx, config):
    c = _cfg(config)
    stamps = Stamps(c, "stalwart", ctx.rank)  # "start": the user function is entered
    torch.set_num_threads(1)
    model, optimizer = build(c)
    model, optimizer = ctx.prepare(model, optimizer)
    stamps.mark("prepared")
    with RestoreProfile(c, ctx.rank):
        ctx.restore()
    stamps.mark("restored")
    batch = batch_at(c, ctx.rank)
    for step, (x, y) in ctx.batches(batch, steps=c["steps"]):
        loss = train_step(model, optimizer, x, y)
        ctx.report(step, loss=loss.detach(), tokens=x.shape[0])
        ctx.checkpoint(step)
        stamps.step(step)
        if c["sleep_s"]:
            time.sleep(c["sleep_s"])
    return {"steps": c["steps"]}


# ---- under Ray Train (TorchTrainer, Ray 2.60 / Train v2) ------------------------------------------
def raytrain_loop(config: dict) -> None:
    """The same loop as Ray Train's docs write it: prepare_model (DDP), get_checkpoint() at the start,
    and every `every_steps` steps rank 0 torch.saves model + optimizer into a temp dir and every rank
    calls train.report (rank 0 with the checkpoint), which uploads it to the run's storage."""
    import tempfile

    import ray.train
    import ray.train.torch

    c = _cfg(config)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    stamps = Stamps(c, "raytrain", rank)  # "start": the train function is entered
    torch.set_num_threads(1)
    model, optimizer = build(c)
    model = ray.train.torch.prepare_model(model)
    stamps.mark("prepared")
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            stamps.mark("downloaded")
            state = torch.load(os.path.join(d, "state.pt"), weights_only=False)
            stamps.mark("torch_loaded")
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
    stamps.mark("restored")
    batch = batch_at(c, rank)
    for step in range(start + 1, c["steps"] + 1):
        x, y = batch(step - 1)
        loss = train_step(model, optimizer, x, y)
        if step % c["every_steps"] == 0:
            metrics = {"step": step, "loss": float(loss)}
            if rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                                "rng": torch.get_rng_state(), "step": step}, os.path.join(tmp, "state.pt"))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)
        stamps.step(step)
        if c["sleep_s"]:
            time.sleep(c["sleep_s"])


# ---- Ray Train's storage on rclone serve s3 ---------------------------------------------------------
def s3_filesystem(endpoint_host_port: str, access_key: str, secret_key: str):
    """A pyarrow filesystem for Ray Train's storage_filesystem: pyarrow's own S3FileSystem pointed at the
    server (endpoint_override), wrapped only so that create_dir is a no-op. rclone serve s3 refuses the
    nested directory-marker objects ('a/b/') that pyarrow's create_dir(recursive=True) writes; S3 needs
    no directories, so nothing is lost. Every read, write, listing and copy is pyarrow's S3 code.
    (Also set AWS_REQUEST_CHECKSUM_CALCULATION=when_required in the environment: rclone rejects the
    aws-chunked uploads that the AWS SDK in pyarrow sends by default.)"""
    import pyarrow.fs as pf

    s3 = pf.S3FileSystem(access_key=access_key, secret_key=secret_key, region="us-east-1",
                         endpoint_override=endpoint_host_port, scheme="http")
    return pf.PyFileSystem(NoDirMarkers(s3))


try:
    import pyarrow.fs as _pf

    class NoDirMarkers(_pf.FileSystemHandler):
        def __init__(self, fs):
            self.fs = fs

        def __reduce__(self):
            return (NoDirMarkers, (self.fs,))

        def __eq__(self, other):
            return isinstance(other, NoDirMarkers) and self.fs.equals(other.fs)

        def __ne__(self, other):
            return not self == other

        def get_type_name(self):
            return "s3-nodirmarkers"

        def normalize_path(self, path):
            return self.fs.normalize_path(path)

        def get_file_info(self, paths):
            return self.fs.get_file_info(paths)

        def get_file_info_selector(self, selector):
            return self.fs.get_file_info(selector)

        def create_dir(self, path, recursive):
            pass

        def delete_dir(self, path):
            self.fs.delete_dir(path)

        def delete_dir_contents(self, path, missing_dir_ok=False):
            self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self):
            self.fs.delete_dir_contents("/", accept_root_dir=True)

        def delete_file(self, path):
            self.fs.delete_file(path)

        def move(self, src, dest):
            self.fs.move(src, dest)

        def copy_file(self, src, dest):
            self.fs.copy_file(src, dest)

        def open_input_stream(self, path):
            return self.fs.open_input_stream(path)

        def open_input_file(self, path):
            return self.fs.open_input_file(path)

        def open_output_stream(self, path, metadata):
            return self.fs.open_output_stream(path, metadata=metadata)

        def open_append_stream(self, path, metadata):
            return self.fs.open_append_stream(path, metadata=metadata)
except ImportError:  # pyarrow is only needed for the Ray Train side
    pass
