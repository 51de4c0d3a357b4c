"""A job's lifecycle: states as classes carrying their payload, and one function that steps between them.

    PENDING -> RUNNING -> (RESTARTING -> PENDING -> RUNNING)* -> SUCCEEDED | FAILED | CANCELLED

The supervisor acts for the current state, turns what happened into an event, and calls `step`.
`step` is pure: it decides nothing about actors, so it is tested without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from stalwart.launchers.plan import Rewind


class JobState:
    name: ClassVar[str]
    terminal: ClassVar[bool] = False

    def describe(self) -> str:
        return ""


@dataclass(frozen=True)
class Pending(JobState):
    name: ClassVar[str] = "PENDING"
    reason: str = "queued"
    attempt: int = 1
    rewind: Rewind = field(default_factory=Rewind)

    def describe(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Running(JobState):
    name: ClassVar[str] = "RUNNING"
    attempt: int = 1
    rewind: Rewind = field(default_factory=Rewind)


@dataclass(frozen=True)
class Restarting(JobState):
    name: ClassVar[str] = "RESTARTING"
    attempt: int  # the attempt that ended
    cause: str
    error: str
    delay_s: float
    rewind: Rewind = field(default_factory=Rewind)

    def describe(self) -> str:
        return f"{self.cause}: {self.error}"


@dataclass(frozen=True)
class Succeeded(JobState):
    name: ClassVar[str] = "SUCCEEDED"
    terminal: ClassVar[bool] = True


@dataclass(frozen=True)
class Failed(JobState):
    name: ClassVar[str] = "FAILED"
    terminal: ClassVar[bool] = True
    reason: str = ""
    cause: str | None = None
    rank: int | None = None
    traceback: str = ""

    def describe(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Cancelled(JobState):
    name: ClassVar[str] = "CANCELLED"
    terminal: ClassVar[bool] = True
    reason: str = "cancelled by request"

    def describe(self) -> str:
        return self.reason


# The names of the states a job ends in (the one definition; the store and the clients use names).
TERMINAL_STATES = frozenset(cls.name for cls in (Succeeded, Failed, Cancelled))


# ---- events: what the supervisor observed ------------------------------------------------------
@dataclass(frozen=True)
class Waiting:
    reason: str


@dataclass(frozen=True)
class Reserved:
    pass


@dataclass(frozen=True)
class Tick:
    """Nothing changed."""


@dataclass(frozen=True)
class Finished:
    pass


@dataclass(frozen=True)
class Faulted:
    """An attempt ended or must end. `restart` and `rewind` come from the failure policy."""

    cause: str
    error: str
    restart: bool
    delay_s: float = 0.0
    rewind: Rewind = field(default_factory=Rewind)
    rank: int | None = None
    traceback: str = ""


@dataclass(frozen=True)
class BackoffDone:
    pass


@dataclass(frozen=True)
class CancelRequested:
    reason: str = "cancelled by request"


class IllegalTransition(RuntimeError):
    pass


Event = Waiting | Reserved | Tick | Finished | Faulted | BackoffDone | CancelRequested


def step(state: JobState, event: Event) -> JobState:
    """The next state. Raises IllegalTransition for an event that makes no sense in `state`."""
    if state.terminal:
        raise IllegalTransition(f"{state.name} is terminal; got {type(event).__name__}")
    if isinstance(event, CancelRequested):
        return Cancelled(event.reason)
    if isinstance(event, Tick):
        return state
    if isinstance(state, Pending):
        if isinstance(event, Waiting):
            return Pending(event.reason, state.attempt, state.rewind)
        if isinstance(event, Reserved):
            return Running(state.attempt, state.rewind)
        if isinstance(event, Faulted) and not event.restart:
            return Failed(event.error, event.cause)
    elif isinstance(state, Running):
        if isinstance(event, Finished):
            return Succeeded()
        if isinstance(event, Faulted):
            if event.restart:
                return Restarting(state.attempt, event.cause, event.error, event.delay_s, event.rewind)
            return Failed(event.error, event.cause, event.rank, event.traceback)
    elif isinstance(state, Restarting):
        if isinstance(event, BackoffDone):
            return Pending(f"restarting after {state.cause}: waiting for resources", state.attempt + 1, state.rewind)
    raise IllegalTransition(f"{type(event).__name__} in state {state.name}")
