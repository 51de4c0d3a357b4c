"""The views: `top` (all jobs, live), `watch` (one job's curve and events, live), `report` (a PNG)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from stalwart.cli.common import (TERMINAL, AddressOpt, JsonOpt, app, clock, console, fmt, fmt_time, goodput_line,
                                 interval_line, job_handle, need_matplotlib, print_json, reader, restore_line,
                                 styled_state)
from stalwart.errors import StalwartError
from stalwart.monitoring.goodput import Ledger

SPARK = "▁▂▃▄▅▆▇█"


def _sparkline(values: list, width: int = 16) -> Text:
    """The last `width` values as block characters, scaled between their min and max; × marks NaN/Inf."""
    vals = [_as_float(v) for v in values][-width:]
    finite = [v for v in vals if v is not None and v == v and abs(v) != float("inf")]
    text = Text()
    if not finite:
        return text
    lo, hi = min(finite), max(finite)
    for v in vals:
        if v is None:
            continue
        if v != v or abs(v) == float("inf"):
            text.append("×", style="bold red")
            continue
        i = 0 if hi == lo else round((v - lo) / (hi - lo) * (len(SPARK) - 1))
        text.append(SPARK[i], style="cyan")
    return text


def _as_float(x):
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _ago(ts) -> str:
    return "-" if not ts else fmt_time(max(0.0, time.time() - ts))


def _attempt(s: dict):
    # A finished job's status says attempt 0; its attempts list still knows the last one.
    return s.get("attempt") or len(s.get("attempts") or []) or "-"


def _restarts(r: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((r or {}).items()) if v) or "0"


class _TopState:
    """What `stalwart top` remembers between frames: loss histories and finished jobs' status."""

    def __init__(self, client, history: int = 60):
        self.client = client
        self.losses: dict[str, list] = {}
        self.last_step: dict[str, int] = {}
        self.final: dict[str, dict] = {}
        self.history = history

    def status(self, job_id: str) -> dict:
        if job_id in self.final:
            return self.final[job_id]
        s = self.client.status(job_id)
        if s["state"] in TERMINAL:
            self.final[job_id] = s
        if job_id not in self.losses:  # seed from the stored metrics once; later frames append
            self.losses[job_id] = [m.get("loss") for m in self.client.metrics(job_id)][-self.history:]
            self.last_step[job_id] = s.get("step") or 0
        elif (s.get("step") or 0) != self.last_step.get(job_id):
            self.losses[job_id] = (self.losses[job_id] + [s.get("loss")])[-self.history:]
            self.last_step[job_id] = s.get("step") or 0
        return s


def _top_rows(state: _TopState, limit: int) -> list[dict]:
    """What one frame of `top` shows, as data (`top --json`)."""
    jobs = state.client.jobs()
    live = [j for j in jobs if j["state"] not in TERMINAL]
    done = [j for j in jobs if j["state"] in TERMINAL][-limit:] if limit else []
    rows = []
    for j in done + live:
        try:
            s = state.status(j["id"])
        except StalwartError:
            continue
        rows.append({"id": j["id"], "state": s["state"], "step": s.get("step") or 0, "max_steps": s.get("max_steps"),
                     "loss": s.get("loss"), "recent_losses": state.losses.get(j["id"], []),
                     "tokens_per_s": s.get("tokens_per_s"), "last_checkpoint_at": s.get("last_checkpoint_at"),
                     "attempt": _attempt(s), "restarts": s.get("restarts") or {}})
    return rows


