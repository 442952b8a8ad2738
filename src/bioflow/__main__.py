"""``python -m bioflow``: the same as the ``bioflow`` command."""

import sys

from bioflow.cli import main

sys.exit(main())
