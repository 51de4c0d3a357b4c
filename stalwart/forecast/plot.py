"""One picture of a forecast: the runs, the frontier, the fitted law and its extrapolation with the
band, and the target. Drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stalwart.forecast.compute_law import ComputeFit
from stalwart.forecast.predict import Forecast
from stalwart.forecast.runs import Runs


def plot_forecast(forecast: Forecast, runs: Runs, path: str | Path, actual: float | None = None,
                  title: str | None = None) -> Path:
    """Write the picture of `forecast` (made from `runs`) to `path` (format from its suffix: .png,
    .svg, .pdf). `actual`: the target's loss when it was run (a held-out run), drawn beside the
    forecast. Returns the path. Raises OSError if it cannot be written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    try:
        ax.scatter(runs.compute, runs.loss, s=12, color="0.7", label=f"runs ({len(runs)})", zorder=1)
        target = forecast.target["compute"]
        grid = np.geomspace(float(min(runs.compute.min(), target)), max(target, float(runs.compute.max())) * 1.5, 200)
        fitted_max = float(forecast.used.compute.max())
        qs = ((1 - forecast.level) / 2, 0.5, (1 + forecast.level) / 2)
        if isinstance(forecast.fit, ComputeFit):
            fr = forecast.frontier
            ax.scatter(fr.compute, fr.loss, s=28, color="black", label="frontier (best per budget)", zorder=3)
            q_lo, q_mid, q_hi = forecast.fit.quantiles(grid, qs)
            label = "L(C) = a·C^-b + c"
        else:
            # Along the target's tokens per parameter: N = sqrt(C / (6 r)), D = r N.
            ratio = forecast.target["tokens"] / forecast.target["params"]
            n = np.sqrt(grid / (6 * ratio))
            q_lo, q_mid, q_hi = forecast.fit.quantiles(n, ratio * n, qs)
            ax.scatter(forecast.used.compute, forecast.used.loss, s=22, color="black",
                       label=f"runs fitted ({len(forecast.used)})", zorder=3)
            label = f"L(N, D) at {ratio:.3g} tokens per parameter"
        inside = grid <= fitted_max
        ax.plot(grid[inside], q_mid[inside], color="tab:blue", label=label)
        ax.plot(grid[~inside], q_mid[~inside], color="tab:blue", linestyle="--", label="extrapolation")
        ax.fill_between(grid[~inside], q_lo[~inside], q_hi[~inside], color="tab:blue", alpha=0.15,
                        label=f"{forecast.level:.0%} band")
        ax.errorbar([target], [forecast.prediction],
                    yerr=[[forecast.prediction - forecast.low], [forecast.high - forecast.prediction]],
                    fmt="*", color="tab:red", markersize=12, capsize=4,
                    label=f"forecast {forecast.prediction:.3f} [{forecast.low:.3f}, {forecast.high:.3f}]", zorder=4)
        if actual is not None:
            err = (forecast.prediction - actual) / actual
            ax.scatter([target], [actual], marker="o", s=70, facecolors="none", edgecolors="tab:green", linewidths=2,
                       label=f"held-out run {actual:.3f} (forecast off by {err:+.1%})", zorder=5)
        ax.axvline(fitted_max, color="0.5", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        from matplotlib.ticker import FormatStrFormatter

        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))  # losses, not powers of ten
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
        ax.set_xlabel("training compute (FLOPs)")
        ax.set_ylabel("loss")
        title = (title + ": " if title else "") + ("forecast from L(C) on the frontier" if forecast.law == "compute"
                                                   else "forecast from L(N, D)")
        if forecast.warnings:
            title += " (forced: " + ", ".join(p.code for p in forecast.warnings) + ")"
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        return path
    finally:
        plt.close(fig)
