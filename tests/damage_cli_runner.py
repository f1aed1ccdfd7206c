"""Run damaged-input CLI cases in one process under a 4 GB address-space limit; report as JSON.

Run by tests/test_damage_inputs.py: `python damage_cli_runner.py CASES.json RESULTS.json`. Each case is
{"name", "args", "env", "stdin_file"}; every case runs the real `glmvoice` app in-process (torch is
imported once for all of them) with its environment variables set, and the result records the exit
code, stderr and whether an exception other than the CLI's own exit escaped (a traceback for the user).
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from pathlib import Path

from damage_runner import CASE_SECONDS, _Timeout, run_all  # tests/ is on sys.path: this script's folder


def run_case(case: dict) -> dict:
    from typer.testing import CliRunner

    from glmvoice_cli.cli import app

    stdin = Path(case["stdin_file"]).read_bytes() if case.get("stdin_file") else None
    start = time.monotonic()
    signal.alarm(CASE_SECONDS)
    saved = dict(os.environ)
    try:
        os.environ.update(case.get("env", {}))
        result = CliRunner().invoke(app, case["args"], input=stdin, catch_exceptions=True)
        crash = result.exception is not None and not isinstance(result.exception, SystemExit)
        outcome = "crash" if crash else "exit"
        detail = "".join(traceback.format_exception(result.exception))[-2000:] if crash and result.exception else ""
        code, stderr = result.exit_code, result.stderr
    except _Timeout:
        outcome, detail, code, stderr = "timeout", "", None, ""
    finally:
        signal.alarm(0)
        os.environ.clear()
        os.environ.update(saved)
    return {"name": case["name"], "outcome": outcome, "code": code, "stderr": stderr, "detail": detail,
            "seconds": time.monotonic() - start}


def main() -> None:
    run_all(run_case)


if __name__ == "__main__":
    main()
