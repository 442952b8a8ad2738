"""Hydra configuration files shipped with bioflow (the package ``bioflow.configs``)."""
