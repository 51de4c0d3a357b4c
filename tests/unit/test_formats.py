"""Export and weight reading, on checkpoints the engine writes in this process (one rank, no Ray):
sizes, format detection, checkpoints saved before the names and shapes were recorded, the spec's
init_from rules, and a failed export leaving its folder as it was."""

import sys
from pathlib import Path

import pytest
import torch

from stalwart.checkpointing import formats
from stalwart.checkpointing.engine import CheckpointEngine
from stalwart.checkpointing.storage import FileStorage
from stalwart.errors import CheckpointCorrupt, CheckpointNotFound, SpecError, StalwartError
from stalwart.launchers.strategies import DDPStrategy
from stalwart.spec import JobSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "tiny_gpt"))
from model import GPT  # noqa: E402

# dcp.load(..., no_dist=True) says it assumes one process: the tests read as one process on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def trained_ddp():
    torch.manual_seed(0)
    model = GPT(context=8, dim=16, layers=1, heads=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (2, 8))).sum().backward()
    optimizer.step()
    strategy = DDPStrategy()
    strategy.model, strategy.optimizer = model, optimizer
    return strategy


def save(storage, state, step=5, strategy="ddp"):
    engine = CheckpointEngine(storage, rank=0, world_size=1, strategy=strategy)
    engine.save(step, state)
    assert engine.wait().committed


@pytest.mark.parametrize("text,value", [("123", 123), ("500MB", 500 * 10**6), ("5GB", 5 * 10**9),
                                        ("4GiB", 4 * 2**30), ("1.5kb", 1500), (" 2 MiB ", 2 * 2**20)])
def test_sizes(text, value):
    assert formats.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "5 apples", "-3MB", "0"])
def test_bad_sizes_say_what_is_expected(text):
    with pytest.raises(StalwartError, match="size"):
        formats.parse_size(text)


def test_detect_and_check_weights(tmp_path):
    assert formats.detect(tmp_path) is None and formats.detect(tmp_path / "missing") is None
    with pytest.raises(StalwartError, match="holds no weights.*safetensors"):
        formats.check_weights(str(tmp_path))
    strategy = trained_ddp()
    storage = FileStorage(tmp_path / "ckpt")
    save(storage, strategy.state())
    formats.export(storage, None, "dcp", tmp_path / "dcp")
    formats.export(storage, None, "safetensors", tmp_path / "st")
    assert formats.detect(tmp_path / "dcp") == "dcp"
    assert formats.detect(tmp_path / "st") == "safetensors"
    assert formats.detect(f"file://{tmp_path / 'st' / 'model.safetensors'}") == "safetensors"
    for where in ("dcp", "st"):
        weights = formats.read_weights(str(tmp_path / where))
        assert weights.keys() == strategy.model.state_dict().keys()
        assert all(torch.equal(weights[k], v) for k, v in strategy.model.state_dict().items())
    with pytest.raises(StalwartError, match="local path"):
        formats.read_weights("s3://bucket/weights")


def test_load_weights_names_what_does_not_fit(tmp_path):
    strategy = trained_ddp()
    weights = dict(strategy.model.state_dict())
    weights.pop("pos")
    weights["head.weight"] = torch.zeros(2)
    with pytest.raises(StalwartError, match="do not fit the model.*pos.*head.weight"):
        strategy.load_weights(weights)


def test_a_compiled_models_checkpoint_exports_plain_names_and_plain_weights_load_into_it(tmp_path):
    # torch.compile names every tensor `_orig_mod.<name>`: exported weights go under the plain model's
    # names (what a user loads them into), and such weights initialize a compiled model again.
    torch.manual_seed(0)
    model = GPT(context=8, dim=16, layers=1, heads=2)
    compiled = torch.compile(model)  # no call: no compilation, only the wrapper's names
    optimizer = torch.optim.AdamW(compiled.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (2, 8))).sum().backward()
    optimizer.step()
    strategy = DDPStrategy()
    strategy.model, strategy.optimizer = compiled, optimizer
    assert all(k.startswith("_orig_mod.") for k in strategy.state()["model"])
    storage = FileStorage(tmp_path / "ckpt")
    save(storage, strategy.state())
    formats.export(storage, None, "safetensors", tmp_path / "st")
    weights = formats.read_weights(str(tmp_path / "st"))
    assert set(weights) == set(model.state_dict())
    formats.export(storage, None, "dcp", tmp_path / "dcp")
    import torch.distributed.checkpoint as dcp

    target = {"optim": {"state": {n: {"exp_avg": torch.empty_like(p)} for n, p in model.named_parameters()}}}
    dcp.load(target, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert torch.equal(target["optim"]["state"]["pos"]["exp_avg"], optimizer.state[model.pos]["exp_avg"])
    fresh = DDPStrategy()
    torch.manual_seed(1)
    fresh.model = torch.compile(GPT(context=8, dim=16, layers=1, heads=2))
    fresh.load_weights(weights)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(), compiled.state_dict().values()))
    assert formats.plain_name("blocks.0._checkpoint_wrapped_module.qkv.weight") == "blocks.0.qkv.weight"


