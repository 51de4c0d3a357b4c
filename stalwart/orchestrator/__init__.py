"""Controller actor, job state machine, failure policy, store, cluster connection."""
