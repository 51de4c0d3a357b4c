"""Drain a node under a running job with Ray's drain API (as an autoscaler does before a spot VM goes) and
check that the job saves at once, moves to the other node and ends as if nothing happened.

Run as a script (it needs a Ray cluster of its own): prints one JSON line with the outcome.
Usage: python tests/chaos/drain_scenario.py HOME_DIR
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.core.generated import autoscaler_pb2  # noqa: E402

from jobspecs import tiny_gpt_spec  # noqa: E402
from stalwart import Client  # noqa: E402
from stalwart.checkpointing import engine  # noqa: E402
from stalwart.checkpointing.shards import flatten  # noqa: E402
from stalwart.checkpointing.storage import open_storage  # noqa: E402

STEPS = 40
# Rank 0 of the first attempt burns CPU on top of each step (parameters unchanged): the drain lands mid-run.
SLOW_FIRST_ATTEMPT = [{"kind": "slow", "rank": 0, "attempt": 1, "step": 1, "length": STEPS, "factor": 5}]


def final_tensors(status):
    storage = open_storage(status["checkpoint_uri"])
    step = engine.committed_steps(storage)[0]
    return step, flatten(engine.load(storage, step, 0).state)[0]


def main(home: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, namespace="stalwart", log_to_driver=False, logging_level="WARNING")
    client = Client(home=home)
    spec = tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10})
    spec["resources"]["placement"] = "pack"
    baseline = client.submit(spec).wait(timeout=300)

    job = client.submit({**spec, "faults": SLOW_FIRST_ATTEMPT})
    deadline = time.monotonic() + 180
    while True:
        status = job.status()
        if status.get("step", 0) >= 13 and status.get("ranks"):
            break
        assert time.monotonic() < deadline, "job did not reach step 13"
        time.sleep(0.1)
    victim = status["ranks"][0]["node_id"]
    gcs = ray._raylet.GcsClient(address=cluster.address)
    drained_at = time.time()
    accepted, why = gcs.drain_node(victim, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "spot instance reclaimed", int((drained_at + 120) * 1000))
    assert accepted, why
    final = job.wait(timeout=300, raise_on_failure=False)
    events = job.events()
    emergency = next((e for e in events if e["kind"] == "emergency_checkpoint"), None)
    restored = next((e for e in events if e["kind"] == "restored"), None)
    draining = next((e for e in events if e["kind"] == "node_draining"), None)
    step_a, a = final_tensors(baseline)
    step_b, b = final_tensors(final)
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print("RESULT " + json.dumps({
        "state": final["state"], "restarts": final.get("restarts"), "final_step": step_b,
        "causes": [att["cause"] for att in final.get("attempts", [])],
        "bitwise_equal": equal and step_a == step_b,
        "noticed_after_drain_s": (draining["ts"] - drained_at) if draining else None,
        "emergency": emergency and emergency["data"], "restored_step": restored and restored["data"]["step"],
        "ranks_after": [r["node_id"] != victim for r in final.get("ranks", [])],
    }), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
