"""Why a forecast was refused: typed errors that carry what went wrong, so a caller (the CLI, a
sweep) can say which check failed and still reach the fit when the user forces it."""

from __future__ import annotations

from typing import Any, NamedTuple

from stalwart.errors import StalwartError

# The checks a fit must pass before its extrapolation is trusted (see `checks.py`).
TOO_FEW_POINTS = "too_few_points"
SHORT_RANGE = "short_range"
NOT_FALLING = "not_falling"
EXPONENT_OUT_OF_RANGE = "exponent_out_of_range"
NO_ANNEALING_SEEN = "no_annealing_seen"


class Problem(NamedTuple):
    """One failed check: `code` (one of the constants above) and a sentence for people."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ForecastError(StalwartError, ValueError):
    """A forecast was refused. `problems` lists every failed check; `result` holds the fit that
    was refused (a `Forecast` or `CurveForecast`), or None when no fit could be made at all."""

    def __init__(self, problems: list[Problem], result: Any = None):
        self.problems = [Problem(*p) for p in problems]
        self.result = result
        lines = "; ".join(str(p) for p in self.problems)
        hint = " (--force / force=True returns the fit with these warnings)" if result is not None else ""
        super().__init__(f"refusing to extrapolate: {lines}{hint}")

    @property
    def codes(self) -> list[str]:
        return [p.code for p in self.problems]

    def __reduce__(self):
        return (ForecastError, (self.problems, self.result))


class RunsFileError(ForecastError):
    """The runs given to fit are unusable (a missing column, a bad value, a duplicate, too few).
    `row` is the 1-based data row at fault (None when the whole input is), `source` the file."""

    def __init__(self, message: str, *, source: str = "", row: int | None = None):
        self.source = source
        self.row = row
        self.message = message
        StalwartError.__init__(self, f"{source}: {message}" if source else message)
        self.problems = [Problem("bad_input", message)]
        self.result = None

    def __reduce__(self):
        return (_rebuild_runs_error, (self.message, self.source, self.row))


def _rebuild_runs_error(message: str, source: str, row: int | None) -> RunsFileError:
    return RunsFileError(message, source=source, row=row)
