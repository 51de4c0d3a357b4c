"""Reading back what the tracker sinks wrote, with each library's own reader (shared by the tracker tests)."""

from __future__ import annotations

import glob
import json
import struct
import time


def wandb_records(path: str) -> list:
    """The records of a W&B run file (run-<id>.wandb), parsed with W&B's own protobuf messages. W&B
    ships no reader of its own for it (its service, in Go, reads it), so the framing is read here: a
    LevelDB-style log, a 7-byte header (":W&B", a 2-byte magic, a version byte), then 32 KiB blocks of
    chunks, each behind a 7-byte header (checksum, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_run(root, run_id: str, runs: int = 1, timeout: float = 30.0) -> dict:
    """What the offline runs with this id under `root`/wandb hold, all folders together (one per
    controller that opened it): history rows, tags, the summary, and the run files read.

    Waits (up to `timeout` s) until `runs` files each end in W&B's exit record: `finish()` can return
    before W&B's service process has written a run's last records, which a loaded machine shows."""
    deadline = time.monotonic() + timeout
    while True:
        found = _wandb_run(root, run_id)
        if found["finished"] >= runs or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _wandb_run(root, run_id: str) -> dict:
    history, tags, summary, finished = [], set(), {}, 0
    files = sorted(glob.glob(f"{root}/wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "run":
                tags |= set(record.run.tags)
            elif kind == "summary":
                summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
            elif kind == "exit":
                finished += 1
    return {"files": files, "history": history, "tags": tags, "summary": summary, "finished": finished}


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)
