"""Remove a node under a running job (ray.cluster_utils.Cluster) and check what survives.

Run as a script (it needs a Ray cluster of its own): prints one JSON line with the outcome.
Usage: python tests/chaos/node_loss_scenario.py HOME_DIR
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from jobspecs import lose_node, tiny_gpt_spec  # noqa: E402
from stalwart import Client  # noqa: E402
from stalwart.checkpointing import engine  # noqa: E402
from stalwart.checkpointing.shards import flatten  # noqa: E402
from stalwart.checkpointing.storage import open_storage  # noqa: E402

STEPS = 40


def final_tensors(status):
    storage = open_storage(status["checkpoint_uri"])
    step = engine.committed_steps(storage)[0]
    return step, flatten(engine.load(storage, step, 0).state)[0]


def main(home: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
    ray.init(address=cluster.address, namespace="stalwart", log_to_driver=False, logging_level="WARNING")
    client = Client(home=home)
    spec = tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10})
    spec["resources"]["placement"] = "pack"
    baseline = client.submit(spec).wait(timeout=300)

    job = client.submit(spec)
    deadline = time.monotonic() + 180
    while True:
        status = job.status()
        if status.get("step", 0) >= 13 and status.get("ranks"):
            break
        assert time.monotonic() < deadline, "job did not reach step 13"
        time.sleep(0.1)
    victim_id = status["ranks"][0]["node_id"]
    removed_at = time.time()
    lose_node(cluster, nodes, victim_id, status["ranks"])
    final = job.wait(timeout=300, raise_on_failure=False)
    events = job.events()
    fault = next((e for e in events if e["kind"] == "fault"), None)
    recovered = next((e for e in events if e["kind"] == "recovered"), None)
    step_a, a = final_tensors(baseline)
    step_b, b = final_tensors(final)
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print("RESULT " + json.dumps({
        "state": final["state"], "restarts": final.get("restarts"), "final_step": step_b,
        "bitwise_equal": equal and step_a == step_b,
        "acted_after_removal_s": (fault["ts"] - removed_at) if fault else None,
        "time_to_recover_s": recovered["data"]["time_to_recover_s"] if recovered else None,
        "ranks_after": [r["node_id"] != victim_id for r in final.get("ranks", [])],
    }), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
