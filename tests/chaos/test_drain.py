"""A node that Ray drains under a running job: an emergency checkpoint, then the job moves to the other
node, spending no node_failure budget, and ends as if nothing happened."""

import pytest

from scenario import run_scenario


@pytest.mark.slow  # 50 s: a cluster of its own; the SIGTERM test in test_recovery covers the preemption path
def test_drained_node(tmp_path):
    result = run_scenario("drain_scenario.py", tmp_path)
    assert result["state"] == "SUCCEEDED", result
    assert result["restarts"] == {"preemption": 1}, result
    assert result["causes"] == ["preemption", "succeeded"], result
    assert result["emergency"]["committed"], result
    assert result["restored_step"] == result["emergency"]["step"], result  # the emergency checkpoint
    assert result["bitwise_equal"], result
    assert result["ranks_after"] and all(result["ranks_after"]), result  # moved off the draining node
    assert result["noticed_after_drain_s"] < 5, result
