"""Datasets of blip2lab. `shapes`: the synthetic shapes world (scenes, rendering, captions,
questions, splits and torch datasets)."""
