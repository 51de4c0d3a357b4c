"""stalwart's exceptions: one root, subclasses that carry data and survive pickling across actors."""

from __future__ import annotations


class StalwartError(Exception):
    """Root of every error stalwart raises on purpose."""


class SpecError(StalwartError, ValueError):
    """A job spec is invalid. `problems` lists (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid job spec{where}:"]
        lines += [f"  {path or '<root>'}: {msg}" for path, msg in self.problems]
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return (SpecError, (self.problems, self.source))


class StorageError(StalwartError):
    """A storage operation failed. `transient` says whether retrying may help."""

    def __init__(self, message: str, *, uri: str = "", transient: bool = False):
        self.uri = uri
        self.transient = transient
        super().__init__(message)

    def __reduce__(self):
        return (_rebuild_storage_error, (str(self), self.uri, self.transient))


def _rebuild_storage_error(message: str, uri: str, transient: bool) -> StorageError:
    return StorageError(message, uri=uri, transient=transient)


class CheckpointCorrupt(StalwartError):
    """A committed checkpoint failed verification (missing shard, size or checksum mismatch)."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"checkpoint {uri} is corrupt: {reason}")

    def __reduce__(self):
        return (CheckpointCorrupt, (self.uri, self.reason))


class CheckpointNotFound(StalwartError):
    """No committed checkpoint exists where one was asked for."""


class JobNotFound(StalwartError, KeyError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}; `stalwart list` shows the jobs this controller knows")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]

    def __reduce__(self):
        return (JobNotFound, (self.job_id,))


class JobFailed(StalwartError):
    """A job ended FAILED. `attempts` holds one dict per attempt (id, cause, error)."""

    def __init__(self, job_id: str, reason: str, attempts: list[dict] | None = None):
        self.job_id = job_id
        self.reason = reason
        self.attempts = list(attempts or [])
        super().__init__(f"job {job_id} failed: {reason}")

    def __reduce__(self):
        return (JobFailed, (self.job_id, self.reason, self.attempts))


class ClusterError(StalwartError):
    """The Ray cluster or the controller cannot be reached or started."""


class NoCluster(ClusterError):
    """No Ray cluster runs where one was looked for (as opposed to one that refused us)."""


class GangStartFailed(StalwartError):
    """A rank's worker died, or did not answer, while its gang was starting (before any report)."""


class WaitTimeout(StalwartError, TimeoutError):
    """A wait ran out of time. `what` says what it waited for; `setting` names the environment
    variable that sets the limit."""

    def __init__(self, what: str, timeout_s: float, setting: str):
        self.what = what
        self.timeout_s = timeout_s
        self.setting = setting
        super().__init__(f"gave up after {timeout_s:g} s waiting for {what}; set {setting} to wait longer")

    def __reduce__(self):
        return (WaitTimeout, (self.what, self.timeout_s, self.setting))


class SubmissionConflict(StalwartError):
    """A submission id that an earlier submit used with a different spec (HTTP 409). The same id with
    the same spec is not an error: it gives the job that submit created."""

    def __init__(self, submission_id: str, job_id: str):
        self.submission_id = submission_id
        self.job_id = job_id
        super().__init__(f"submission id {submission_id!r} was used for job {job_id} with a different spec; "
                         f"use a new submission id for a new job")

    def __reduce__(self):
        return (SubmissionConflict, (self.submission_id, self.job_id))


class Preempted(StalwartError):
    """Raised out of `ctx.checkpoint()` on every rank once the ranks agreed to stop because one of them
    was preempted (a SIGTERM, its node drained), after the emergency checkpoint at `step` (`committed`
    says whether it committed). Let it propagate: the attempt ends and the job restarts from there."""

    def __init__(self, step: int, committed: bool, reason: str):
        self.step = step
        self.committed = committed
        self.reason = reason
        saved = "committed" if committed else "did not commit"
        super().__init__(f"preempted ({reason}): stopped at step {step}; the emergency checkpoint {saved}")

    def __reduce__(self):
        return (Preempted, (self.step, self.committed, self.reason))
