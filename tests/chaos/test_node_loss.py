"""A node removed under a running job: it restarts on the remaining node and ends as if nothing happened."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("node_loss_scenario.py")


@pytest.mark.slow  # tests/cluster/test_multinode.py loses a real `ray start` node in the default run
def test_node_removal(tmp_path):
    # A cluster of our own (head + 2 worker nodes) cannot share a process with the session's Ray.
    proc = subprocess.run([sys.executable, str(SCENARIO), str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["state"] == "SUCCEEDED", result
    assert result["restarts"] == {"node_failure": 1}, result
    assert result["bitwise_equal"], result
    assert all(result["ranks_after"]), result  # the new gang is on the surviving node
    assert result["acted_after_removal_s"] < 10, result
