"""bioflow: train and apply CNNs for bioimage analysis from Hydra configs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bioflow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
