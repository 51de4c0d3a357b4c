import sys
import textwrap

import pytest

from stalwart.errors import SpecError
from stalwart.spec import MASK, SECRET_FIELDS, JobSpec, masked_secrets


def load(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(text))
    if not (tmp_path / "train.py").exists():
        (tmp_path / "train.py").write_text("def main(ctx, config):\n    pass\n")
    return JobSpec.from_yaml(path)


def problems(exc):
    return dict(exc.value.problems)


def test_minimal_spec_gets_defaults_and_workdir(tmp_path):
    spec = load(tmp_path, """
        name: demo
        entrypoint: train:main
    """)
    assert spec.resources.workers == 2
    assert spec.strategy.name == "ddp"
    assert spec.workdir == str(tmp_path.resolve())
    assert spec.fault_tolerance.budgets["user_error"] == 0


def test_example_job_is_valid():
    spec = JobSpec.from_yaml("examples/tiny_gpt/job.yaml")
    assert spec.entrypoint == "train:main"
    assert JobSpec.from_yaml("examples/script_mode/job.yaml").script.script == "train_ddp.py"


def test_unknown_field_names_path_and_alternatives(tmp_path):
    with pytest.raises(SpecError) as exc:
        load(tmp_path, """
            name: demo
            entrypoint: train:main
            resources: {workers: 2, cpu_per_worker: 1}
        """)
    msg = problems(exc)["resources.cpu_per_worker"]
    assert "unknown field" in msg and "cpus_per_worker" in msg


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(SpecError) as exc:
        load(tmp_path, """
            name: Bad Name
            entrypoint: train
            resources: {workers: 0}
        """)
    p = problems(exc)
    assert set(p) == {"name", "entrypoint", "resources.workers"}
    assert "module:function" in p["entrypoint"]
    assert "greater than or equal to 1" in p["resources.workers"]


def test_sharded_strategies_are_accepted_and_their_options_checked(tmp_path):
    spec = load(tmp_path, """
        name: demo
        entrypoint: train:main
        strategy: {name: fsdp, options: {mixed_precision: {param_dtype: bfloat16}, activation_checkpointing: true}}
    """)
    assert spec.strategy.name == "fsdp" and spec.strategy.options["activation_checkpointing"] is True
    with pytest.raises(SpecError) as exc:
        load(tmp_path, """
            name: demo
            entrypoint: train:main
            strategy: {name: fsdp, options: {mixed_precision: {param_dtype: bf16}, shard: [Block]}}
        """)
    msg = problems(exc)["strategy.options"]
    assert "unknown fsdp option 'shard'" in msg and "param_dtype must be one of" in msg


def test_deepspeed_stage_is_checked_and_a_missing_package_named(tmp_path, monkeypatch):
    with pytest.raises(SpecError) as exc:
        JobSpec.from_dict({"name": "x", "entrypoint": "a:b",
                           "strategy": {"name": "deepspeed", "options": {"zero_optimization": {"stage": 0}}}})
    assert "stage must be 1, 2 or 3" in problems(exc)["strategy.options"]
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SpecError) as exc:
        JobSpec.from_dict({"name": "x", "entrypoint": "a:b", "strategy": "deepspeed"})
    assert "pip install 'stalwart[deepspeed]'" in problems(exc)["strategy.options"]


def test_script_entrypoint(tmp_path):
    (tmp_path / "train.py").write_text("print('hi')\n")
    spec = load(tmp_path, """
        name: demo
        entrypoint: {script: train.py, args: [--steps, 40, --lr, 0.1]}
    """)
    assert spec.script.args == ["--steps", "40", "--lr", "0.1"]
    assert spec.script.path(spec.workdir) == tmp_path.resolve() / "train.py"
    assert JobSpec.model_validate(spec.to_dict()).script == spec.script  # survives the trip to the ranks
    with pytest.raises(SpecError) as exc:
        load(tmp_path, "name: demo\nentrypoint: {script: nope.py}\n")
    assert "no such file" in problems(exc)["entrypoint.script"]
    with pytest.raises(SpecError) as exc:
        load(tmp_path, "name: demo\nentrypoint: {scrip: train.py}\n")
    assert "expected {script: train.py" in problems(exc)["entrypoint"]
    with pytest.raises(SpecError) as exc:
        load(tmp_path, "name: demo\nentrypoint: train.py\n")
    assert "{script: train.py}" in problems(exc)["entrypoint"]


