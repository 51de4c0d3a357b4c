import textwrap

import pytest

from stalwart.errors import SpecError
from stalwart.spec import JobSpec


def load(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(text))
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


def test_unimplemented_strategy_is_refused_clearly(tmp_path):
    with pytest.raises(SpecError) as exc:
        load(tmp_path, """
            name: demo
            entrypoint: train:main
            strategy: fsdp
        """)
    assert "not implemented" in problems(exc)["strategy.name"]


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
