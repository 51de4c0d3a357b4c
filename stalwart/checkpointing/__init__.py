"""Async checkpoint engine, storage backends, manifests, retention, restore."""
