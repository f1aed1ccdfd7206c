"""Option values that parse but make no sense end in one line naming the option, before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from glmvoice_cli.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["tts", "hi", "--seed", str(2**64)], "--seed"),
        (["tts", "hi", "--seed", "-1"], "--seed"),
        (["tts", "hi", "--seed", "1" * 100_000], "--seed"),
        (["transcribe", "x.wav", "--window", "inf"], "--window"),
        (["chat", "--input-file", "x.wav", "--simulate-echo", "inf"], "--simulate-echo"),
    ],
)
def test_a_bad_option_value_is_one_line(args: list[str], named: str, tmp_path: Path) -> None:
    result = runner.invoke(app, [*args, "--models", str(tmp_path / "none")])
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
