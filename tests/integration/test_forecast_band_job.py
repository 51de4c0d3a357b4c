"""The live forecast band on the tiny GPT, with real Ray: fitted by the controller on the run's first 20 %
of steps (with the LR schedule rank 0 sends), exported next to the loss, and left when the loss creeps up."""

from jobspecs import tiny_gpt_spec

from stalwart.cli.views import _draw_report, _watch_view


def test_forecast_band_is_fitted_live_exported_and_left_by_a_creeping_loss(client, tmp_path):
    # From step 120 the reported loss creeps up to 3x over 80 steps. The detectors that would roll it
    # back are off here, so the band is what notices.
    drift = {"kind": "drift", "step": 120, "factor": 3.0, "length": 80}
    spec = tiny_gpt_spec(steps=200, checkpoint={"every_steps": 50}, faults=[drift],
                         fault_tolerance={"spike_detection": False, "trend_detection": False})
    job = client.submit(spec)
    status = job.wait(timeout=600)
    assert status["state"] == "SUCCEEDED", status
    events = job.events()
    (ready,) = [e for e in events if e["kind"] == "forecast_ready"]
    data = ready["data"]
    assert data["final_step"] == 200 and data["fitted_on"][1] == 40  # 20 % of the steps
    assert data["low"] <= data["prediction"] <= data["high"]
    left = [e for e in events if e["kind"] == "forecast_band_left"]
    assert left, [e["kind"] for e in events]
    first = left[0]["data"]
    assert first["direction"] == "above" and drift["step"] < first["step"] <= drift["step"] + 60
    assert first["loss"] > first["high"]

    # The stored figures keep the band (a finished job read back from the store), for the views.
    fc, band = status["forecast"], status["forecast_band"]
    assert fc["final_step"] == 200 and fc["outside"] == "above" and fc["low"] <= fc["loss"] <= fc["high"]
    assert band["fitted_on"] == data["fitted_on"] and len(band["steps"]) == len(band["high"]) > 50
    metrics = job.metrics()
    out = _draw_report(job.id, status, metrics, events, tmp_path / "report.png")
    assert out.stat().st_size > 10_000
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(_watch_view(job.id, status, metrics, events, 120))
    text = console.export_text()
    assert "forecast" in text and "ABOVE the band" in text and "forecast_band_left" in text
