"""`stalwart forecast`: predict a bigger run's loss from finished smaller runs (a CSV or JSON file).

Thin over `stalwart.forecast`; nothing is written (no plot) unless the forecast succeeds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from stalwart.cli.common import AddressOpt, JsonOpt, app, console, err, fail, need_matplotlib, reader

forecast_app = typer.Typer(no_args_is_help=True,
                            help="Forecast a big run's loss from small runs (predictable scaling).")
app.add_typer(forecast_app, name="forecast")


@forecast_app.command("fit")
def forecast_fit(
    runs_file: Optional[Path] = typer.Argument(None, help="runs: .csv or .json, one row per run, columns compute,"
                                                          "loss or params,tokens,loss (compute = 6*params*tokens)"),
    jobs: Optional[list[str]] = typer.Option(None, "--jobs", help="instead of a file, finished stalwart jobs: ids or "
                                             "patterns ('tiny-gpt-ladder-*'), repeated or comma-separated; N from "
                                             "the parameters they reported, D from their steps and tokens"),
    last: int = typer.Option(20, "--last", min=1, help="with --jobs: a job's loss is the mean of its last N steps"),
    address: Optional[str] = AddressOpt,
    target_compute: Optional[float] = typer.Option(None, "--target-compute", help="FLOPs of the run to forecast"),
    target_params: Optional[float] = typer.Option(None, "--target-params", help="its parameters (with --target-tokens "
                                                                                "or --target-compute)"),
    target_tokens: Optional[float] = typer.Option(None, "--target-tokens", help="its training tokens"),
    loss_column: str = typer.Option("loss", "--loss-column", help="the column holding the loss"),
    level: float = typer.Option(0.9, "--level", min=0.5, max=0.99, help="the interval's coverage"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="draw points, frontier, fit and band to this file (.png)"),
    force: bool = typer.Option(False, "--force", help="return the fit even when a check refuses it (with warnings)"),
    as_json: bool = JsonOpt,
):
    """Fit a scaling law to finished runs and forecast the target's loss with an interval.

    A compute target alone uses L(C) = a*C^-b + c on the best run per budget; a target with params
    and tokens uses L(N, D) = E + A/N^alpha + B/D^beta on every run."""
    from stalwart.forecast import ForecastError, forecast_compute, forecast_size, read_runs, resolve_target

    if plot is not None:
        need_matplotlib("stalwart forecast fit --plot")
    try:
        target = resolve_target(target_compute, target_params, target_tokens)
    except ValueError as exc:
        fail(str(exc), 2)
    if (runs_file is None) == (not jobs):
        fail("give a runs file or --jobs (one of them)", 2)
    try:
        runs = read_runs(runs_file, loss_column=loss_column) if runs_file is not None else _job_runs(jobs, loss_column,
                                                                                                    last, address)
        if target["law"] == "compute":
            result = forecast_compute(runs, target["compute"], level=level, force=force)
        else:
            result = forecast_size(runs, target["params"], target["tokens"], level=level, force=force)
    except ForecastError as exc:
        fail(str(exc))
    if plot is not None:
        from stalwart.forecast.plot import plot_forecast

        try:
            plot_forecast(result, runs, plot)
        except (OSError, ValueError) as exc:  # ValueError: a file type matplotlib cannot write
            fail(f"cannot write the plot to {plot}: {getattr(exc, 'strerror', None) or exc}")
    if as_json:
        console.print_json(json.dumps(_finite(result.to_json())))
        return
    _show(result, plot)


def _job_runs(patterns: list[str], metric: str, last: int, address: Optional[str]):
    """The runs of finished jobs matching `patterns` (ids or fnmatch patterns over ids and names): a job
    that did not succeed, or did not report its parameters and tokens, is left out with a note."""
    import fnmatch

    from stalwart.forecast import runs_from_rows
    from stalwart.forecast.sweep import SweepError, SweepLoss, run_result

    wanted = [p.strip() for arg in patterns for p in arg.split(",") if p.strip()]
    client = reader(address)
    known = client.jobs()
    picked = [j for j in known if any(fnmatch.fnmatchcase(j["id"], p) or fnmatch.fnmatchcase(j["name"], p)
                                      for p in wanted)]
    if not picked:
        fail(f"no job matches {', '.join(wanted)} (`stalwart list` shows the jobs)")
    rows = []
    for j in picked:
        try:
            rows.append({"job": j["id"], **run_result(client.status(j["id"]), client.metrics(j["id"]),
                                                      SweepLoss(metric=metric, last=last))})
        except SweepError as exc:
            err.print(f"[yellow]left out[/] {escape(str(exc))}")
    return runs_from_rows(rows, ["params", "tokens", "loss"], source="jobs " + ", ".join(wanted), row_label="job")


def _show(f, plot: Optional[Path]) -> None:
    t = f.target
    what = (f"{t['compute']:.3g} FLOPs" if f.law == "compute"
            else f"{t['params']:.3g} params x {t['tokens']:.3g} tokens ({t['compute']:.3g} FLOPs)")
    console.print(f"forecast at {what}: loss [bold]{f.prediction:.4f}[/] "
                  f"({f.level:.0%} interval {f.low:.4f} to {f.high:.4f})", highlight=False, soft_wrap=True)
    p, q = f.params, f.quality
    if f.law == "compute":
        law = (f"L(C) = a*C^-b + c, a={p['a']:.4g} b={p['b']:.4f} c={p['c']:.4f} "
               "(best fit; the forecast weighs every law that fits)")
        pts = f"{q['points']} budgets from {f.frontier.compute.min():.3g} to {f.frontier.compute.max():.3g} FLOPs"
    else:
        law = (f"L(N, D) = E + A/N^alpha + B/D^beta, E={p['E']:.4f} A={p['A']:.4g} alpha={p['alpha']:.4f} "
               f"B={p['B']:.4g} beta={p['beta']:.4f} (best fit; the forecast weighs every law that fits)")
        pts = f"{q['points']} runs fitted, up to {f.used.compute.max():.3g} FLOPs"
    console.print(escape(law), highlight=False, soft_wrap=True)
    console.print(escape(f"{pts}; R^2 (log loss) {q['r2_log']:.4f}, rms residual {q['rms_residual']:.2%}"),
                  highlight=False, soft_wrap=True)
    for note in f.notes:
        console.print(f"[dim]note: {escape(note)}[/]", highlight=False, soft_wrap=True)
    for w in f.warnings:
        err.print(f"[yellow]warning (forced):[/] {escape(str(w))}", highlight=False, soft_wrap=True)
    if plot is not None:
        console.print(f"plot: {escape(str(plot))}", highlight=False, soft_wrap=True)


def _finite(x):
    """JSON has no NaN or infinity: those become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
