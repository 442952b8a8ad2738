"""Metrics: pixel-wise segmentation scores and object matching scores."""
