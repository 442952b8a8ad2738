"""Post-processors (registry kind ``postprocessors``): network output to final results (e.g. instances)."""
