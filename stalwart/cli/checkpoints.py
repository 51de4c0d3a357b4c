"""`stalwart checkpoints`: list, show, verify, delete and export committed checkpoints, by job id or URI."""

from __future__ import annotations

import json
from difflib import get_close_matches
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

from stalwart.cli.common import AddressOpt, JsonOpt, app, clock, console, err, fail, fmt, job_handle, print_json, reader
from stalwart.errors import StalwartError


class _ListByDefault(TyperGroup):
    """`stalwart checkpoints JOB` is `stalwart checkpoints list JOB`: what a user types first."""

    def resolve_command(self, ctx, args):
        first = args[0] if args else "-"
        # A near miss of a command (`lsit`) stays an unknown command, not a job id.
        if not first.startswith("-") and first not in self.commands and not get_close_matches(first, self.commands):
            args = ["list", *args]
        return super().resolve_command(ctx, args)


ckpt_app = typer.Typer(cls=_ListByDefault, no_args_is_help=True,
                       help="List, inspect, verify, delete and export committed checkpoints "
                            "(`stalwart checkpoints JOB` lists them).")
app.add_typer(ckpt_app, name="checkpoints")
WhereArg = typer.Argument(..., help="a job id, or a checkpoint URI (file:///dir, a path, s3://bucket/prefix)")
EndpointOpt = typer.Option(None, "--endpoint-url", envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint")


def _is_job_id(where: str) -> bool:
    return "://" not in where and "/" not in where


def _storage(where: str, address: Optional[str], endpoint_url: Optional[str]):
    from stalwart.checkpointing.engine import resolve
    from stalwart.spec import MASK, S3Options

    options = S3Options(endpoint_url=endpoint_url) if endpoint_url else None
    if _is_job_id(where):  # its records say where its checkpoints are
        job = job_handle(reader(address), where)
        where = job.status()["checkpoint_uri"]
        if options is None:
            # The spec's keys come back masked (they are never stored): the AWS credential chain reads instead.
            s3 = {k: v for k, v in job.spec()["checkpoint"]["s3"].items() if v != MASK}
            s3.pop("access_key_id", None), s3.pop("secret_access_key", None)
            options = S3Options.model_validate(s3)
    try:
        return resolve(where, options)
    except StalwartError as exc:
        fail(str(exc))


@ckpt_app.command("list")
def checkpoints_list(where: str = WhereArg, address: Optional[str] = AddressOpt,
                     endpoint_url: Optional[str] = EndpointOpt, as_json: bool = JsonOpt):
    """Saved checkpoints, newest first; only committed ones (with a manifest) can be loaded."""
    from stalwart.checkpointing.engine import describe

    try:
        with err.status("reading the checkpoints' manifests...") if not as_json and err.is_terminal else nullcontext():
            if _is_job_id(where) and endpoint_url is None:
                # Through the client: over --server the storage may be reachable from the cluster only.
                rows = job_handle(reader(address), where).client.checkpoints(where)
            else:
                rows = describe(_storage(where, address, endpoint_url)[0])
    except StalwartError as exc:
        fail(str(exc))
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    # The URI is what a user copies (--resume-from, export): folded onto more lines, never cut short.
    table = Table("step", "committed", "ranks", "size", "created", "loss", Column("uri", overflow="fold"))
    for r in rows:
        table.add_row(str(r["step"]), Text("yes", "green") if r["committed"] else Text(r.get("problem", "no"), "red"),
                      str(r.get("world_size", "-")), f"{r['bytes'] / 1e6:.1f} MB" if "bytes" in r else "-",
                      clock(r["created_at"]) if "created_at" in r else "-", fmt(r.get("loss")), r["uri"])
    console.print(table)


@ckpt_app.command("show")
def checkpoints_show(where: str = WhereArg, step: Optional[int] = typer.Argument(None, help="default: newest"),
                     address: Optional[str] = AddressOpt, endpoint_url: Optional[str] = EndpointOpt):
    """Print a checkpoint's manifest."""
    from stalwart.checkpointing.engine import committed_steps, read_manifest

    storage, named = _storage(where, address, endpoint_url)
    try:
        step = step if step is not None else named if named is not None else (committed_steps(storage) or [None])[0]
        if step is None:
            fail(f"no committed checkpoint under {storage.uri}")
        console.print_json(json.dumps(read_manifest(storage, step), default=str))
    except StalwartError as exc:
        fail(str(exc))


@ckpt_app.command("verify")
def checkpoints_verify(where: str = WhereArg, step: Optional[int] = typer.Argument(None, help="default: all"),
                       address: Optional[str] = AddressOpt, endpoint_url: Optional[str] = EndpointOpt,
                       as_json: bool = JsonOpt):
    """Stream every shard through its checksum (sizes and the index's too), with a bytes progress bar on
    a terminal; nothing is loaded into tensors. Exit 1 if any checkpoint fails."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from stalwart.checkpointing.engine import committed_steps, read_manifest, step_dir, verify
    from stalwart.errors import CheckpointCorrupt

    storage, named = _storage(where, address, endpoint_url)
    try:
        steps = [step] if step is not None else [named] if named is not None else committed_steps(storage)
    except StalwartError as exc:
        fail(str(exc))
    manifests: dict[int, dict | CheckpointCorrupt] = {}
    for s in steps:
        try:
            manifests[s] = read_manifest(storage, s)
        except CheckpointCorrupt as exc:
            manifests[s] = exc
    total = sum(sum(int(r["size"]) for r in m["shards"]) for m in manifests.values() if isinstance(m, dict))
    show = not as_json and err.is_terminal
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=err, transient=True, disable=not show)
    results = []
    with progress:
        task = progress.add_task("verifying", total=total)
        for s, manifest in manifests.items():
            uri = f"{storage.uri}/{step_dir(s)}"
            progress.update(task, description=f"step {s}")
            try:
                if isinstance(manifest, CheckpointCorrupt):
                    raise manifest
                verify(storage, s, manifest, on_bytes=lambda n: progress.advance(task, n))
                results.append({"step": s, "ok": True, "uri": uri})
                if not as_json:
                    progress.console.print(f"[green]ok[/]      step {s}")
            except CheckpointCorrupt as exc:
                results.append({"step": s, "ok": False, "uri": uri, "problem": str(exc.reason)})
                if not as_json:
                    progress.console.print(f"[red]corrupt[/] step {s}: {escape(str(exc.reason))}")
            except StalwartError as exc:
                fail(str(exc))
    if as_json:
        print_json(results)
    elif not steps:
        console.print(f"no committed checkpoint under {storage.uri}")
    raise typer.Exit(0 if all(r["ok"] for r in results) else 1)


@ckpt_app.command("delete")
def checkpoints_delete(where: str = WhereArg, step: int = typer.Argument(...),
                       yes: bool = typer.Option(False, "--yes", help="do not ask"),
                       address: Optional[str] = AddressOpt, endpoint_url: Optional[str] = EndpointOpt,
                       as_json: bool = JsonOpt):
    """Delete one checkpoint (manifest first, then its shards)."""
    from stalwart.checkpointing.engine import delete_checkpoint, step_dir

    storage, _ = _storage(where, address, endpoint_url)
    if not yes and not typer.confirm(f"delete {storage.uri}/{step_dir(step)}?"):
        raise typer.Exit(1)
    try:
        n = delete_checkpoint(storage, step)
    except StalwartError as exc:
        fail(str(exc))
    if as_json:
        print_json({"step": step, "uri": f"{storage.uri}/{step_dir(step)}", "deleted_objects": n})
    else:
        console.print(f"deleted {n} object(s) of step {step}" if n else f"nothing saved at step {step}")


@ckpt_app.command("export")
def checkpoints_export(where: str = WhereArg,
                       out: Path = typer.Argument(..., help="the folder to write (new or empty; --force replaces it)"),
                       fmt: str = typer.Option(..., "--format", help="dcp (torch.distributed.checkpoint: model and "
                                               "optimizer) or safetensors (the model's weights)"),
                       step: Optional[int] = typer.Option(None, "--step", help="default: the newest committed"),
                       force: bool = typer.Option(False, "--force", help="replace what the folder holds"),
                       max_shard_size: str = typer.Option("5GB", "--max-shard-size",
                                                          help="safetensors: split the weights into files of at most this"),
                       address: Optional[str] = AddressOpt, endpoint_url: Optional[str] = EndpointOpt,
                       as_json: bool = JsonOpt):
    """Write a committed checkpoint in a standard format: a torch.distributed.checkpoint folder
    ({"model", "optim"}, for dcp.load) or the model's weights as safetensors (with an index above
    --max-shard-size). Read offline; any strategy and world size."""
    from stalwart.checkpointing.formats import FORMATS, export, parse_size

    try:
        if fmt not in FORMATS:  # before anything is read
            fail(f"unknown format {fmt!r}; use --format dcp or --format safetensors")
        shard_bytes = parse_size(max_shard_size)
        storage, named = _storage(where, address, endpoint_url)
        summary = export(storage, step if step is not None else named, fmt, out, force=force,
                         max_shard_bytes=shard_bytes)
    except StalwartError as exc:
        fail(str(exc))
    if as_json:
        console.print_json(json.dumps(summary))
        return
    what = "model and optimizer" if summary["optimizer"] else "model weights"
    console.print(f"exported step {summary['step']} ({what}: {summary['tensors']} tensors, "
                  f"{summary['bytes'] / 1e6:.1f} MB) as {fmt} to {escape(str(out))}: {', '.join(summary['files'])}")
