"""Detectors, metrics and events; imports nothing else of stalwart but spec and errors."""
