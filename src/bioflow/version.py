"""bioflow's version, as installed (``0+unknown`` in a source tree that is not installed)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bioflow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
