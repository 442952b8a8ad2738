"""bioflow: train and apply CNNs for bioimage analysis from Hydra configs.

The Python API (:mod:`bioflow.api`, docs/python-api.md): ``bioflow.train``, ``bioflow.predict``,
``bioflow.evaluate``, ``bioflow.load_model``; heavy libraries load on first use, so ``import
bioflow`` stays instant.
"""

from bioflow.threads import spin_briefly
from bioflow.version import __version__

spin_briefly()  # before torch loads OpenMP (see bioflow.threads)

_API = ("train", "predict", "evaluate", "load_model", "Model")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from bioflow import api

        return getattr(api, name)
    raise AttributeError(f"module 'bioflow' has no attribute '{name}'")
