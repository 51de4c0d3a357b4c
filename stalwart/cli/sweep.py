"""`stalwart sweep`: run a scaling ladder of small jobs, fit a law to their losses, forecast the target.

Every rung is an ordinary job (queued, gang-scheduled, restarted on faults). Submits are idempotent
(a submission id per rung, from its spec): a sweep run again after the command stopped finds the jobs
it submitted, finished or running, and waits for the rest. Ctrl-C or SIGTERM cancels the rungs still
running; a cancelled rung is submitted anew by the next run of the sweep, and a failed one with
`--retry-failed`.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from stalwart.cli.common import (TERMINAL, AddressOpt, JsonOpt, app, connect, console, err, fail, fmt, need_matplotlib,
                                 styled_state)
from stalwart.cli.forecast import _finite
from stalwart.errors import StalwartError

POLL_S = 2.0


@app.command()
def sweep(sweep_file: Path = typer.Argument(..., help="the sweep (YAML): base job, sizes, steps, target"),
          address: Optional[str] = AddressOpt,
          plot: Optional[Path] = typer.Option(None, "--plot", help="draw the runs, the fit, the forecast and the "
                                                                  "held-out run to this file (.png)"),
          out: Optional[Path] = typer.Option(None, "--out", help="a folder for runs.csv and forecast.json"),
          force: bool = typer.Option(False, "--force", help="forecast even when a check refuses the fit"),
          retry_failed: bool = typer.Option(False, "--retry-failed", help="submit failed rungs again"),
          as_json: bool = JsonOpt):
    """Run a ladder of small jobs (model sizes x steps), fit a scaling law to their final losses and
    forecast the target run's loss; the target, when it runs too, is held out and compared."""
    from stalwart.cli.jobs import _StopRequests
    from stalwart.forecast.sweep import SweepError, load_sweep, plan

    try:
        spec, base = load_sweep(sweep_file)
    except SweepError as exc:
        fail(str(exc))
    if plot is not None:
        need_matplotlib("stalwart sweep --plot")
    rungs = plan(spec, base)
    client = connect(address, start="inprocess")
    stops = _StopRequests().install()
    try:
        jobs = [_submit(client, r, retry_failed) for r in rungs]
        if not as_json:
            done = sum(j.status()["state"] == "SUCCEEDED" for j in jobs)
            err.print(f"sweep [bold]{spec.name}[/]: {len(jobs)} jobs ({len(spec.sizes)} sizes x {len(spec.steps)} "
                      f"budgets" + (" + the target, held out" if spec.target.run else "") + ")"
                      + (f"; {done} finished in an earlier run of this sweep" if done else ""))
        statuses = _wait(jobs, rungs, stops, quiet=as_json)
        if stops.reason is not None:
            fail(f"sweep stopped ({stops.reason}); its finished jobs are kept: run it again to go on", 130)
        result = _forecast(client, spec, rungs, jobs, statuses, force)
    finally:
        stops.restore()
        client.close()
    if out is not None:
        _write(out, result)
    if plot is not None:
        from stalwart.forecast.plot import plot_forecast

        try:
            plot_forecast(result["forecast_obj"], result["runs_obj"], plot, actual=(result["target"] or {}).get("loss"),
                          title=f"sweep {spec.name}")
        except (OSError, ValueError) as exc:
            fail(f"cannot write the plot to {plot}: {getattr(exc, 'strerror', None) or exc}")
    shown = {k: v for k, v in result.items() if not k.endswith("_obj")}
    if as_json:
        console.print_json(json.dumps(_finite(shown)))
    else:
        _show(spec.name, shown, plot, out)


def _submit(client, rung: dict, retry_failed: bool):
    """The rung's job: the one an earlier run of the sweep submitted, unless it was cancelled (or failed,
    with --retry-failed): then a new one, under the next submission id."""
    for again in range(100):
        sid = rung["submission_id"] + (f"-{again}" if again else "")
        try:
            job = client.submit(rung["spec"], submission_id=sid)
        except StalwartError as exc:
            fail(f"{rung['name']}: {exc}")
        state = job.status()["state"]
        if state == "CANCELLED" or (state == "FAILED" and retry_failed):
            continue
        return job
    fail(f"{rung['name']}: submitted 100 times already; give the sweep another name")


