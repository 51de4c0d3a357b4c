"""A node removed under a running job: it restarts on the remaining node and ends as if nothing happened."""

import pytest

from scenario import run_scenario


@pytest.mark.slow  # tests/cluster/test_multinode.py loses a real `ray start` node in the default run
def test_node_removal(tmp_path):
    result = run_scenario("node_loss_scenario.py", tmp_path)
    assert result["state"] == "SUCCEEDED", result
    assert result["restarts"] == {"node_failure": 1}, result
    assert result["bitwise_equal"], result
    assert all(result["ranks_after"]), result  # the new gang is on the surviving node
    assert result["acted_after_removal_s"] < 10, result
