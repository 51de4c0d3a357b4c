"""stalwart: run sharded PyTorch training jobs on Ray and keep them alive."""

from stalwart.errors import (CheckpointCorrupt, ClusterError, JobFailed, JobNotFound, Preempted, SpecError,
                             StalwartError, StorageError)
from stalwart.spec import JobSpec

__version__ = "0.1.0"

__all__ = ["Client", "Job", "JobSpec", "TrainContext", "context", "StalwartError", "SpecError", "StorageError",
           "CheckpointCorrupt", "JobFailed", "JobNotFound", "ClusterError", "Preempted", "__version__"]


def context():
    """The job's TrainContext inside a script run by stalwart (script mode); None anywhere else.

    Built on first use from the rank's environment; call it after init_process_group, e.g.

        ctx = stalwart.context()
        if ctx: ctx.track(model, optimizer); start = ctx.restore()
        ...
        if ctx: ctx.report(step, loss=loss); ctx.checkpoint(step)
    """
    import os

    if "STALWART_JOB_ID" not in os.environ:
        return None  # a plain run (torchrun, python): nothing to import
    from stalwart.launchers.context import current

    return current()


def __getattr__(name):
    # Client and TrainContext pull in Ray and torch; import them only when asked for.
    if name in ("Client", "Job"):
        from stalwart import client

        return getattr(client, name)
    if name == "TrainContext":
        from stalwart.launchers.context import TrainContext

        return TrainContext
    raise AttributeError(f"module 'stalwart' has no attribute {name!r}")