def _top_frame(state: _TopState, limit: int):
    jobs = state.client.jobs()
    live = [j for j in jobs if j["state"] not in TERMINAL]
    done = [j for j in jobs if j["state"] in TERMINAL][-limit:] if limit else []
    hidden = len(jobs) - len(live) - len(done)
    table = Table(title=f"stalwart top · {clock(time.time())}", title_justify="left", expand=False)
    table.add_column("job", no_wrap=True)
    for name in ("state", "step", "loss", "", "tokens/s", "ckpt age", "attempt"):
        table.add_column(name, no_wrap=True, justify="left" if name in ("state", "") else "right")
    table.add_column("restarts")
    for j in done + live:
        try:
            s = state.status(j["id"])
        except StalwartError:
            continue
        total = f"/{s['max_steps']}" if s.get("max_steps") else ""
        tps = s.get("tokens_per_s")
        table.add_row(j["id"], styled_state(s["state"]), f"{s.get('step') or 0}{total}", fmt(s.get("loss")),
                      _sparkline(state.losses.get(j["id"], [])), f"{tps:,.0f}" if tps else "-",
                      _ago(s.get("last_checkpoint_at")), str(_attempt(s)), _restarts(s.get("restarts")))
    if hidden:
        table.caption = f"{hidden} older finished job(s) not shown (--limit)"
    if not jobs:
        table.caption = "no jobs yet"
    return table