def test_an_entrypoint_that_cannot_be_imported_is_refused_at_load(tmp_path):
    (tmp_path / "train.py").write_text("import torch\nfrom os import path as p\n\n\ndef main(ctx, config):\n    pass\n\n\n"
                                       "def helper():\n    pass\n\n\nif True:\n    alias = main\n")
    for entrypoint in ("train:main", "train:alias", "train:p", "json:dumps"):  # json: an installed module
        load(tmp_path, f"name: demo\nentrypoint: {entrypoint}\n")
    with pytest.raises(SpecError) as exc:
        load(tmp_path, "name: demo\nentrypoint: trian:main\n")
    assert "no module 'trian'" in problems(exc)["entrypoint"] and "did you mean 'train'" in problems(exc)["entrypoint"]
    with pytest.raises(SpecError) as exc:
        load(tmp_path, "name: demo\nentrypoint: train:mian\n")
    assert "defines no 'mian' (its functions: helper, main)" in problems(exc)["entrypoint"]
    # What cannot be told without running it, or code that comes from elsewhere, is left to the ranks: a
    # file this Python cannot parse, names bound in ways a reading cannot follow, a module that may be
    # installed on the cluster only (not a near miss of a file here), an environment made there.
    (tmp_path / "broken.py").write_text("def main(:\n")
    load(tmp_path, "name: demo\nentrypoint: broken:main\n")
    (tmp_path / "star.py").write_text("from train import *\n")
    load(tmp_path, "name: demo\nentrypoint: star:main\n")
    (tmp_path / "loops.py").write_text("for step in range(2):\n    pass\nwith open(__file__) as handle:\n    pass\n"
                                       "try:\n    import nothing_here\nexcept ImportError as missing:\n    pass\n")
    for name in ("step", "handle", "missing"):
        load(tmp_path, f"name: demo\nentrypoint: loops:{name}\n")
    (tmp_path / "dyn.py").write_text("def setup():\n    global main\n    main = print\n\n\nsetup()\n")
    load(tmp_path, "name: demo\nentrypoint: dyn:main\n")
    load(tmp_path, "name: demo\nentrypoint: mycluster_pkg.train:main\n")
    load(tmp_path, "name: demo\nentrypoint: trian:main\nruntime_env: {pip: [trian]}\n")
    load(tmp_path, "name: demo\nentrypoint: elsewhere:main\nruntime_env: {working_dir: 's3://b/code.zip'}\n")
    load(tmp_path, "name: demo\nentrypoint: elsewhere:main\nworkdir: /opt/on/the/cluster\n")


def test_bad_uri_scheme(tmp_path):
    with pytest.raises(SpecError) as exc:
        load(tmp_path, """
            name: demo
            entrypoint: train:main
            checkpoint: {uri: "gs://bucket/x"}
        """)
    assert "unsupported URI scheme" in problems(exc)["checkpoint.uri"]


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        JobSpec.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load(tmp_path, "name: [unclosed\n")
    with pytest.raises(SpecError, match="required field is missing"):
        load(tmp_path, "name: demo\n")


def test_budgets_merge_with_defaults():
    spec = JobSpec.from_dict({"name": "x", "entrypoint": "a:b", "fault_tolerance": {"budgets": {"hang": 7}}})
    assert spec.fault_tolerance.budgets["hang"] == 7
    assert spec.fault_tolerance.budgets["node_failure"] == 5


def test_spec_error_pickles():
    import pickle

    err = SpecError([("a.b", "bad")], "x.yaml")
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == [("a.b", "bad")] and "x.yaml" in str(again)


def test_niceness_is_bounded_and_refusal_is_explained(monkeypatch):
    from stalwart.launchers import niceness

    with pytest.raises(SpecError, match="niceness"):
        JobSpec.from_dict({"name": "n", "entrypoint": "m:f", "resources": {"niceness": 20}})
    assert JobSpec.from_dict({"name": "n", "entrypoint": "m:f"}).resources.niceness == 0

    def refuse(*args):
        raise PermissionError("not permitted")

    monkeypatch.setattr(niceness.os, "getpriority", lambda *a: 15)
    monkeypatch.setattr(niceness.os, "setpriority", refuse)
    note = niceness.set_niceness(0)
    assert "niceness 15, not 0" in note and "CAP_SYS_NICE" in note
    assert niceness.set_niceness(0, all_threads=True) == note
    assert niceness.set_niceness(None) is None and niceness.set_niceness(15) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="niceness is per thread on Linux only")
def test_niceness_applies_to_the_calling_thread_and_what_it_starts():
    import os
    import threading

    from stalwart.launchers.niceness import set_niceness

    seen = {}

    def body():
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert set_niceness(min(19, base + 2)) is None  # raising needs no privilege
        child = threading.Thread(target=lambda: seen.update(child=os.getpriority(os.PRIO_PROCESS, 0)))
        child.start()
        child.join()
        seen.update(base=base, mine=os.getpriority(os.PRIO_PROCESS, 0))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen["mine"] == seen["child"] == min(19, seen["base"] + 2)
    assert os.getpriority(os.PRIO_PROCESS, 0) == seen["base"]  # this thread is untouched


SECRET = "s3cr3t-4f9a1c"


def keyed(**s3) -> dict:
    return {"name": "k", "entrypoint": "a:b",
            "checkpoint": {"s3": {"access_key_id": "AKID-7e2b", "secret_access_key": SECRET, **s3}}}


