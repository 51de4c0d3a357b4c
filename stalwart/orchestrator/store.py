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
from typing import TYPE_CHECKING, Any

from stalwart.errors import JobNotFound
from stalwart.monitoring.goodput import Ledger
from stalwart.orchestrator.states import TERMINAL_STATES

if TYPE_CHECKING:
    from stalwart.monitoring.sinks import Trackers

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, updated REAL NOT NULL, submission_id TEXT
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
        # Durable when the controller's process dies (what Ray restarts it from); an OS crash or power loss
        # may take the last transactions, with the whole head node. FULL would sync the disk on every
        # commit: ~2 ms here, eight of them per submitted job, all under the store's one lock.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        # A store written before submissions carried ids gets the column (NULL for its jobs).
        if "submission_id" not in {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}:
            self._db.execute("ALTER TABLE jobs ADD COLUMN submission_id TEXT")
        self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS jobs_submission ON jobs (submission_id)")

    # ---- jobs -------------------------------------------------------------------------
    def add_job(self, job_id: str, name: str, spec: dict, state: str, detail: dict,
                submission_id: str | None = None) -> None:
        """Record a new job. A `submission_id` is unique: a second job with the same one raises
        sqlite3.IntegrityError and is not recorded."""
        now = time.time()
        with self._lock:
            self._db.execute("INSERT INTO jobs (id,name,spec,state,detail,created,updated,submission_id) "
                             "VALUES (?,?,?,?,?,?,?,?)",
                             (job_id, name, _dumps(spec), state, _dumps(detail), now, now, submission_id))

    def job_by_submission(self, submission_id: str) -> dict | None:
        """The job recorded with this client-supplied submission id, if any."""
        with self._lock:
            row = self._db.execute("SELECT id,name,spec,state,detail,created,updated FROM jobs WHERE submission_id=?",
                                   (submission_id,)).fetchone()
        return _job_row(row) if row else None

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

    def all_events(self, job_id: str, page: int = 1000) -> list[dict]:
        out: list[dict] = []
        while batch := self.events(job_id, out[-1]["seq"] if out else 0, page):
            out += batch
            if len(batch) < page:
                break
        return out

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


class JobRecord:
    """One job's history as its supervisor writes it: the single, narrow interface between the
    supervisor's loop and what keeps the job's record (this store; the CLI, the clients and the
    metrics read it from there or from the supervisor's status).

    With `trackers` (the job's experiment trackers, started), events and metrics also go to them,
    after the store has them; they never block these calls (see `Trackers`). The job's terminal
    state closes them (see `state`), and so does `close()`.
    """

    def __init__(self, store: Store, job_id: str, trackers: Trackers | None = None):
        self.store = store
        self.job_id = job_id
        self.trackers = trackers
        # Where the job's time went (monitoring.goodput), fed what is recorded here; a job resumed by a
        # new controller carries on from its stored history.
        self._ledger = Ledger.replay(store.all_events(job_id), store.read_metrics(job_id))
        self._ledger_lock = threading.Lock()

    def goodput(self, now: float | None = None) -> dict | None:
        with self._ledger_lock:
            return self._ledger.summary(time.time() if now is None else now)

    def saved(self) -> dict:
        """What an earlier controller saved of this job: its detail (with "stats") and attempts."""
        job = self.store.job(self.job_id) or {}
        return {"detail": job.get("detail", {}), "attempts": self.store.attempts(self.job_id)}

    def event(self, kind: str, message: str, attempt: int | None, **data: Any) -> dict:
        event = self.store.add_event(self.job_id, kind, message, attempt, **data)
        with self._ledger_lock:
            self._ledger.event(event)
        if self.trackers is not None:
            self.trackers.event(event)
        return event

    def state(self, state: str, detail: dict) -> None:
        if self.trackers is not None:
            if state in TERMINAL_STATES:
                # Before the store says the job ended: `stalwart run` shuts its cluster down, and this
                # controller with it, as soon as it reads that, and the trackers' last points and the
                # run's outcome would go with them. Bounded by the trackers' close timeout.
                self.trackers.close(outcome=state)
            # The detail is written whole: keep in it what the trackers need to resume their runs.
            detail = {**detail, "trackers": self.trackers.resume}
        self.store.set_state(self.job_id, state, detail)

    def stats(self, summary: dict) -> None:
        self.store.update_detail(self.job_id, stats=summary)

    def attempt_started(self, attempt: int, world_size: int, start_checkpoint: str | None) -> None:
        self.store.start_attempt(self.job_id, attempt, world_size, start_checkpoint)

    def attempt_ended(self, attempt: int, cause: str, error: str = "") -> None:
        self.store.end_attempt(self.job_id, attempt, cause, error)

    def logs(self, lines: list[str]) -> None:
        self.store.append_log(self.job_id, lines)

    def metrics(self, records: list[dict]) -> None:
        self.store.append_metrics(self.job_id, records)
        with self._ledger_lock:
            self._ledger.records(records)
        if self.trackers is not None and records:
            self.trackers.metrics(records, records[0].get("attempt", 0))

    def close(self) -> None:
        """Close the trackers, if any (the job has ended, or its supervisor is gone)."""
        if self.trackers is not None:
            self.trackers.close()
