"""What the reporter's thread may do with the values a rank reports."""

import socket

import pytest
import torch
import torch.distributed as dist

from stalwart.launchers.reporter import _num


def test_plain_values_and_tensors_become_floats():
    assert _num(None) is None
    assert _num(torch.tensor(2.5)) == 2.5
    assert _num(3) == 3.0
    assert _num("not a number") is None


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_dtensor_is_read_locally_only_when_replicated(one_rank_group):
    # FSDP's clip_grad_norm_ returns a replicated DTensor; reading a partial one would be a collective,
    # which the reporter's background thread must never start.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = init_device_mesh("cpu", (1,))
    assert _num(DTensor.from_local(torch.tensor(1.5), mesh, [Replicate()])) == 1.5
    assert _num(DTensor.from_local(torch.tensor(1.5), mesh, [Partial()])) is None


def test_a_slow_restore_reports_its_bytes_and_stops_when_it_ends(monkeypatch):
    import time

    from stalwart.launchers import context

    monkeypatch.setattr(context, "RESTORE_PROGRESS_S", 0.02)

    class Share:
        step, bytes_read = 20, 0
        manifest = {"shards": [{"size": 600}, {"size": 400}]}

    class Events:
        def __init__(self):
            self.sent = []

        def event(self, kind, **data):
            self.sent.append((kind, data))

    share, reporter = Share(), Events()
    with context._RestoreProgress(reporter, share):
        for n in (100, 500, 900):
            share.bytes_read = n
            time.sleep(0.1)
    time.sleep(0.1)
    sent = [d["bytes_read"] for k, d in reporter.sent]
    assert sent == [100, 500, 900]  # each change once, nothing after the read ended
    assert {(k, d["step"], d["bytes_total"]) for k, d in reporter.sent} == {("restore_progress", 20, 1000)}
