"""Predictable scaling: forecast a bigger run's loss from finished smaller runs, and a run's final
loss from its own first steps and its learning-rate schedule.

Pure functions over arrays and small files; nothing here touches the orchestrator (a sweep that
runs jobs would submit them through `stalwart.Client` and hand their results to these functions).

    runs = read_runs("runs.csv")                       # compute,loss or params,tokens,loss
    f = forecast_compute(runs, 1e21)                    # ForecastError if the fit cannot be trusted
    print(f.prediction, f.low, f.high)
    c = forecast_curve(steps, losses, lr_schedule)      # the loss at the schedule's last step
"""

from stalwart.forecast.compute_law import ComputeFit, fit_compute_law
from stalwart.forecast.curve import CurveFit, CurveForecast, annealing_areas, fit_curve, forecast_curve
from stalwart.forecast.errors import ForecastError, Problem, RunsFileError
from stalwart.forecast.frontier import Frontier, extract_frontier
from stalwart.forecast.predict import Forecast, forecast_compute, forecast_size, resolve_target
from stalwart.forecast.runs import Runs, read_runs, runs_from_rows
from stalwart.forecast.size_law import SizeFit, fit_size_law

__all__ = ["ComputeFit", "CurveFit", "CurveForecast", "Forecast", "ForecastError", "Frontier", "Problem",
           "Runs", "RunsFileError", "SizeFit", "annealing_areas", "extract_frontier", "fit_compute_law",
           "fit_curve", "fit_size_law", "forecast_compute", "forecast_curve", "forecast_size", "read_runs",
           "resolve_target", "runs_from_rows"]
