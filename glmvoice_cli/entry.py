"""The console script's entry: a Ctrl-C in the first moments, while Python loads the command line itself, ends
in the same one line as one during a command (`error: interrupted`, status 130), not in an import traceback."""

from __future__ import annotations

import sys

INTERRUPTED_STATUS = 130  # 128 + SIGINT, the shell's convention


def main() -> None:
    try:
        from glmvoice_cli.cli import main as run
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS) from None
    run()