def _wait(jobs: list, rungs: list[dict], stops, quiet: bool) -> list[dict]:
    """Every job's status once all ended; a live table on stderr meanwhile. A stop request cancels the
    jobs still running and returns at once."""
    def table(statuses):
        t = Table("job", "state", "step", "loss", title="sweep", title_justify="left")
        for rung, s in zip(rungs, statuses):
            total = rung["steps"]
            t.add_row(escape(s.get("id", rung["name"])) + ("  (target)" if rung["target"] else ""),
                      styled_state(s["state"]), f"{s.get('step') or 0}/{total}", fmt(s.get("loss")))
        return t

    statuses = [j.status() for j in jobs]
    live = None if quiet else Live(table(statuses), console=err, refresh_per_second=2, transient=False)
    if live is not None:
        live.start()
    try:
        while not all(s["state"] in TERMINAL for s in statuses):
            if stops.reason is not None:
                for job, s in zip(jobs, statuses):
                    if s["state"] not in TERMINAL:
                        job.cancel(f"sweep {stops.reason}")
                return statuses
            time.sleep(POLL_S)
            statuses = [s if s["state"] in TERMINAL else j.status() for j, s in zip(jobs, statuses)]
            if live is not None:
                live.update(table(statuses))
    finally:
        if live is not None:
            live.stop()
    return statuses


def _forecast(client, spec, rungs, jobs, statuses, force: bool) -> dict:
    from stalwart.forecast import ForecastError, forecast_compute, forecast_size, runs_from_rows
    from stalwart.forecast.sweep import SweepError, envelope, run_result

    rows, failed, target = [], [], None
    for rung, job, status in zip(rungs, jobs, statuses):
        try:
            r = run_result(status, job.metrics(), spec.loss)
        except SweepError as exc:
            if rung["target"]:
                fail(f"the target run: {exc}")
            failed.append({"job": job.id, "problem": str(exc)})
            continue
        row = {"job": job.id, "size": rung["size"], "steps": rung["steps"], **r}
        if rung["target"]:
            target = row
        else:
            rows.append(row)
    if failed and not rows:
        fail("no rung of the sweep gave a result: " + "; ".join(f["problem"] for f in failed))
    from stalwart.forecast.predict import MIN_TOKENS_PER_PARAM

    law = spec.law_for_target()
    least = spec.min_tokens_per_param if spec.min_tokens_per_param is not None else MIN_TOKENS_PER_PARAM
    # L(N, D) takes every run and leaves out the under-trained ones itself; L(C) the grid's envelope.
    fitted = [r for r in rows if r["tokens"] / r["params"] >= least] if law == "size" else envelope(rows)
    given = rows if law == "size" else fitted
    try:
        runs = runs_from_rows(given, ["params", "tokens", "loss"], source=f"sweep {spec.name}", row_label="job")
        if target is not None:
            t_params, t_tokens = target["params"], target["tokens"]
        else:
            t_params, t_tokens = spec.target.params, spec.target.tokens
        if law == "size":
            if t_params is None or t_tokens is None:
                fail("law: size needs the target's params and tokens (run it, or give both)")
            extra = {} if spec.min_tokens_per_param is None else {"min_tokens_per_param": spec.min_tokens_per_param}
            f = forecast_size(runs, t_params, t_tokens, level=spec.level, force=force, **extra)
        else:
            compute = 6.0 * t_params * t_tokens if t_params and t_tokens else spec.target.compute
            f = forecast_compute(runs, compute, level=spec.level, force=force)
    except ForecastError as exc:
        fail(f"{exc}\n(the runs: {', '.join(r['job'] for r in rows)}; --force fits anyway, with warnings)")
    except ValueError as exc:
        fail(str(exc))
    result = {"sweep": spec.name, "prediction": f.prediction, "low": f.low, "high": f.high, "level": f.level,
              "law": f.law, "params": f.params, "quality": f.quality, "warnings": [p._asdict() for p in f.warnings],
              "runs": rows, "fitted": [r["job"] for r in fitted], "failed": failed, "target": target, "forecast_obj": f,
              "runs_obj": _all_runs(rows, runs, spec.name)}
    result["notes"] = list(f.notes) + _off_frontier(fitted, target or {"params": t_params, "tokens": t_tokens}, law)
    if target is not None:
        result["error"] = (f.prediction - target["loss"]) / target["loss"]
        result["inside"] = f.low <= target["loss"] <= f.high
        compute = [r["compute"] for r in rows]
        result["compute_span"] = target["compute"] / min(compute)
    return result