def test_ddp_checkpoint_saved_before_the_names_exports_when_unambiguous(tmp_path):
    strategy = trained_ddp()
    state = strategy.state()
    del state["param_names"]  # as stalwart saved DDP checkpoints before it recorded them
    storage = FileStorage(tmp_path / "ckpt")
    save(storage, state)
    formats.export(storage, None, "dcp", tmp_path / "dcp")
    import torch.distributed.checkpoint as dcp

    target = {"optim": {"state": {n: {"exp_avg": torch.empty_like(p)} for n, p in strategy.model.named_parameters()}}}
    dcp.load(target, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for n, p in strategy.model.named_parameters():
        assert torch.equal(target["optim"]["state"][n]["exp_avg"], strategy.optimizer.state[p]["exp_avg"])


def test_deepspeed_checkpoint_without_shapes_is_refused_clearly(tmp_path):
    storage = FileStorage(tmp_path / "ckpt")
    save(storage, {"zero_stage": 3, "fp32": {"w": torch.ones(6)}, "frozen": {}, "buffers": {}, "optimizer": None},
         strategy="deepspeed")
    with pytest.raises(StalwartError, match="shapes"):
        formats.export(storage, None, "safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_the_folder_as_it_was(tmp_path):
    strategy = trained_ddp()
    storage = FileStorage(tmp_path / "ckpt")
    save(storage, strategy.state())
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    shard = next((tmp_path / "ckpt").glob("step-*/shard-*"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt):
        formats.export(storage, None, "dcp", out, force=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with pytest.raises(StalwartError, match="unknown export format 'npz'"):
        formats.export(storage, None, "npz", tmp_path / "new")
    with pytest.raises(CheckpointNotFound):
        formats.export(FileStorage(tmp_path / "empty"), None, "dcp", tmp_path / "new")
    with pytest.raises(StalwartError, match="is a file"):
        formats.export(storage, None, "dcp", out / "old.txt")
    assert not (tmp_path / "new").exists()


def test_spec_init_from_rules():
    base = {"name": "a", "entrypoint": "train:main"}
    spec = JobSpec.from_dict({**base, "checkpoint": {"init_from": "/data/weights"}})
    assert spec.checkpoint.init_from == "/data/weights"
    with pytest.raises(SpecError) as exc:
        JobSpec.from_dict({**base, "checkpoint": {"init_from": "/w", "resume_from": "/c"}})
    assert "not both" in str(exc.value)
    with pytest.raises(SpecError) as exc:
        JobSpec.from_dict({**base, "checkpoint": {"init_from": "s3://bucket/w"}})
    assert dict(exc.value.problems)["checkpoint.init_from"].startswith("init_from reads a local path")


def test_ddp_checkpoint_saved_before_the_names_is_refused_when_ambiguous(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))  # buffers among the keys
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    strategy = DDPStrategy()
    strategy.model, strategy.optimizer = model, optimizer
    state = strategy.state()
    del state["param_names"]
    storage = FileStorage(tmp_path / "ckpt")
    save(storage, state)
    with pytest.raises(StalwartError, match="does not record which parameter.*--format safetensors"):
        formats.export(storage, None, "dcp", tmp_path / "dcp")
    formats.export(storage, None, "safetensors", tmp_path / "st")  # the weights need no names
    assert formats.read_weights(str(tmp_path / "st")).keys() == model.state_dict().keys()
