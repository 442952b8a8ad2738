"""Loss functions (registry kind ``losses``)."""
