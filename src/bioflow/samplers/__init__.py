"""Patch samplers (registry kind ``samplers``): which training candidates each epoch draws."""
