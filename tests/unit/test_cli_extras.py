"""Commands that draw need the `plot` extra: without matplotlib they say what to install, before doing anything."""

import importlib.util
import io

import pytest
from typer.testing import CliRunner

from stalwart.cli import app


@pytest.mark.parametrize("args", [["report", "some-job-1"], ["forecast", "fit", "runs.csv", "--target-compute", "1e21",
                                                                   "--plot", "out.png"]])
def test_drawing_without_matplotlib_names_the_extra(args, monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    monkeypatch.setenv("STALWART_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "pip install 'stalwart[plot]'" in " ".join(result.output.split())  # rich wraps at 80 columns
    assert not (tmp_path / "out.png").exists()


def test_watch_keeps_the_newest_fault_and_its_recovery_in_view_after_many_later_events():
    from rich.console import Console

    from stalwart.cli.views import _watch_view

    def event(seq, kind, message):
        return {"seq": seq, "ts": 1_700_000_000 + seq, "kind": kind, "message": message}

    evs = [event(1, "attempt_started", "attempt 1 started"), event(2, "fault", "node_failure on rank 1"),
           event(3, "restored", "restored from step 10"), event(4, "recovered", "recovered in 7.0 s")]
    # A long healthy stretch after the restart: interval changes and forecasts between the commits,
    # so the commits do not fold into one line.
    for i in range(5, 45, 2):
        evs += [event(i, "checkpoint_committed", f"checkpoint step {i} committed"),
                event(i + 1, "forecast", f"forecast {i}")]
    status = {"state": "RUNNING", "step": 44, "attempt": 2}
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(_watch_view("job-1", status, [], evs, 120))
    pane = console.export_text().split("events")[-1]
    lines = [line for line in pane.splitlines() if line.startswith("│")]
    assert len(lines) == 10
    kinds = [line.split()[2] for line in lines]  # "│", the time, the kind
    # The fault, its restore and its recovery come first, in the order they happened; then the newest seven.
    assert kinds[:3] == ["fault", "restored", "recovered"]
    assert "forecast 43" in pane and "forecast 35" not in pane


def test_the_run_summary_says_when_the_last_saves_did_not_commit(capsys):
    from stalwart.cli import jobs

    class Job:
        id = "tiny-gpt-1a2b3c"

    status = {"state": "SUCCEEDED", "step": 300, "loss": 2.0, "attempts": [{"started": 0, "ended": 60}],
              "last_checkpoint": "s3://b/tiny/step-000000250",
              "checkpoint_warning": "2 save(s) failed since the last commit: no committed checkpoint since step 250"}
    jobs._summary(Job(), status)
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the panel wraps at 80 columns
    assert "warning 2 save(s) failed since the last commit: no committed checkpoint since step 250" in out
