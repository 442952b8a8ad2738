"""Errors that bioflow reports to the user as one line, without a traceback."""

from __future__ import annotations

from typing import Iterable


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


def did_you_mean(word: str, known: Iterable[str], n: int = 1, prefix: str = "") -> str:
    """``"; did you mean 'x'?"`` (or ``'x' or 'y'``) for the ``n`` closest of ``known``, else ``""``.

    The one spelling of every "did you mean" in bioflow's messages; ``prefix`` is put before each
    suggestion (e.g. the parent of a config key).
    """
    import difflib

    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=n, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""


def check_range(where: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
                allowed: str | None = None) -> None:
    """Raise :class:`ConfigError` ``"<where>: <value> ...; must be ..."`` if ``value`` is out of range."""
    import math

    bad = value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
    if not bad and low is not None:
        bad = value <= low if low_open else value < low
    if not bad and high is not None:
        bad = value >= high if high_open else value > high
    if bad:
        if allowed is None:
            parts = []
            if low is not None:
                parts.append(f"{'>' if low_open else '>='} {low}")
            if high is not None:
                parts.append(f"{'<' if high_open else '<='} {high}")
            allowed = " and ".join(parts)
        raise ConfigError(f"{where}: {value!r} is not allowed; it must be {allowed}")
