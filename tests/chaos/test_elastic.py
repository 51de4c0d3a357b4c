"""Elastic training: a node lost -> fewer ranks instead of waiting; a node back -> full size again."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("elastic_scenario.py")


@pytest.mark.slow  # 50 s; the supervisor's unit tests step shrink and grow against a scripted gang
def test_shrink_then_grow_back(tmp_path):
    proc = subprocess.run([sys.executable, str(SCENARIO), str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["state"] == "SUCCEEDED", result
    assert result["world_sizes"] == [2, 1, 2], result
    assert result["causes"] == ["node_failure", "grow", "succeeded"], result
    assert result["shrinking"] and result["growing"] and result["unreachable"], result
    assert result["restarts"] == {"node_failure": 1}, result
    assert result["final_step"] == 200, result
