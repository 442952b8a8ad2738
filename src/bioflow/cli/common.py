"""What every sub-command of ``bioflow`` shares."""

from __future__ import annotations

import sys


def fail(message: str, code: int = 2) -> int:
    """Print one line ``bioflow: error: ...`` to stderr and return the exit code."""
    print(f"bioflow: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return code
