"""Runs to fit, read from CSV or JSON and checked row by row before any fit starts.

One row per finished run: `compute,loss`, or `params,tokens,loss` (compute is then 6*N*D, the usual
count for a dense transformer's training FLOPs), or all four. Other columns are ignored, so a
results table exported from elsewhere reads as it is.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from stalwart.forecast.errors import RunsFileError


@dataclass(frozen=True)
class Runs:
    """Finished runs: `compute` (FLOPs) and `loss` always, `params` and `tokens` when every row had
    them. Arrays are float64 of one length, all values finite and positive."""

    compute: np.ndarray
    loss: np.ndarray
    params: Optional[np.ndarray] = None
    tokens: Optional[np.ndarray] = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.loss)

    @property
    def has_params_tokens(self) -> bool:
        return self.params is not None and self.tokens is not None

    def subset(self, mask: np.ndarray) -> "Runs":
        pick = (lambda a: None if a is None else a[mask])
        return Runs(self.compute[mask], self.loss[mask], pick(self.params), pick(self.tokens), self.source)


def read_runs(path: str | Path, loss_column: str = "loss") -> Runs:
    """Read runs from a .csv file, or a .json file holding a list of objects (or {"runs": [...]}).

    Raises RunsFileError naming the file and the row: the file is missing or unreadable, a column is
    missing, a value is empty, not a number, NaN/inf, or not positive, two rows are identical, or
    fewer than two runs remain."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RunsFileError(f"cannot read it ({exc.strerror or exc})", source=str(path)) from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RunsFileError(f"not valid JSON (line {exc.lineno}: {exc.msg})", source=str(path)) from None
        if isinstance(data, dict) and isinstance(data.get("runs"), list):
            data = data["runs"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise RunsFileError('expected a list of objects, one per run (or {"runs": [...]})', source=str(path))
        columns = sorted({k for r in data for k in r})
        return runs_from_rows(data, columns, source=str(path), loss_column=loss_column, row_label="run")
    lines = text.splitlines()
    header = next((line for line in lines if line.strip()), "")
    # Commas; a header with tabs or semicolons and no comma says which (a TSV, a spreadsheet's export).
    delimiter = next((d for d in ("\t", ";") if d in header and "," not in header), ",")
    reader = csv.DictReader(lines, delimiter=delimiter)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    return runs_from_rows(rows, columns, source=str(path), loss_column=loss_column, row_label="row")


def runs_from_rows(rows: Iterable[Mapping[str, Any]], columns: Iterable[str], *, source: str = "",
                   loss_column: str = "loss", row_label: str = "row") -> Runs:
    """Build `Runs` from mappings (as read from a file); the checks and errors of `read_runs`.
    Rows are numbered from 1, the first data row (a CSV's header is not a row)."""
    rows, columns = list(rows), set(columns)
    named = _canonical(columns, loss_column)
    if named:  # the names this module uses, whatever case or alias the file has
        rows = [{**row, **{canon: row.get(actual) for canon, actual in named.items()}} for row in rows]
        columns |= set(named)
    has_pt = {"params", "tokens"} <= columns
    needed = [loss_column] + ([] if "compute" in columns else ["params", "tokens"])
    missing = [c for c in needed if c not in columns]
    if missing:
        have = ", ".join(sorted(columns)) or "none"
        raise RunsFileError(f"missing column {', '.join(repr(c) for c in missing)}: need {loss_column!r} and "
                            f"either 'compute' (or 'flops') or 'params' and 'tokens' (columns found: {have})",
                            source=source)
    wanted = [loss_column] + (["compute"] if "compute" in columns else []) + (["params", "tokens"] if has_pt else [])
    values: dict[str, list[float]] = {c: [] for c in wanted}
    seen: dict[tuple, int] = {}
    for i, row in enumerate(rows, start=1):
        where = f"{row_label} {i}"
        record = []
        for col in wanted:
            x = _number(row.get(col), named.get(col, col), where, source)  # named as the file has it
            values[col].append(x)
            record.append(x)
        if tuple(record) in seen:
            raise RunsFileError(f"{where} repeats {row_label} {seen[tuple(record)]} (the same "
                                f"{', '.join(wanted)}); remove the duplicate", source=source, row=i)
        seen[tuple(record)] = i
    if len(rows) < 2:
        raise RunsFileError(f"{len(rows)} run(s) found; a fit needs several (at least 4 compute budgets)",
                            source=source, row=1 if rows else None)
    arr = {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}
    compute = arr["compute"] if "compute" in arr else 6.0 * arr["params"] * arr["tokens"]
    return Runs(compute, arr[loss_column], arr.get("params"), arr.get("tokens"), source)


# Other names files give these columns (any case); the first one found wins.
_ALIASES = {"compute": ("compute", "flops", "c"), "params": ("params", "parameters", "n_params", "num_params", "n"),
            "tokens": ("tokens", "n_tokens", "num_tokens", "d")}


def _canonical(columns: set[str], loss_column: str) -> dict[str, str]:
    """`{name used here: the file's column}` for the columns found under another case or an alias."""
    by_lower = {c.strip().lower(): c for c in sorted(columns)}
    out = {}
    for canon, names in (*_ALIASES.items(), (loss_column, (loss_column,))):
        if canon in columns:
            continue
        actual = next((by_lower[n.lower()] for n in names if n.lower() in by_lower), None)
        if actual is not None:
            out[canon] = actual
    return out


def _number(raw: Any, col: str, where: str, source: str) -> float:
    row = int(where.rsplit(" ", 1)[1])
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise RunsFileError(f"{where}: no value for {col!r}", source=source, row=row)
    if isinstance(raw, bool):
        raise RunsFileError(f"{where}: {col!r} is {raw!r}, not a number", source=source, row=row)
    try:
        x = float(raw)
    except (TypeError, ValueError):
        raise RunsFileError(f"{where}: {col!r} is {raw!r}, not a number", source=source, row=row) from None
    if math.isnan(x) or math.isinf(x):
        raise RunsFileError(f"{where}: {col!r} is {x}", source=source, row=row)
    if x <= 0:
        # A cross-entropy loss, a FLOP count, a parameter or token count: all positive; and the
        # laws are fitted in log space, where zero or less has no place.
        raise RunsFileError(f"{where}: {col!r} is {raw}; it must be positive", source=source, row=row)
    return x
