"""Commands that draw need the `plot` extra: without matplotlib they say what to install, before doing anything."""

import importlib.util

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
