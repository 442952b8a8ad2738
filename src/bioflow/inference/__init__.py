"""Applying trained networks to images of any size."""
