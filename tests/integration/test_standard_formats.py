"""Standard checkpoint formats, on checkpoints that real 2-rank jobs wrote (Ray, gloo): DDP, FSDP2 and
DeepSpeed ZeRO-3 (and ZeRO-2, marked slow) exported as a torch.distributed.checkpoint folder (loaded
back with dcp.load into a fresh model's and optimizer's state dicts) and as safetensors (loaded back
with safetensors' own reader), compared bitwise with the saved tensors; and jobs started from those
exports with checkpoint.init_from, whose first parameters must equal the exported ones."""

import json
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_state_dict
from typer.testing import CliRunner

from jobspecs import JOBS, REPO, deepspeed_mark, tiny_gpt_spec
from stalwart.checkpointing import engine, formats
from stalwart.checkpointing.shards import flatten
from stalwart.checkpointing.storage import open_storage
from stalwart.cli import app
from stalwart.errors import SpecError

sys.path.insert(0, str(REPO / "examples" / "tiny_gpt"))
from model import GPT  # noqa: E402

STEPS = 20
needs_deepspeed = deepspeed_mark()
STRATEGIES = {
    "ddp": "ddp",
    "fsdp": {"name": "fsdp"},
    "zero3": {"name": "deepspeed", "options": {"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}},
    "zero2": {"name": "deepspeed", "options": {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}},
}
# ZeRO's exports are slow (22 s, a DeepSpeed job trained first); test_strategies runs DeepSpeed in the default run.
PARAMS = [pytest.param("ddp"), pytest.param("fsdp"), pytest.param("zero3", marks=[needs_deepspeed, pytest.mark.slow]),
          pytest.param("zero2", marks=[needs_deepspeed, pytest.mark.slow])]
runner = CliRunner()
# dcp.load(..., no_dist=True) says it assumes one process: the tests read as one process on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def fresh_model_and_optimizer(config: dict):
    model = GPT(context=config["context"], dim=config["dim"], layers=config["layers"], heads=config["heads"])
    return model, torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.01)


@pytest.fixture(scope="module")
def trained(client):
    """One finished 2-rank job per strategy, checkpointed at steps 10 and 20 (shared by the tests)."""
    runs = {}

    def run(strategy: str) -> dict:
        if strategy not in runs:
            status = client.submit(tiny_gpt_spec(steps=STEPS, strategy=STRATEGIES[strategy],
                                                 checkpoint={"every_steps": 10})).wait(timeout=300)
            assert status["state"] == "SUCCEEDED"
            runs[strategy] = status
        return runs[strategy]

    return run


def saved(uri: str) -> tuple[dict, dict]:
    """The newest checkpoint's tensors as the job saved them, by path, and its manifest."""
    loaded = engine.load(open_storage(uri), engine.committed_steps(open_storage(uri))[0], 0)
    return flatten(loaded.state)[0], loaded.manifest


def expected_weights(strategy: str, tensors: dict, names: list[str], shapes: dict) -> dict:
    """Each parameter's value straight from the saved tensors, by how each strategy lays them out."""
    if strategy.startswith("zero"):  # flattened fp32 master weights
        return {n: tensors[f"/fp32/{n}"].reshape(shapes[n]) for n in names}
    return {n: tensors[f"/model/{n}"] for n in names}


def expected_optimizer(strategy: str, tensors: dict, names: list[str], shapes: dict) -> dict:
    """{(fqn, key): saved optimizer tensor} for exp_avg, exp_avg_sq and step."""
    out = {}
    for i, n in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if strategy == "ddp":  # torch's optimizer state dict, numbered in parameter order
                out[n, key] = tensors[f"/optimizer/state/{i}/{key}"]
            elif strategy == "fsdp":  # get_optimizer_state_dict: keyed by fqn
                out[n, key] = tensors[f"/optimizer/state/{n}/{key}"]
            elif key == "step":  # DeepSpeed: one step for the flat partition
                out[n, key] = tensors["/optimizer/scalars/step"]
            else:
                out[n, key] = tensors[f"/optimizer/state/{key}/{n}"].reshape(shapes[n])
    return out


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), f"{what} differs"


