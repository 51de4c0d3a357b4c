"""A node that Ray drains under a running job: an emergency checkpoint, then the job moves to the other
node, spending no node_failure budget, and ends as if nothing happened."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("drain_scenario.py")


@pytest.mark.slow  # 50 s: a cluster of its own; the SIGTERM test in test_recovery covers the preemption path
def test_drained_node(tmp_path):
    # A cluster of our own (head + 2 worker nodes) cannot share a process with the session's Ray.
    proc = subprocess.run([sys.executable, str(SCENARIO), str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["state"] == "SUCCEEDED", result
    assert result["restarts"] == {"preemption": 1}, result
    assert result["causes"] == ["preemption", "succeeded"], result
    assert result["emergency"]["committed"], result
    assert result["restored_step"] == result["emergency"]["step"], result  # the emergency checkpoint
    assert result["bitwise_equal"], result
    assert result["ranks_after"] and all(result["ranks_after"]), result  # moved off the draining node
    assert result["noticed_after_drain_s"] < 5, result
