"""Downstream recipes and their metrics."""
