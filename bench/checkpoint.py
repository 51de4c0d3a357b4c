"""Benchmark: asynchronous checkpoints (CheckpointEngine) against plain synchronous saves.

Prints ONE JSON line. Run from the repository root:
    python bench/checkpoint.py            # ~400 MB of state (model + AdamW), 7 repetitions
    python bench/checkpoint.py --big      # ~2 GB of state, 3 repetitions (needs ~14 GB of free RAM)
    python bench/checkpoint.py --quick    # ~400 MB, 2 repetitions

Set-up: two rank processes (torch.multiprocessing.spawn) in a gloo world of 2, each holding the
same replicated state, as DDP ranks do: a stack of square Linear layers (8 x 2048 for ~400 MB,
10 x 4096 for ~2 GB) and AdamW after one step (params + exp_avg + exp_avg_sq = 3x the parameter
bytes), saved as ctx.checkpoint saves it: {"model": state_dict, "optimizer": state_dict} plus the
RNG states. stalwart splits the replicated tensors so each rank writes about half the bytes; every
baseline below handles exactly the same tensors per rank (its half, via shards.assign), so the
bytes compared are the same. Both ranks run each phase at the same time (a barrier before each),
as they would in training, and a phase's time is the slower rank's. Each backend is measured in
turn: a local directory (temp dir) and an S3 server (`rclone serve s3` from tests/s3server.py on
127.0.0.1, its data in a temp dir on the same disk). Every repetition runs the phases below: memcpy,
sync, then engine next to upload and restore next to plain load, the stalwart phase of each pair
first in even repetitions and second in odd ones (this disk slows a write that follows other big
writes: each side of a pair follows the other equally often). Before each timed phase both ranks
call os.sync() (untimed: no phase pays for another's page-cache writeback) and meet at a barrier:

  memcpy     bare memory copy of this rank's tensors: torch.empty_like(t).copy_(t) for each
             (also recorded: copy into buffers allocated beforehand, as the engine's reused ones)
  sync       synchronous save in the loop: state_dict(), torch.save of this rank's tensors to a
             BytesIO, then write+fsync to a file / boto3 upload_fileobj to the server
  engine     CheckpointEngine.save() (timed: the training stall), then wait() for the background
             write and commit; SaveResult gives bytes and write_s; peak RSS is tracked (VmHWM)
  upload     plain write of the same bytes: boto3 upload_file of the sync phase's file (put on local
             disk beforehand) / write+fsync of the bytes from memory
  restore    engine.load(storage, step, rank): every shard read, checksummed, parsed
  plain load boto3 download_fileobj + torch.load of both ranks' sync-phase objects / torch.load of
             both files

The engine's first save (buffer allocation) is a separate, untimed-for-the-median warm-up whose
stall and memory are reported on their own. Figures are medians over repetitions.

Targets: (a) stall <= 1/20 of the synchronous save and <= 1.5x the bare memory copy;
(b) background throughput (bytes / write_s) >= 0.9x plain upload; (c) restore <= 1.1x plain
download + torch.load; (d) extra host memory per rank <= 1.1x the state size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, median, note, ratio  # noqa: E402

MB = 1 << 20


# ---- inside each rank ---------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss() -> int:
    return _status_kb("VmRSS") * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def peak() -> int:
    return _status_kb("VmHWM") * 1024


def build_state(layers: int, dim: int):
    import torch

    torch.manual_seed(0)  # the same replicated state on every rank
    model = torch.nn.Sequential(*[torch.nn.Linear(dim, dim) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # materialise exp_avg, exp_avg_sq
    opt.zero_grad(set_to_none=True)
    return model, opt


def s3_client(endpoint: str):
    import boto3
    from botocore.config import Config

    from s3server import ACCESS_KEY, SECRET_KEY

    # Plain boto3 with its default transfer settings; path-style and no CRC trailers, which rclone needs.
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"))


def rank_main(rank: int, world: int, port: int, cfg: dict) -> None:
    import torch
    import torch.distributed as dist

    from stalwart.checkpointing import engine as ckpt
    from stalwart.checkpointing import shards
    from stalwart.checkpointing.storage import open_storage
    from stalwart.launchers.context import _rng_state
    from stalwart.spec import S3Options

    torch.set_num_threads(1)  # as stalwart's runner does for cpus_per_worker: 1
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(backend="gloo")  # the engine's own group, as the runner makes it
    model, opt = build_state(cfg["layers"], cfg["dim"])

    def state():
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": None}

    tensors, _ = shards.flatten(state())
    state_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    owner = shards.assign({p: t.numel() * t.element_size() for p, t in tensors.items()}, world)
    my_paths = [p for p in tensors if owner[p] == rank]

    def mine(st):
        flat, _ = shards.flatten(st)
        return {p: flat[p] for p in my_paths}

    share_bytes = sum(t.numel() * t.element_size() for t in mine(state()).values())
    workdir = Path(cfg["tmp"]) / f"rank{rank}"
    workdir.mkdir(parents=True, exist_ok=True)
    results = {"rank": rank, "state_bytes": state_bytes, "share_bytes": share_bytes, "backends": {}}

    def barrier():
        dist.barrier()

    for backend in cfg["backends"]:
        if backend == "s3":
            uri = f"s3://{cfg['bucket']}/engine-{cfg['run']}"
            options = S3Options(endpoint_url=cfg["endpoint"], region="us-east-1",
                                access_key_id=cfg["access_key"], secret_access_key=cfg["secret_key"])
            storage = open_storage(uri, options)
            client = s3_client(cfg["endpoint"])
        else:
            root = Path(cfg["tmp"]) / "engine-file"
            storage = open_storage(str(root))
            client = None
        engine = ckpt.CheckpointEngine(storage, rank=rank, world_size=world, group=group, keep_last=2,
                                       job_id="bench", attempt=1)
        out = {"reps": []}

        # Warm-up: the engine's first save allocates its host buffer; its stall and memory are reported apart.
        barrier()
        reset_peak()
        before = rss()
        t0 = time.perf_counter()
        engine.save(1, state(), local={"rng": _rng_state()}, meta={"data": {"position": 1, "skip": []}})
        first_stall = time.perf_counter() - t0
        res = engine.wait()
        out["first_save"] = {"stall_s": first_stall, "write_s": res.write_s, "bytes": res.bytes,
                             "committed": res.committed, "extra_rss_bytes": peak() - before,
                             "snapshot_bytes": engine.snapshot_bytes}

        for rep in range(cfg["reps"]):
            r = {}
            step = 100 * (rep + 1)
            key = f"sync-{cfg['run']}/{step}/rank{rank}.pt"
            path = workdir / f"sync-{step}.pt"
            held = {}  # the sync phase's serialized bytes, for the plain upload phase

            def settle():
                # Untimed, before every timed phase: flush what earlier phases left dirty in the page
                # cache (so no phase pays for another's writeback in its fsync) and start together.
                os.sync()
                barrier()

            def phase_memcpy():
                # The bare copy of the same bytes, fresh allocations (empty_like + copy_) ...
                settle()
                t0 = time.perf_counter()
                copies = [torch.empty_like(t).copy_(t) for t in mine(state()).values()]
                r["memcpy_s"] = time.perf_counter() - t0
                # ... and into the same buffers again (pages already mapped, as the engine's reused buffer).
                settle()
                t0 = time.perf_counter()
                for c, t in zip(copies, mine(state()).values()):
                    c.copy_(t)
                r["memcpy_reused_s"] = time.perf_counter() - t0

            def phase_sync():
                # What a loop without stalwart blocks for: serialize, then write or upload.
                settle()
                t0 = time.perf_counter()
                buf = io.BytesIO()
                torch.save(mine(state()), buf)
                if client is not None:
                    buf.seek(0)
                    client.upload_fileobj(buf, cfg["bucket"], key)
                else:
                    with open(path, "wb") as f:
                        f.write(buf.getbuffer())
                        f.flush()
                        os.fsync(f.fileno())
                r["sync_s"] = time.perf_counter() - t0
                r["sync_bytes"] = buf.getbuffer().nbytes
                if client is not None:
                    with open(path, "wb") as f:  # untimed: the file the plain upload_file baseline sends
                        f.write(buf.getbuffer())
                held["blob"] = buf

            def phase_upload():
                # Plain write of the same bytes: boto3 upload_file / write + fsync from memory.
                settle()
                blob = held.pop("blob")
                t0 = time.perf_counter()
                if client is not None:
                    client.upload_file(str(path), cfg["bucket"], f"plain-{cfg['run']}/{step}/rank{rank}.pt")
                else:
                    with open(workdir / f"plain-{step}.bin", "wb") as f:
                        f.write(blob.getbuffer())
                        f.flush()
                        os.fsync(f.fileno())
                r["upload_s"] = time.perf_counter() - t0
                r["upload_bytes"] = blob.getbuffer().nbytes

            def phase_plain_load():
                # Plain restore: download + torch.load of both ranks' sync-phase objects.
                settle()
                reset_peak()
                before = rss()
                t0 = time.perf_counter()
                for other in range(world):
                    if client is not None:
                        b = io.BytesIO()
                        client.download_fileobj(cfg["bucket"], f"sync-{cfg['run']}/{step}/rank{other}.pt", b)
                        b.seek(0)
                        obj = torch.load(b, map_location="cpu", weights_only=True)
                        del b
                    else:
                        obj = torch.load(Path(cfg["tmp"]) / f"rank{other}" / f"sync-{step}.pt", map_location="cpu",
                                         weights_only=True)
                    del obj
                r["plain_load_s"] = time.perf_counter() - t0
                r["plain_load_extra_rss_bytes"] = peak() - before

            def phase_engine():
                # The training stall of CheckpointEngine.save(), then the background write and commit.
                settle()
                reset_peak()
                before = rss()
                t0 = time.perf_counter()
                engine.save(step, state(), local={"rng": _rng_state()},
                            meta={"data": {"position": step, "skip": []}})
                r["stall_s"] = time.perf_counter() - t0
                res = engine.wait()
                r["extra_rss_bytes"] = peak() - before
                r.update(write_s=res.write_s, bytes=res.bytes, committed=res.committed, error=res.error)
                if not res.committed:
                    print(f"[rank {rank}] {backend} step {step}: save not committed: {res.error}", file=sys.stderr,
                          flush=True)

            def phase_restore():
                settle()
                # Every rank must skip together (the barriers): ask whether the manifest exists.
                if not storage.exists(f"{ckpt.step_dir(step)}/{ckpt.MANIFEST}"):
                    r.update(restore_s=None, restore_extra_rss_bytes=None, restore_ok=False)
                    return
                reset_peak()
                before = rss()
                t0 = time.perf_counter()
                loaded = ckpt.load(storage, step, rank)
                r["restore_s"] = time.perf_counter() - t0
                r["restore_extra_rss_bytes"] = peak() - before
                r["restore_ok"] = loaded.step == step
                del loaded

            # Each stalwart phase runs next to its baseline, which of the two goes first alternating:
            # this disk slows a write that follows other big writes, so a fixed order would charge one
            # side for the other's writeback (the sync phase, which makes the baseline's bytes, is first).
            pairs = [(phase_engine, phase_upload), (phase_restore, phase_plain_load)]
            for phase in [phase_memcpy, phase_sync, *(p for pair in pairs for p in (pair if rep % 2 == 0 else pair[::-1]))]:
                phase()
            r["order"] = "engine first" if rep % 2 == 0 else "plain first"

            # Tidy up this repetition's baseline objects and files (the engine applies its own retention).
            barrier()
            for p in workdir.glob("*"):
                p.unlink()
            if client is not None and rank == 0:
                for prefix in (f"sync-{cfg['run']}/{step}/", f"plain-{cfg['run']}/{step}/"):
                    keys = [{"Key": o["Key"]} for o in client.list_objects_v2(
                        Bucket=cfg["bucket"], Prefix=prefix).get("Contents", [])]
                    if keys:
                        client.delete_objects(Bucket=cfg["bucket"], Delete={"Objects": keys})
            out["reps"].append(r)
            print(f"[rank {rank}] {backend} rep {rep}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)), file=sys.stderr, flush=True)
        results["backends"][backend] = out
        del engine
        barrier()

    with open(Path(cfg["tmp"]) / f"result-{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


# ---- the driver -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(backend: str, ranks: list[dict]) -> dict:
    """Per repetition the slower rank's time (aggregate bytes over it for throughputs), then medians."""
    reps = list(zip(*[r["backends"][backend]["reps"] for r in ranks]))

    def ok(rep, *keys):
        return all(x.get(k) is not None for x in rep for k in keys)

    def slowest(key):
        return median([max(x[key] for x in rep) for rep in reps if ok(rep, key)])

    def throughput(bytes_key, time_key):
        return median([sum(x[bytes_key] for x in rep) / max(x[time_key] for x in rep) for rep in reps
                       if ok(rep, bytes_key, time_key) and (time_key != "write_s" or all(x["committed"] for x in rep))])

    first = [r["backends"][backend]["first_save"] for r in ranks]
    state_bytes = ranks[0]["state_bytes"]
    share = max(r["share_bytes"] for r in ranks)
    stall, sync, memcpy = slowest("stall_s"), slowest("sync_s"), slowest("memcpy_s")
    tput, plain_tput = throughput("bytes", "write_s"), throughput("upload_bytes", "upload_s")
    # Per repetition (the two ran back to back, each first in every other repetition): robust to
    # this disk's slow spells, which last longer than one phase.
    tput_pairs = median([(sum(x["bytes"] for x in rep) / max(x["write_s"] for x in rep))
                         / (sum(x["upload_bytes"] for x in rep) / max(x["upload_s"] for x in rep))
                         for rep in reps if ok(rep, "write_s", "upload_s") and all(x["committed"] for x in rep)])
    restore, plain_load = slowest("restore_s"), slowest("plain_load_s")
    extra_first = max(f["extra_rss_bytes"] for f in first)
    extra_steady = slowest("extra_rss_bytes")
    return {
        "stall_ms": stall * 1000, "sync_save_ms": sync * 1000, "memcpy_ms": memcpy * 1000,
        "memcpy_reused_ms": slowest("memcpy_reused_s") * 1000,
        "stall_over_sync": ratio(stall, sync), "stall_over_memcpy": ratio(stall, memcpy),
        "first_save_stall_ms": max(f["stall_s"] for f in first) * 1000,
        "write_MBps": tput / MB, "plain_upload_MBps": plain_tput / MB, "write_over_plain": ratio(tput, plain_tput),
        "write_over_plain_median_of_reps": round(tput_pairs, 4),
        "write_s": slowest("write_s"), "plain_upload_s": slowest("upload_s"),
        "restore_s": restore, "plain_load_s": plain_load, "restore_over_plain": ratio(restore, plain_load),
        "extra_mem_first_save_MB": extra_first / MB, "extra_mem_steady_save_MB": extra_steady / MB,
        "snapshot_MB": max(f["snapshot_bytes"] for f in first) / MB,
        "extra_mem_over_state": ratio(extra_first, state_bytes), "extra_mem_over_share": ratio(extra_first, share),
        "restore_extra_mem_MB": slowest("restore_extra_rss_bytes") / MB,
        "plain_load_extra_mem_MB": slowest("plain_load_extra_rss_bytes") / MB,
        "all_committed": all(x["committed"] for rep in reps for x in rep) and all(f["committed"] for f in first),
        "errors": sorted({x["error"] for rep in reps for x in rep if x.get("error")}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", action="store_true", help="~2 GB of state instead of ~400 MB")
    ap.add_argument("--quick", action="store_true", help="2 repetitions")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--backends", default="file,s3")
    args = ap.parse_args()
    layers, dim = (10, 4096) if args.big else (8, 2048)
    reps = args.reps or (2 if args.quick else (3 if args.big else 7))
    backends = [b for b in args.backends.split(",") if b]

    import torch.multiprocessing as mp

    from s3server import ACCESS_KEY, SECRET_KEY, S3Server

    tmp = Path(tempfile.mkdtemp(prefix="stalwart-bench-ckpt-"))
    server = S3Server(bucket="bench") if "s3" in backends else None
    try:
        if server is not None:
            server.start()
        cfg = {"layers": layers, "dim": dim, "reps": reps, "backends": backends, "tmp": str(tmp),
               "run": f"{int(time.time())}", "bucket": "bench",
               "endpoint": server.endpoint_url if server else None, "access_key": ACCESS_KEY, "secret_key": SECRET_KEY}
        note(f"state: {layers} x Linear({dim}, {dim}) + AdamW; {reps} repetitions; backends {backends}; tmp {tmp}")
        mp.spawn(rank_main, args=(2, free_port(), cfg), nprocs=2, join=True)
        ranks = [json.loads((tmp / f"result-{r}.json").read_text()) for r in range(2)]
    finally:
        if server is not None:
            server.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    per = {b: summarize(b, ranks) for b in backends}
    state_mb = ranks[0]["state_bytes"] / MB
    targets = {
        "stall_over_sync": ("<= 0.05", lambda s: s["stall_over_sync"] <= 0.05),
        "stall_over_memcpy": ("<= 1.5", lambda s: s["stall_over_memcpy"] <= 1.5),
        "write_over_plain": (">= 0.9", lambda s: s["write_over_plain"] >= 0.9),
        "restore_over_plain": ("<= 1.1", lambda s: s["restore_over_plain"] <= 1.1),
        "extra_mem_over_state": ("<= 1.1", lambda s: s["extra_mem_over_state"] <= 1.1),
    }
    emit({
        "benchmark": "checkpoint",
        "state_MB": state_mb, "share_MB_per_rank": max(r["share_bytes"] for r in ranks) / MB,
        "figure": {b: {k: per[b][k] for k in ("stall_ms", "write_MBps", "restore_s", "extra_mem_first_save_MB")}
                   for b in backends},
        "baseline": {b: {k: per[b][k] for k in ("sync_save_ms", "memcpy_ms", "plain_upload_MBps", "plain_load_s")}
                     for b in backends},
        "ratio": {b: {k: per[b][k] for k in targets} for b in backends},
        "target": {k: v[0] for k, v in targets.items()},
        "met": {b: {k: per[b][k] is not None and bool(v[1](per[b])) for k, v in targets.items()} for b in backends},
        "detail": per,
        "repetitions": reps,
        "setup": "2 rank processes (mp.spawn), gloo world of 2, replicated state, 1 torch thread each; "
                 "local dir + rclone serve s3 on 127.0.0.1",
    })


if __name__ == "__main__":
    main()
