"""Spec builders shared by the integration tests."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOBS = Path(__file__).resolve().parent / "jobs"


def job_spec(entrypoint: str, config: dict | None = None, workers: int = 2, **sections) -> dict:
    spec = {"name": "t", "entrypoint": entrypoint, "config": config or {}, "workdir": str(JOBS),
            "resources": {"workers": workers, "cpus_per_worker": 1}}
    spec.update(sections)
    return spec


def tiny_gpt_spec(steps: int = 60, **sections) -> dict:
    spec = {"name": "tiny-gpt", "entrypoint": "train:main", "workdir": str(REPO / "examples" / "tiny_gpt"),
            "config": {"steps": steps, "dim": 96, "layers": 2, "heads": 4, "context": 32, "batch_size": 16,
                       "corpus_bytes": 400_000, "warmup": 5, "lr": 0.003},
            "resources": {"workers": 2, "cpus_per_worker": 1},
            "checkpoint": {"every_steps": 20}}
    spec.update(sections)
    return spec