@pytest.mark.parametrize("strategy", PARAMS)
def test_dcp_export_loads_with_dcp_load_bitwise(trained, tmp_path, strategy):
    status = trained(strategy)
    out = tmp_path / "dcp"
    result = runner.invoke(app, ["checkpoints", "export", status["checkpoint_uri"], str(out), "--format", "dcp",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["step"] == STEPS and (out / ".metadata").is_file()
    # What torchtitan-style code does: a fresh model and optimizer, their state dicts filled by dcp.load.
    model, optimizer = fresh_model_and_optimizer(tiny_gpt_spec()["config"])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out), no_dist=True)
    tensors, manifest = saved(status["checkpoint_uri"])
    assert manifest["world_size"] == 2
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for n, want in expected_weights(strategy, tensors, names, shapes).items():
        assert_bitwise(model_sd[n], want, n)
    for (n, key), want in expected_optimizer(strategy, tensors, names, shapes).items():
        assert_bitwise(optim_sd["state"][n][key], want, f"{n}.{key}")
    assert optim_sd["param_groups"][0]["params"] == names
    # ...and the model takes them as they are.
    from torch.distributed.checkpoint.state_dict import set_state_dict
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    assert torch.equal(model.tok.weight, model_sd["tok.weight"])


@pytest.mark.parametrize("strategy", PARAMS)
def test_safetensors_export_loads_with_safetensors_bitwise(trained, tmp_path, strategy):
    status = trained(strategy)
    tensors, _ = saved(status["checkpoint_uri"])
    model, _ = fresh_model_and_optimizer(tiny_gpt_spec()["config"])
    names = list(model.state_dict())
    shapes = {n: p.shape for n, p in model.named_parameters()}
    want = expected_weights(strategy, tensors, names, shapes)
    one = tmp_path / "one"
    assert runner.invoke(app, ["checkpoints", "export", status["checkpoint_uri"], str(one), "--format",
                               "safetensors"]).exit_code == 0
    assert sorted(p.name for p in one.iterdir()) == ["model.safetensors"]
    weights = load_file(str(one / "model.safetensors"))
    assert list(weights) == names or sorted(weights) == sorted(names)
    for n in names:
        assert_bitwise(weights[n], want[n], n)
    # Above the shard size: several files and Hugging Face's index.
    split = tmp_path / "split"
    result = runner.invoke(app, ["checkpoints", "export", status["checkpoint_uri"], str(split), "--format",
                                 "safetensors", "--max-shard-size", "200KB"])
    assert result.exit_code == 0, result.output
    index = json.loads((split / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and sorted(index["weight_map"]) == sorted(names)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    for file in files:
        part = load_file(str(split / file))
        assert all(t.numel() * t.element_size() <= 200_000 for t in part.values()) and part
        for n, t in part.items():
            assert index["weight_map"][n] == file
            assert_bitwise(t, want[n], n)
    model.load_state_dict(formats.read_weights(str(split)))  # what init_from reads: the same weights


# Each strategy starts from an export: its own kind of job from its own checkpoint, the formats varied.
INIT = [pytest.param("ddp", "safetensors", id="ddp-safetensors"), pytest.param("fsdp", "dcp", id="fsdp-dcp"),
        pytest.param("zero3", "safetensors-sharded", id="zero3-safetensors-sharded",
                     marks=[needs_deepspeed, pytest.mark.slow])]


@pytest.mark.parametrize("strategy,fmt", INIT)
def test_job_starts_from_exported_weights_with_init_from(client, trained, tmp_path, strategy, fmt):
    source = trained(strategy)
    out = tmp_path / "weights"
    summary = formats.export(open_storage(source["checkpoint_uri"]), None, fmt.split("-")[0], out,
                             max_shard_bytes=200_000 if fmt.endswith("sharded") else formats.DEFAULT_MAX_SHARD_BYTES)
    exported = formats.read_weights(str(out))
    assert summary["step"] == STEPS and len(exported) == summary["tensors"]
    dump = tmp_path / "first.pt"
    spec = tiny_gpt_spec(steps=5, strategy=STRATEGIES[strategy], entrypoint="strategyjobs:dump_then_train",
                         workdir=str(JOBS), checkpoint={"every_steps": 10, "init_from": str(out)})
    spec["config"]["dump"] = str(dump)
    job = client.submit(spec)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED"
    first = torch.load(dump, weights_only=True)
    assert first["step"] == 0 and first["optimizer_state"] == 0  # step 0, a fresh optimizer
    assert sorted(first["params"]) == sorted(exported)
    for n, t in first["params"].items():
        assert_bitwise(t, exported[n], n)
    assert [e for e in job.events() if e["kind"] == "initialized"][0]["data"]["uri"] == str(out)
    losses = [m["loss"] for m in job.metrics()]
    assert len(losses) == 5 and losses[0] < 4.0  # it trains on from the trained weights (a fresh model: ~5.5)


# ---- bad input: a clear error, nothing written -------------------------------------------------------
def test_export_refuses_bad_input_and_writes_nothing(trained, tmp_path):
    uri = trained("ddp")["checkpoint_uri"]
    out = tmp_path / "out"
    result = runner.invoke(app, ["checkpoints", "export", uri, str(out), "--format", "onnx"])
    assert result.exit_code == 1 and "unknown format 'onnx'" in result.output and not out.exists()
    result = runner.invoke(app, ["checkpoints", "export", str(tmp_path / "nothing-here"), str(out), "--format", "dcp"])
    assert result.exit_code == 1 and "no committed checkpoint" in result.output and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["checkpoints", "export", uri, str(out), "--format", "dcp"])
    assert result.exit_code == 1 and "--force" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = runner.invoke(app, ["checkpoints", "export", uri, str(out), "--format", "dcp", "--force"])
    assert result.exit_code == 0, result.output
    assert "keep.txt" not in {p.name for p in out.iterdir()} and (out / ".metadata").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left



def test_export_by_job_id_and_step(trained, tmp_path):
    status = trained("ddp")
    out = tmp_path / "by-id"
    result = runner.invoke(app, ["checkpoints", "export", status["id"], str(out), "--format", "safetensors",
                                 "--step", "10"])
    assert result.exit_code == 0, result.output
    assert "exported step 10" in result.output and (out / "model.safetensors").is_file()
    result = runner.invoke(app, ["checkpoints", "export", status["id"], str(tmp_path / "x"), "--format", "dcp",
                                 "--step", "15"])
    assert result.exit_code == 1 and "step-000000015" in result.output and not (tmp_path / "x").exists()


def test_init_from_without_weights_is_refused_at_submit(client, trained, tmp_path):
    with pytest.raises(SpecError, match="checkpoint.init_from.*holds no weights"):
        client.submit(tiny_gpt_spec(steps=5, checkpoint={"init_from": str(tmp_path)}))
    # A DCP folder given as resume_from: the error says to use init_from.
    out = tmp_path / "dcp"
    formats.export(open_storage(trained("ddp")["checkpoint_uri"]), None, "dcp", out)
    with pytest.raises(SpecError, match="holds dcp weights.*init_from"):
        client.submit(tiny_gpt_spec(steps=5, checkpoint={"resume_from": str(out)}))


def test_export_reads_a_checkpoint_on_s3(trained, s3_server, s3_uri, tmp_path):
    """The same checkpoint copied to the S3 server exports to the same files' contents (ranged reads of
    the object store, not a local path)."""
    local = open_storage(trained("fsdp")["checkpoint_uri"])
    remote = open_storage(s3_uri, s3_server.options)
    for key in local.list():
        remote.write(key, local.read(key))
    formats.export(remote, None, "safetensors", tmp_path / "from-s3")
    formats.export(local, None, "safetensors", tmp_path / "from-file")
    a = load_file(str(tmp_path / "from-s3" / "model.safetensors"))
    b = load_file(str(tmp_path / "from-file" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
