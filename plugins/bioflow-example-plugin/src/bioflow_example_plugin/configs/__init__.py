"""Hydra config files of the example plugin (found by bioflow through its entry point)."""
