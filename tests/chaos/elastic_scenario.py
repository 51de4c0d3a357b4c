"""Elastic: lose a node, go on with fewer ranks, grow back when a node joins. Prints one RESULT line.

Usage: python tests/chaos/elastic_scenario.py HOME_DIR
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from jobspecs import lose_node, tiny_gpt_spec, wait_for  # noqa: E402
from stalwart import Client  # noqa: E402


def main(home: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    ray.init(address=cluster.address, namespace="stalwart", log_to_driver=False, logging_level="WARNING")
    client = Client(home=home)
    spec = tiny_gpt_spec(steps=200, checkpoint={"every_steps": 10}, fault_tolerance={"elastic_wait_s": 2})
    spec["resources"].update(min_workers=1, placement="spread")
    # The short-handed attempt runs slowly on purpose (~+0.1 s CPU a step), so on a fast machine the job cannot
    # finish before the new node registers and the next checkpoint commits; the parameters are unchanged by it.
    spec["faults"] = [{"kind": "slow", "rank": 0, "attempt": 2, "step": 1, "length": 1000, "factor": 2}]
    job = client.submit(spec)
    status = wait_for(lambda: (s := job.status()).get("step", 0) >= 13 and s.get("ranks") and s, timeout=240)
    victim_id = status["ranks"][1]["node_id"]
    lose_node(cluster, nodes, victim_id, status["ranks"])
    # Short-handed now; a fresh node joins once the single rank has made some progress.
    wait_for(lambda: any(e["kind"] == "attempt_started" and e["data"].get("world_size") == 1 for e in job.events()),
             timeout=240)
    wait_for(lambda: job.status().get("step", 0) >= 25, timeout=240)
    cluster.add_node(num_cpus=1)
    final = job.wait(timeout=300, raise_on_failure=False)
    kinds = [e["kind"] for e in job.events()]
    print("RESULT " + json.dumps({
        "state": final["state"], "restarts": final.get("restarts"),
        "world_sizes": [a["world_size"] for a in final["attempts"]],
        "causes": [a["cause"] for a in final["attempts"]],
        "shrinking": "shrinking" in kinds, "growing": "growing" in kinds, "final_step": final.get("step"),
        "unreachable": "node_unreachable" in kinds,
        "events": [(e["kind"], e.get("message", "")[:120]) for e in job.events()],
    }), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
