"""Batch transforms: callables applied to a collated training batch on the training device."""