@app.command()
def top(address: Optional[str] = AddressOpt,
        once: bool = typer.Option(False, "--once", help="print one frame and exit"),
        interval: float = typer.Option(2.0, help="seconds between frames"),
        limit: int = typer.Option(20, help="finished jobs to show (the most recent)"), as_json: bool = JsonOpt):
    """All jobs, live: state, step, loss with a sparkline, tokens/s, checkpoint age, restarts."""
    state = _TopState(reader(address))
    if as_json:  # one frame's figures
        print_json(_top_rows(state, limit))
        return
    if once:
        console.print(_top_frame(state, limit))
        return
    try:
        with Live(_top_frame(state, limit), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(_top_frame(state, limit))
    except KeyboardInterrupt:
        pass


_BRAILLE_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [row % 4][col % 2]


def _braille_plot(points: list[tuple[float, float]], width: int = 64, height: int = 12,
                  marks: list[float] | None = None, band: list[list[tuple[float, float]]] | None = None) -> Text:
    """A line chart of (x, y) points in braille dots (2x4 per character), with y labels and x range.

    `marks` are x positions flagged under the chart with ▲ (restarts). `band`: more lines (the
    forecast and its band), drawn in yellow where they do not cross the curve."""
    pts = [(x, y) for x, y in points if y is not None and y == y and abs(y) != float("inf")]
    if len(pts) < 2:
        return Text("(not enough data for a curve yet)", style="dim")
    extra = [[(x, y) for x, y in line if y == y and abs(y) != float("inf")] for line in band or []]
    xs = [p[0] for p in pts] + [p[0] for line in extra for p in line]
    ys = [p[1] for p in pts] + [p[1] for line in extra for p in line]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if x1 == x0:
        x1 = x0 + 1
    cols, rows = width * 2, height * 4
    grid = [[0] * width for _ in range(height)]
    band_grid = [[0] * width for _ in range(height)]

    def dot(c: int, r: int, into: list = grid) -> None:
        if 0 <= c < cols and 0 <= r < rows:
            into[r // 4][c // 2] |= _BRAILLE_BITS[r % 4][c % 2]

    def to(x: float, y: float) -> tuple[int, int]:
        return round((x - x0) / (x1 - x0) * (cols - 1)), round((y1 - y) / (y1 - y0) * (rows - 1))

    prev = None
    for x, y in pts:
        c, r = to(x, y)
        if prev is not None and c >= prev[0]:  # join the dots; a step backwards (a restart) starts a new line
            pc, pr = prev
            n = max(abs(c - pc), abs(r - pr), 1)
            for i in range(n + 1):
                dot(round(pc + (c - pc) * i / n), round(pr + (r - pr) * i / n))
        else:
            dot(c, r)
        prev = (c, r)
    for line in extra:
        for x, y in line:
            dot(*to(x, y), into=band_grid)
    label_w = max(len(f"{y1:.3g}"), len(f"{y0:.3g}"))
    out = Text()
    for i, row in enumerate(grid):
        label = f"{y1:.3g}" if i == 0 else f"{y0:.3g}" if i == height - 1 else (
            f"{(y0 + y1) / 2:.3g}" if i == height // 2 else "")
        out.append(f"{label:>{label_w}} ┤", style="dim")
        for b, fb in zip(row, band_grid[i]):
            out.append(chr(0x2800 + (b or fb)), style="cyan" if b else "yellow")
        out.append("\n")
    if marks:
        line = [" "] * width
        for m in marks:
            if x0 <= m <= x1:
                line[min(width - 1, round((m - x0) / (x1 - x0) * (width - 1)))] = "▲"
        out.append(" " * (label_w + 2) + "".join(line) + "\n", style="magenta")
    left, right = f"step {x0:g}", f"{x1:g}"
    out.append(" " * (label_w + 2) + left + " " * max(1, width - len(left) - len(right)) + right, style="dim")
    return out


def _curve(metrics: list[dict]) -> tuple[list[tuple[float, float]], list[float]]:
    """Loss points in report order, and the steps where a new attempt took over."""
    points, marks, attempt = [], [], None
    for m in metrics:
        if attempt is not None and m.get("attempt") != attempt:
            marks.append(m["step"])
        attempt = m.get("attempt")
        points.append((m["step"], _as_float(m.get("loss"))))
    return points, marks


PINNED_EVENTS = ("fault", "recovered", "restored")  # the newest of each stays in `watch`'s events pane


def _watch_view(job_id: str, s: dict, metrics: list[dict], evs: list[dict], width: int):
    grid = Table.grid(padding=(0, 2))
    for _ in range(4):
        grid.add_column()
    total = f"/{s['max_steps']}" if s.get("max_steps") else ""
    tps = s.get("tokens_per_s")
    grid.add_row(Text("state", style="bold"), styled_state(s["state"]),
                 Text("step", style="bold"), f"{s.get('step') or 0}{total}  ETA {fmt_time(s.get('eta_s'))}")
    grid.add_row(Text("loss", style="bold"), fmt(s.get("loss")),
                 Text("tokens/s", style="bold"), f"{tps:,.0f}" if tps else "-")
    ck = s.get("last_checkpoint_step")
    grid.add_row(Text("attempt", style="bold"), f"{_attempt(s)} (restarts: {_restarts(s.get('restarts'))})",
                 Text("checkpoint", style="bold"),
                 f"step {ck}, {_ago(s.get('last_checkpoint_at'))} ago" if ck is not None else "-")
    if s.get("checkpoint_warning"):
        grid.add_row("", "", "", Text(s["checkpoint_warning"], style="bold yellow"))
    if auto := interval_line(s.get("checkpoint_interval")):
        grid.add_row(Text("auto", style="bold"), auto, "", "")
    restore, goodput = restore_line(s.get("restore")), goodput_line(s.get("goodput"))
    if restore or goodput:
        grid.add_row(Text("goodput", style="bold"), goodput or "-", Text("restoring", style="bold") if restore else "",
                     restore or "")
    fc = s.get("forecast") or {}
    if fc.get("final_loss") is not None:
        where = {"above": Text("ABOVE the band", style="bold red"), "below": Text("below the band", style="green"),
                 None: Text("inside the band")}.get(fc.get("outside"), Text(""))
        now = f"now {fmt(fc['low'])}-{fmt(fc['high'])}, " if fc.get("low") is not None else ""
        grid.add_row(Text("forecast", style="bold"),
                     f"{fmt(fc['final_loss'])} [{fmt(fc['final_low'])}, {fmt(fc['final_high'])}] at step "
                     f"{fc['final_step']}" + (" (upper bound)" if fc.get("upper_bound") else ""),
                     Text("band", style="bold"), Text.assemble(now, where) if fc.get("low") is not None else "-")
    points, marks = _curve(metrics)
    band = s.get("forecast_band")
    band_lines = [list(zip(band["steps"], band[k])) for k in ("mid", "low", "high")] if band else None
    plot = _braille_plot(points, width=max(20, width - 16), marks=marks, band=band_lines)
    shown: list[tuple[dict, int]] = []  # a run of checkpoint commits shows as its newest, with a count
    for e in evs:
        if e["kind"] == "checkpoint_committed" and shown and shown[-1][0]["kind"] == "checkpoint_committed":
            shown[-1] = (e, shown[-1][1] + 1)
        else:
            shown.append((e, 1))
    recent = shown[-10:]
    # The newest fault and its recovery stay in view when later events (commits, forecasts, intervals)
    # have pushed them out: they are what a person opening `watch` after a restart looks for.
    pinned = {item[0]["kind"]: i for i, item in enumerate(shown[:-10]) if item[0]["kind"] in PINNED_EVENTS}
    pinned_items = [shown[i] for i in sorted(pinned.values())]
    recent = pinned_items + recent[len(pinned_items):]
    lines = [Text.assemble((f"{clock(e['ts'])} ", "dim"), (f"{e['kind']:<22}", "bold"), e["message"],
                           (f"  (+{n - 1} earlier)" if n > 1 else "", "dim"))
             for e, n in recent]
    return Group(Panel(grid, title=f"stalwart watch · {job_id}", border_style="blue"),
                 Panel(plot, title="loss (▲ = a new attempt" + (", yellow = forecast and its band)" if band else ")"),
                       border_style="cyan"),
                 Panel(Group(*lines) if lines else Text("no events yet", style="dim"), title="events",
                       border_style="dim"))


@app.command()
def watch(job_id: str, address: Optional[str] = AddressOpt,
          once: bool = typer.Option(False, "--once", help="print one frame and exit"),
          interval: float = typer.Option(2.0, help="seconds between frames"), as_json: bool = JsonOpt):
    """One job, live: its loss curve drawn in the terminal, and its events as they arrive."""
    job = job_handle(reader(address), job_id)
    evs = job.events()
    s = job.status()
    if as_json:  # what one frame draws, as data
        print_json({"status": s, "metrics": job.metrics(), "events": evs})
        return
    width = min(console.width, 120)
    if once:
        console.print(_watch_view(job_id, s, job.metrics(), evs, width))
        return
    try:
        with Live(_watch_view(job_id, s, job.metrics(), evs, width), console=console, refresh_per_second=4) as live:
            while s["state"] not in TERMINAL:
                time.sleep(interval)
                s = job.status()
                evs += job.events(evs[-1]["seq"] if evs else 0)
                live.update(_watch_view(job_id, s, job.metrics(), evs, min(console.width, 120)))
    except KeyboardInterrupt:
        pass


@app.command()
def report(job_id: str, out: Path = typer.Option(Path("report.png"), "--out", "-o", help="PNG to write"),
           address: Optional[str] = AddressOpt, as_json: bool = JsonOpt):
    """Draw the run's story to a PNG: loss and grad norm over steps, with attempts, checkpoints and faults."""
    need_matplotlib("stalwart report")
    job = job_handle(reader(address), job_id)
    evs: list[dict] = []
    while batch := job.events(evs[-1]["seq"] if evs else 0):  # all of them: a page holds 1,000
        evs += batch
    path = _draw_report(job_id, job.status(), job.metrics(), evs, out)
    if as_json:
        print_json({"id": job_id, "path": str(path)})
    else:
        console.print(f"wrote {path}")


def _draw_report(job_id: str, s: dict, metrics: list[dict], evs: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    has_gn = any(_as_float(m.get("grad_norm")) is not None for m in metrics)
    ledger = Ledger.replay(evs, metrics)
    fig = plt.figure(figsize=(12, (7.5 if has_gn else 5) + 1.6))
    grid = fig.add_gridspec(3 if has_gn else 2, 1, height_ratios=[3, 2, 1] if has_gn else [3, 1])
    ax = fig.add_subplot(grid[0])
    gax = fig.add_subplot(grid[1], sharex=ax) if has_gn else None
    _draw_time_lost(fig.add_subplot(grid[-1]), ledger, s)
    colors = plt.get_cmap("tab10").colors

    by_attempt: dict = {}
    for m in metrics:
        by_attempt.setdefault(m.get("attempt") or 1, []).append(m)
    n_attempts = len(by_attempt)
    for i, (attempt, ms) in enumerate(sorted(by_attempt.items())):
        steps = [m["step"] for m in ms]
        loss = [_as_float(m.get("loss")) for m in ms]
        color = colors[i % len(colors)]
        # Earlier attempts wide and pale underneath: where a restart retraces them, both stay visible.
        lw, alpha = (1.3, 1.0) if i == n_attempts - 1 else (3.5, 0.45)
        ax.plot(steps, [v if v is not None else float("nan") for v in loss], color=color, lw=lw, alpha=alpha,
                label=f"attempt {attempt}", zorder=2 + i)
        bad = [(st_, v) for st_, v in zip(steps, loss) if v is not None and (v != v or abs(v) == float("inf"))]
        for st_, _ in bad:
            ax.axvline(st_, color="red", lw=0.8, alpha=0.6)
        if gax is not None:
            gn = [_as_float(m.get("grad_norm")) for m in ms]
            gax.plot(steps, [v if v is not None else float("nan") for v in gn], color=color,
                     lw=1.0 if i == n_attempts - 1 else 3.0, alpha=alpha, zorder=2 + i)

    # Restarts: each attempt after the first starts at the step it restored from; shade the redone work.
    restored = {e["attempt"]: e["data"].get("step") for e in evs if e["kind"] == "restored"}
    faults = [e for e in evs if e["kind"] == "fault"]
    for i, (attempt, ms) in enumerate(sorted(by_attempt.items())):
        if i == 0:
            continue
        start = restored.get(attempt, ms[0]["step"] - 1) or 0
        prev = sorted(by_attempt.items())[i - 1][1]
        lost_to = max(m["step"] for m in prev)
        for a in (ax, gax):
            if a is None:
                continue
            a.axvline(start, color="magenta", ls="--", lw=1.2)
            if lost_to > start:
                a.axvspan(start, lost_to, color="magenta", alpha=0.08)
        ax.annotate(f"attempt {attempt}\nresumes from step {start}", xy=(start, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(4, -4), textcoords="offset points", va="top", fontsize=8, color="magenta")

    # Faults (rollbacks, skips, restarts, the final failure): a red cross on the loss curve where it happened.
    last_loss = {}
    for m in metrics:
        last_loss.setdefault(m.get("attempt") or 1, {})[m["step"]] = _as_float(m.get("loss"))
    for e in faults:
        step = e["data"].get("step")
        if step is None:
            continue
        y = last_loss.get(e["attempt"], {}).get(step)
        what = e["data"].get("cause") or "fault"
        rank = e["data"].get("rank")
        label = f"{what}" + (f" (rank {rank})" if rank is not None else "")
        label += "\nrestart" if e["data"].get("restart") else "\nno restart"
        if y is not None and y == y:
            ax.plot([step], [y], marker="X", color="red", ms=10, zorder=5)
            ax.annotate(label, xy=(step, y), xytext=(6, 10), textcoords="offset points", fontsize=8, color="red")
        else:
            ax.axvline(step, color="red", lw=1.0)
            ax.annotate(label, xy=(step, 0.5), xycoords=("data", "axes fraction"), fontsize=8, color="red")
    for e in evs:
        if e["kind"] == "checkpoint_skipped" and e["data"].get("step") is not None:
            ax.plot([e["data"]["step"]], [0.03], marker="x", color="orange", ms=8,
                    transform=ax.get_xaxis_transform(), clip_on=False)

    # The live forecast: the curve law fitted on the run's first steps, its band, and where the run left it.
    band = s.get("forecast_band")
    if band:
        ax.fill_between(band["steps"], band["low"], band["high"], color="orange", alpha=0.18, lw=0, zorder=1,
                        label=f"forecast band ({band['level']:.0%}, fitted on steps {band['fitted_on'][0]}-"
                              f"{band['fitted_on'][1]})")
        ax.plot(band["steps"], band["mid"], color="orange", ls="--", lw=1.2, zorder=1, label="forecast")
        ax.axvspan(band["fitted_on"][0], band["fitted_on"][1], color="orange", alpha=0.05, zorder=0)
    for e in evs:
        if e["kind"] == "forecast_band_left" and e["data"].get("step") is not None:
            ax.plot([e["data"]["step"]], [e["data"]["loss"]], marker="o", mfc="none", color="orange", ms=11,
                    mew=2, zorder=6)
            ax.annotate(f"left the band ({e['data'].get('direction')})", xy=(e["data"]["step"], e["data"]["loss"]),
                        xytext=(6, -14), textcoords="offset points", fontsize=8, color="darkorange")

    # Committed checkpoints: green ticks along the bottom of the loss axes.
    ckpts = sorted({e["data"].get("step") for e in evs if e["kind"] == "checkpoint_committed"} - {None})
    if ckpts:
        ax.plot(ckpts, [0.0] * len(ckpts), ls="none", marker="^", color="green", ms=7,
                transform=ax.get_xaxis_transform(), clip_on=False, zorder=6)

    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], ls="none", marker="^", color="green", label="checkpoint committed"),
                Line2D([], [], ls="none", marker="X", color="red", label="fault")]
    if len(by_attempt) > 1:
        handles += [Line2D([], [], ls="--", color="magenta", label="restart: resumed from checkpoint"),
                    Patch(color="magenta", alpha=0.15, label="work redone after a rollback")]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    if gax is not None:
        gax.set_ylabel("grad norm")
        gn_vals = [v for m in metrics if (v := _as_float(m.get("grad_norm"))) is not None and v > 0 and v == v]
        if gn_vals and max(gn_vals) / max(min(gn_vals), 1e-12) > 50:
            gax.set_yscale("log")
        gax.grid(alpha=0.3)
        gax.set_xlabel("step")
    else:
        ax.set_xlabel("step")

    attempts = s.get("attempts") or []
    duration = ""
    if attempts and attempts[0].get("started"):
        duration = f" · {fmt_time((attempts[-1].get('ended') or time.time()) - attempts[0]['started'])}"
    final = fmt(s.get("loss"))
    fig.suptitle(f"{job_id}: {s.get('state', '?')} at step {s.get('step') or 0}{duration} · "
                 f"{len(attempts) or len(by_attempt)} attempt(s), restarts: {_restarts(s.get('restarts'))} · "
                 f"final loss {final} · {len(ckpts)} checkpoint(s)", fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# Where the time went, as `stalwart report` draws it (stalwart.monitoring.goodput names the kinds).
_TIME_COLORS = {"startup": "#b0b0b0", "productive": "#2ca02c", "recomputed": "#ff7f0e", "detection": "#d62728",
                "restart": "#9467bd", "restore": "#1f77b4"}


def _draw_time_lost(ax, ledger: Ledger, s: dict) -> None:
    """One bar along wall-clock time: start-up, training, and each fault's detection, restart, restore
    and recomputed steps, in colour; the goodput and the seconds lost by cause in the title."""
    from matplotlib.patches import Patch

    ended = s.get("state") in TERMINAL
    now = (s.get("updated") or time.time()) if ended else time.time()
    segments = ledger.timeline(now)
    summary = ledger.summary(now)
    if not segments or summary is None:
        ax.set_axis_off()
        ax.set_title("where the time went: no step reported yet", fontsize=9, loc="left")
        return
    t0 = segments[0][1]
    for kind, start, end, _ in segments:
        ax.broken_barh([(start - t0, end - start)], (0, 1), color=_TIME_COLORS.get(kind, "black"), lw=0)
    starts: dict[int, float] = {}
    for _, start, _, attempt in segments:
        starts.setdefault(attempt, start)
    for attempt, start in sorted(starts.items()):
        ax.annotate(f"attempt {attempt}", xy=(start - t0, 1.0), xytext=(2, 2), textcoords="offset points",
                    fontsize=7, va="bottom")
    ax.set_ylim(0, 1.5)
    ax.set_yticks([])
    ax.set_xlabel("seconds since submitted")
    lost = summary["lost_s"]
    parts = ", ".join(f"{k} {_seconds(v)}" for k, v in lost.items() if v >= 0.05) or "nothing"
    ratio = summary["ratio"]
    ax.set_title(f"where the time went: goodput {ratio:.1%}" if ratio is not None else "where the time went",
                 fontsize=9, loc="left")
    ax.text(1.0, 1.02, f"lost since the first step: {parts}; start-up {_seconds(summary['startup_s'])}",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    shown = {k for k, *_ in segments}
    ax.legend(handles=[Patch(color=c, label=k) for k, c in _TIME_COLORS.items() if k in shown],
              loc="upper center", bbox_to_anchor=(0.5, -0.55), ncol=6, fontsize=8, frameon=False)


def _seconds(x: float) -> str:
    return f"{x:.1f} s" if x < 60 else fmt_time(x)
