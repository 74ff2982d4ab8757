"""The ``medvl`` console script's first step, before the command line's imports.

Importing the commands pulls in torch, transformers and the rest (a few seconds). Ctrl-C in that time
ends the program as Ctrl-C in a command does: ``interrupted`` on stderr and exit code 130, no traceback.
Nothing here imports more than the standard library.
"""

from __future__ import annotations

import sys

from .exits import EXIT_INTERRUPTED


def run() -> None:
    """Import the command line, then run it (``medvl.cli.main.run``)."""
    try:
        from .main import run as run_command
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    run_command()
