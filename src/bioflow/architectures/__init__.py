"""Network architectures (registry kind ``architectures``)."""