def _all_runs(rows: list[dict], fitted, name: str):
    """Every run of the ladder, for the picture (grey under the envelope the law was fitted to)."""
    from stalwart.forecast import ForecastError, runs_from_rows

    try:
        return runs_from_rows(rows, ["params", "tokens", "loss"], source=f"sweep {name}", row_label="job")
    except ForecastError:
        return fitted


def _off_frontier(fitted: list[dict], target: dict, law: str) -> list[str]:
    """L(C) forecasts the best loss reachable with the target's compute, which a run that splits it
    between parameters and tokens far from the envelope's largest runs does not reach: say so."""
    if law != "compute" or not target.get("params") or not target.get("tokens") or len(fitted) < 2:
        return []
    top = sorted(fitted, key=lambda r: r["compute"])[-3:]
    ladder = sorted(r["tokens"] / r["params"] for r in top)[len(top) // 2]
    mine = target["tokens"] / target["params"]
    if max(mine / ladder, ladder / mine) < 3:
        return []
    return [f"the target trains {mine:.2g} tokens per parameter where the ladder's best runs train {ladder:.2g}: "
            "L(C) forecasts the best loss its compute can reach, which a run this far from that split does not; "
            "size the target near that split, or use law: size"]


def _write(out: Path, result: dict) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "runs.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["job", "size", "steps", "params", "tokens", "compute", "loss"])
            for r in result["runs"] + ([result["target"]] if result["target"] else []):
                w.writerow([r["job"], json.dumps(r["size"], sort_keys=True), r["steps"], r["params"], r["tokens"],
                            r["compute"], r["loss"]])
        shown = {k: v for k, v in result.items() if not k.endswith("_obj")}
        (out / "forecast.json").write_text(json.dumps(_finite(shown), indent=2) + "\n")
    except OSError as exc:
        fail(f"cannot write to {out}: {exc.strerror or exc}")


def _show(name: str, r: dict, plot: Optional[Path], out: Optional[Path]) -> None:
    t = Table("job", "params", "tokens", "compute", "loss", "fitted", title=f"sweep {name}: the runs",
              title_justify="left")
    for row in r["runs"]:
        t.add_row(row["job"], f"{row['params']:.3g}", f"{row['tokens']:.3g}", f"{row['compute']:.3g}", fmt(row["loss"]),
                  "yes" if row["job"] in r["fitted"] else "")
    console.print(t)
    for f in r["failed"]:
        console.print(f"[yellow]left out[/] {f['job']}: {escape(f['problem'])}")
    console.print(f"forecast ({r['law']} law): [bold]{r['prediction']:.4f}[/] "
                  f"[{r['low']:.4f}, {r['high']:.4f}] at {r['level']:.0%}")
    if r.get("target"):
        tg = r["target"]
        console.print(f"held-out target {tg['job']}: {tg['params']:.3g} params x {tg['tokens']:.3g} tokens "
                      f"({tg['compute']:.3g} FLOPs, {r['compute_span']:.0f}x the smallest run): loss "
                      f"{tg['loss']:.4f}; forecast off by {r['error']:+.2%}, "
                      + ("inside" if r["inside"] else "[red]outside[/]") + " the interval")
    for note in r.get("notes") or []:
        console.print(f"[yellow]note[/] {escape(note)}")
    for w in r["warnings"]:
        console.print(f"[yellow]warning[/] {escape(w['message'])}")
    if plot is not None:
        console.print(f"wrote {plot}")
    if out is not None:
        console.print(f"wrote {out / 'runs.csv'} and {out / 'forecast.json'}")

