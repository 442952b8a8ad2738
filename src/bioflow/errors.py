"""Errors that bioflow reports to the user as one line, without a traceback."""

from __future__ import annotations


class BioflowError(Exception):
    """An error caused by the user's input (config, files, plugins), reported as one line.

    The message must say what is wrong and where (file, config key, plugin) and, where it helps,
    what to do. The command-line interface prints it and exits with status 2.
    """

    exit_code = 2

    def one_line(self) -> str:
        """The message folded onto one line."""
        return " ".join(str(self).split())


class ConfigError(BioflowError):
    """A config key, type or value is wrong."""


class RegistryError(BioflowError):
    """A component name is unknown or ambiguous, or a plugin cannot be loaded."""


class DataError(BioflowError):
    """Input data (images, masks, metadata) cannot be used as given."""
