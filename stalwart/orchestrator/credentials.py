"""A running job's secrets (its spec's S3 keys), kept where a controller restart finds them and no disk does.

The controller's store holds the masked spec only. The values are put in the Ray cluster's internal
key-value store (the GCS's memory; its Redis, where GCS fault tolerance is set up), keyed by job id,
for as long as the job runs: Ray restarts a dead controller in the same cluster, and the new one
takes them back from there. When the whole cluster restarts they are gone, and a job that had keys
cannot resume (the user resubmits it). Ray offers no public key-value store; this internal one is
what its own libraries use.
"""

from __future__ import annotations

import json

from ray.experimental import internal_kv

from stalwart.errors import SpecError
from stalwart.spec import JobSpec, masked_secrets

KV_NAMESPACE = "stalwart-secrets"


def keep(job_id: str, spec: JobSpec) -> None:
    """Hold `spec`'s secrets for `job_id` (nothing when it has none)."""
    secrets = spec.secrets()
    if secrets:
        internal_kv._internal_kv_put(job_id, json.dumps(secrets), overwrite=True, namespace=KV_NAMESPACE)


def restore(job_id: str, stored: dict) -> JobSpec:
    """The runnable spec of `stored` (a masked JobSpec.to_dict()) with the secrets kept for `job_id`.
    Raises SpecError when it had secrets the cluster no longer holds."""
    kept = internal_kv._internal_kv_get(job_id, namespace=KV_NAMESPACE)
    lost = masked_secrets(stored) if kept is None else []
    if lost:
        raise SpecError([(", ".join(lost), "not kept on disk: the cluster held them in memory, and it has "
                                           "restarted since; resubmit the job")])
    return JobSpec.with_secrets(stored, json.loads(kept) if kept else {})


def forget(job_id: str) -> None:
    internal_kv._internal_kv_del(job_id, namespace=KV_NAMESPACE)
