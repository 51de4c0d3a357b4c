"""stalwart: run sharded PyTorch training jobs on Ray and keep them alive."""

from stalwart.errors import (CheckpointCorrupt, ClusterError, JobFailed, JobNotFound, SpecError, StalwartError,
                             StorageError)
from stalwart.spec import JobSpec

__version__ = "0.1.0"

__all__ = ["Client", "Job", "JobSpec", "TrainContext", "StalwartError", "SpecError", "StorageError",
           "CheckpointCorrupt", "JobFailed", "JobNotFound", "ClusterError", "__version__"]


def __getattr__(name):
    # Client and TrainContext pull in Ray and torch; import them only when asked for.
    if name in ("Client", "Job"):
        from stalwart import client

        return getattr(client, name)
    if name == "TrainContext":
        from stalwart.launchers.context import TrainContext

        return TrainContext
    raise AttributeError(f"module 'stalwart' has no attribute {name!r}")
