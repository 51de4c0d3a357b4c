"""Rank workers, TrainContext, data iteration, strategies."""
