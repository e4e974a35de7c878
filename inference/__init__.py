"""Inference pipeline: score users with the champion model and publish their top-N to Redis."""
