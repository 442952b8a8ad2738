"""Models: the network architectures of the registry kind ``models`` (config section ``model``)."""
