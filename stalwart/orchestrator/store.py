"""The controller's records: jobs, attempts and events in SQLite; logs and metrics as files per job.

Everything a restarted controller needs to carry on lives here. One connection, one lock: the
controller is a threaded actor and SQLite connections are not shared across threads safely.
`stored_status` and `stored_jobs` read a job's figures from here alone (no Ray), so that another
process can show them with `Store(home, readonly=True)` while the controller runs, or after it ended.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from stalwart.errors import JobNotFound

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL, attempt INTEGER NOT NULL, world_size INTEGER, started REAL, ended REAL,
    cause TEXT, error TEXT, start_checkpoint TEXT, PRIMARY KEY (job_id, attempt)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, ts REAL NOT NULL, kind TEXT NOT NULL,
    attempt INTEGER, message TEXT NOT NULL, data TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
"""


def _dumps(data: Any) -> str:
    return json.dumps(data, default=str, allow_nan=True)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Store:
    """The controller's store, or with `readonly` another process's view of it: that creates no file
    or folder and writes nothing (WAL lets it read while the controller writes). A read-only store
    raises FileNotFoundError where the controller never ran."""

    def __init__(self, home: str | Path, *, readonly: bool = False):
        self.home = Path(home).expanduser()
        self.readonly = readonly
        self._lock = threading.Lock()
        db = self.home / "controller.db"
        if readonly:
            if not db.is_file():
                raise FileNotFoundError(f"no stalwart state in {self.home} (no controller.db)")
            self._db = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None)
            return
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "jobs").mkdir(exist_ok=True)
        self._db = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    # ---- jobs -------------------------------------------------------------------------
    def add_job(self, job_id: str, name: str, spec: dict, state: str, detail: dict) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?)",
                             (job_id, name, _dumps(spec), state, _dumps(detail), now, now))

    def set_state(self, job_id: str, state: str, detail: dict) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state=?, detail=?, updated=? WHERE id=?",
                             (state, _dumps(detail), time.time(), job_id))

    def update_detail(self, job_id: str, **fields: Any) -> None:
        """Merge `fields` into a job's detail, leaving its state as it is."""
        with self._lock:
            row = self._db.execute("SELECT detail FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is not None:
                self._db.execute("UPDATE jobs SET detail=? WHERE id=?", (_dumps({**json.loads(row[0]), **fields}), job_id))

    def job(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT id,name,spec,state,detail,created,updated FROM jobs WHERE id=?",
                                   (job_id,)).fetchone()
        return _job_row(row) if row else None

    def jobs(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT id,name,spec,state,detail,created,updated FROM jobs ORDER BY created").fetchall()
        return [_job_row(r) for r in rows]

    # ---- attempts ---------------------------------------------------------------------
    def start_attempt(self, job_id: str, attempt: int, world_size: int, start_checkpoint: str | None) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO attempts VALUES (?,?,?,?,?,?,?,?)",
                             (job_id, attempt, world_size, time.time(), None, None, None, start_checkpoint))

    def end_attempt(self, job_id: str, attempt: int, cause: str, error: str = "") -> None:
        with self._lock:
            self._db.execute("UPDATE attempts SET ended=?, cause=?, error=? WHERE job_id=? AND attempt=? AND ended IS NULL",
                             (time.time(), cause, error, job_id, attempt))

    def attempts(self, job_id: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT attempt,world_size,started,ended,cause,error,start_checkpoint FROM attempts "
                                    "WHERE job_id=? ORDER BY attempt", (job_id,)).fetchall()
        keys = ("attempt", "world_size", "started", "ended", "cause", "error", "start_checkpoint")
        return [dict(zip(keys, r)) for r in rows]

    # ---- events -----------------------------------------------------------------------
    def add_event(self, job_id: str, kind: str, message: str, attempt: int | None = None, **data: Any) -> dict:
        ts = data.pop("ts", None) or time.time()
        clean = {k: _clean(v) for k, v in data.items()}
        with self._lock:
            cur = self._db.execute("INSERT INTO events (job_id,ts,kind,attempt,message,data) VALUES (?,?,?,?,?,?)",
                                   (job_id, ts, kind, attempt, message, _dumps(clean)))
        return {"seq": cur.lastrowid, "job_id": job_id, "ts": ts, "kind": kind, "attempt": attempt,
                "message": message, "data": clean}

    def events(self, job_id: str, since: int = 0, limit: int = 1000) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT seq,ts,kind,attempt,message,data FROM events WHERE job_id=? AND seq>? "
                                    "ORDER BY seq LIMIT ?", (job_id, since, limit)).fetchall()
        return [{"seq": s, "ts": ts, "kind": k, "attempt": a, "message": m, "data": json.loads(d)}
                for s, ts, k, a, m, d in rows]

    # ---- files ------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        path = self.home / "jobs" / job_id
        if not self.readonly:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "output.log"

    def append_log(self, job_id: str, lines: list[str]) -> None:
        with open(self.log_path(job_id), "a", encoding="utf-8", errors="replace") as f:
            f.writelines(lines)

    def read_log(self, job_id: str, offset: int = 0, limit: int = 1 << 20) -> tuple[str, int]:
        path = self.log_path(job_id)
        if not path.exists():
            return "", offset
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
        return data.decode("utf-8", errors="replace"), offset + len(data)

    def append_metrics(self, job_id: str, records: list[dict]) -> None:
        with open(self.job_dir(job_id) / "metrics.jsonl", "a") as f:
            for r in records:
                f.write(_dumps(r) + "\n")

    def read_metrics(self, job_id: str) -> list[dict]:
        path = self.job_dir(job_id) / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# What a job listing shows of each job, besides its id, name, state and times.
SUMMARY_KEYS = ("reason", "priority", "step", "max_steps", "loss", "tokens_per_s", "attempt", "restarts")


def stored_status(store: Store, job_id: str) -> dict:
    """A job's status as the store has it: state, reason, attempts, and the figures its supervisor
    last saved (step, loss, last checkpoint...). A live supervisor's figures are newer. Raises JobNotFound."""
    job = store.job(job_id)
    if job is None:
        raise JobNotFound(job_id)
    return {"checkpoint_uri": None, **_flatten(job), "log_path": str(store.log_path(job_id)),
            "attempts": store.attempts(job_id)}


def stored_jobs(store: Store) -> list[dict]:
    """Every job, oldest first: id, name, state, times and the SUMMARY_KEYS (None where not known)."""
    rows = []
    for job in store.jobs():
        flat = _flatten(job)
        rows.append({k: flat.get(k) for k in ("id", "name", "state", "created", "updated", *SUMMARY_KEYS)})
    return rows


def _flatten(job: dict) -> dict:
    """A job's record as one level: its state and times, the figures saved under detail["stats"], the
    rest of its detail (reason, attempt, checkpoint_uri, a failure's cause...), and its priority."""
    detail = dict(job["detail"])
    stats = detail.pop("stats", None) or {}
    return {**{k: job[k] for k in ("id", "name", "state", "created", "updated")}, **stats, **detail,
            "priority": job["spec"].get("priority", 0)}


def _job_row(row) -> dict:
    job_id, name, spec, state, detail, created, updated = row
    return {"id": job_id, "name": name, "spec": json.loads(spec), "state": state, "detail": json.loads(detail),
            "created": created, "updated": updated}