def test_s3_keys_are_masked_wherever_the_spec_is_written():
    import json

    spec = JobSpec.from_dict(keyed())
    masked = spec.to_dict()
    assert masked["checkpoint"]["s3"]["secret_access_key"] == MASK
    assert masked["checkpoint"]["s3"]["access_key_id"] == MASK
    for text in (json.dumps(masked), repr(spec), str(spec), repr(spec.checkpoint.s3), spec.model_dump_json()):
        assert SECRET not in text and "AKID-7e2b" not in text
    # No keys: nothing to mask, and the AWS credential chain is used.
    plain = JobSpec.from_dict({"name": "k", "entrypoint": "a:b"})
    assert plain.to_dict()["checkpoint"]["s3"]["secret_access_key"] is None and plain.secrets() == {}


def test_s3_keys_are_revealed_only_on_request_and_restored_into_a_masked_spec():
    spec = JobSpec.from_dict(keyed())
    assert spec.checkpoint.s3.secret_access_key.get_secret_value() == SECRET
    assert spec.to_dict(reveal_secrets=True)["checkpoint"]["s3"]["secret_access_key"] == SECRET
    assert JobSpec.from_dict(spec.to_dict(reveal_secrets=True)) == spec
    assert spec.secrets() == {"checkpoint.s3.access_key_id": "AKID-7e2b", "checkpoint.s3.secret_access_key": SECRET}
    assert masked_secrets(spec.to_dict()) == list(SECRET_FIELDS)
    assert JobSpec.with_secrets(spec.to_dict(), spec.secrets()) == spec
    with pytest.raises(SpecError) as exc:
        JobSpec.with_secrets(spec.to_dict(), {})
    assert "masked" in str(exc.value)


def test_a_masked_value_given_as_a_key_is_refused(tmp_path):
    masked = JobSpec.from_dict(keyed()).to_dict()
    with pytest.raises(SpecError) as exc:
        JobSpec.from_dict(masked)
    p = problems(exc)
    assert "how stalwart prints a secret" in p["checkpoint.s3.secret_access_key"]
    assert "AWS credential chain" in p["checkpoint.s3.access_key_id"]
    with pytest.raises(SpecError, match="how stalwart prints a secret"):
        load(tmp_path, """
            name: demo
            entrypoint: train:main
            checkpoint: {s3: {access_key_id: AKID, secret_access_key: "**********"}}
        """)


def test_errors_never_quote_a_secret():
    with pytest.raises(SpecError) as exc:  # a wrong type is named, the value not quoted
        JobSpec.from_dict(keyed(secret_access_key=12345))
    assert "valid string" in str(exc.value) and "12345" not in str(exc.value)
    with pytest.raises(SpecError) as exc:  # one key only: the pair check must not echo the one given
        JobSpec.from_dict({"name": "k", "entrypoint": "a:b", "checkpoint": {"s3": {"secret_access_key": SECRET}}})
    assert "set both" in str(exc.value) and SECRET not in str(exc.value)
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as raw:  # a raw pydantic error hides its input too
        JobSpec.model_validate(keyed(secret_access_key=None))
    assert "AKID-7e2b" not in str(raw.value)


@pytest.mark.parametrize("change,says", [
    ({}, "set checkpoint.memory_every_steps"),
    ({"strategy": {"name": "deepspeed", "options": {"zero_optimization": {"stage": 3}}},
      "checkpoint": {"memory_every_steps": 1}}, "not 3"),
    ({"strategy": {"name": "deepspeed", "options": {"tensor_parallel": {"autotp_size": 2}}},
      "checkpoint": {"memory_every_steps": 1}}, "not with tensor_parallel.autotp_size > 1"),
    ({"resources": {"workers": 2, "gpus_per_worker": 1}, "checkpoint": {"memory_every_steps": 1}}, "CPU jobs"),
])
def test_memory_in_loop_where_it_cannot_work_is_refused_with_what_to_change(change, says):
    spec = {"name": "j", "entrypoint": "m:f", "checkpoint": {"memory_in_loop": True}}
    for key, value in change.items():
        spec[key] = {**spec.get(key, {}), **value}
    with pytest.raises(SpecError) as exc:
        JobSpec.from_dict(spec)
    assert exc.value.problems[0][0] == "checkpoint.memory_in_loop" and says in exc.value.problems[0][1]
    assert "memory_in_loop" in exc.value.problems[0][1]
    from stalwart.launchers.strategies import deepspeed_missing

    works = [{"name": "ddp"}, {"name": "fsdp"}]
    if deepspeed_missing() is None:
        works += [{"name": "deepspeed"}, {"name": "deepspeed", "options": {"zero_optimization": {"stage": 1}}}]
    for strategy in works:  # where it works
        JobSpec.from_dict({"name": "j", "entrypoint": "m:f", "strategy": strategy,
                           "checkpoint": {"memory_in_loop": True, "memory_every_steps": "auto"}})
